"""Experiment configs: every file loads and validates, every CIFAR-100 row compiles and trains 2 steps,
every method preset validates and trains, and the KD table runs end to end through the CLI."""

import glob
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from transferlab import config as config_lib, host_allocator, losses, methods, models, parallel, study
from transferlab.data import builders
from transferlab.errors import ConfigError
from transferlab.tasks import common
from transferlab.tasks.kd import random_variables
from transferlab.train import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(REPO, "experiments", "**", "*.py"), recursive=True))
CIFAR_DIR = os.path.join(REPO, "experiments", "kd", "cifar100")
ROWS = sorted(p for p in glob.glob(os.path.join(CIFAR_DIR, "*.py")) if not p.endswith("teacher.py"))
CIFAR_INFO = SimpleNamespace(num_classes=100, image_shape=(32, 32, 3), split_sizes={"train": 50000, "test": 10000})
SMOKE = ["--config.teacher.checkpoint=random", "--config.batch_size=8", "--config.mesh_shape=data=-1"]


def rel(path):
    return os.path.relpath(path, REPO)


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("path", EXPERIMENTS, ids=rel)
def test_every_experiment_file_loads_and_validates(path, tmp_path):
    config = config_lib.load(path)
    if config.study.arms:
        assert study.resolve_arms(config, str(tmp_path))  # every arm's config validates


def test_the_ten_cifar100_rows_exist():
    pairs = {os.path.basename(p)[:-3] for p in ROWS}
    assert pairs == {"resnet56_resnet20", "resnet110_resnet32", "resnet32x4_resnet8x4", "wrn_40_2_wrn_16_2",
                     "wrn_40_2_wrn_40_1", "vgg13_vgg8", "resnet32x4_shufflenetv2", "resnet32x4_shufflenetv1",
                     "wrn_40_2_shufflenetv1", "vgg13_mobilenetv2"}


@pytest.mark.parametrize("path", ROWS, ids=rel)
def test_cifar100_row_recipe(path):
    config = config_lib.load(path + ":teacher_ckpt=/ckpt/teacher")
    student = config.model.name
    assert config.task == "kd" and config.teacher.checkpoint == "/ckpt/teacher"
    assert config.dataset.name == "cifar100" and config.dataset.train_split == "train"
    assert config.selection == "last"  # the periodic eval on 'test' never selects a checkpoint
    assert config.total_steps == 240 * 50000 // 64 and config.batch_size == 64
    assert config.optimizer.learning_rate == (0.01 if student in methods.LIGHT_MODELS else 0.05)
    assert config.schedule.name == "step" and config.schedule.boundaries == (150 / 240, 180 / 240, 210 / 240)
    assert config.augment.crop_padding == 4 and config.augment.flip
    assert [dict(t) for t in config.distill.terms] == [{"name": "kd", "weight": 0.9, "temperature": 4.0}]


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_every_method_loads_in_a_cifar100_row(method):
    config = config_lib.load(os.path.join(CIFAR_DIR, "resnet56_resnet20.py") + f":method={method}")
    assert [t["name"] for t in config.distill.terms] == [t["name"] for t in methods.distill_section(method)["terms"]]


def test_bad_config_arguments_name_the_culprit():
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        config_lib.load(os.path.join(CIFAR_DIR, "vgg13_vgg8.py") + ":method=nope")
    with pytest.raises(ConfigError, match="'metod'"):
        config_lib.load(os.path.join(CIFAR_DIR, "vgg13_vgg8.py") + ":metod=kd")
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        config_lib.load(os.path.join(REPO, "experiments", "kd", "table.py") + ":methods=kd+nope")


def test_kd_table_takes_any_pair_with_its_per_pair_hyperparameters():
    table = os.path.join(REPO, "experiments", "kd", "table.py")
    config = config_lib.load(table + ":teacher=resnet32x4,student=resnet8x4,methods=reviewkd,seeds=1")
    arms = {arm["name"]: arm for arm in config.study.arms}
    assert config.model.name == "resnet8x4" and arms["teacher"]["overrides"]["model.name"] == "resnet32x4"
    assert arms["student+reviewkd"]["overrides"]["teacher.name"] == "resnet32x4"
    assert arms["student+reviewkd"]["overrides"]["distill.terms"][0]["weight"] == 5.0  # mdistiller's, this pair
    assert config.study.title.startswith("KD methods on mnist5k: resnet32x4 teacher → resnet8x4 student")
    default = config_lib.load(table + ":methods=reviewkd")
    assert [a for a in default.study.arms if a["name"] == "student+reviewkd"][0]["overrides"][
        "distill.terms"][0]["weight"] == 1.0


# --------------------------------------------------------------------------- method presets


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_distill_section_validates(method):
    section = methods.distill_section(method, warmup_steps=100)
    assert set(section) == {"ce_weight", "terms"} and section["terms"]
    assert all(t["name"] in losses.names() for t in section["terms"])
    config = config_lib.from_dict({"task": "kd", "model": {"name": "resnet8"},
                                   "teacher": {"name": "resnet14", "checkpoint": "random"}, "distill": section})
    assert len(config.distill.terms) == len(section["terms"])


def test_distill_section_overrides():
    assert methods.distill_section("dkd", beta=2.0)["terms"][0]["beta"] == 2.0
    assert methods.distill_section("dkd", warmup_steps=7)["terms"][0]["warmup_steps"] == 7
    crd_kd = methods.distill_section("crd", kd_weight=1.0)  # RepDistiller's CRD+KD
    assert [(t["name"], t["weight"]) for t in crd_kd["terms"]] == [("crd", 0.8), ("kd", 1.0)]
    assert methods.distill_section("kd", ce_weight=0.5)["ce_weight"] == 0.5
    with pytest.raises(ConfigError, match="unknown method 'fitnets'"):
        methods.distill_section("fitnets")
    with pytest.raises(ConfigError, match="unknown override 'beta'"):
        methods.distill_section("kd", beta=1.0)


# --------------------------------------------------------------------------- compile and train


def host_state(trainer):
    """A train state drawn on the host (He-normal params, zero optimizer state), placed on the trainer's
    shardings: the jitted Flax init of these models compiles one XLA kernel per parameter (4-6 s each
    here) and is tested with the small models elsewhere; these tests are about the train step."""
    abstract = trainer.abstract_state
    state = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), abstract)
    state["params"] = random_variables(abstract["params"], seed=0)
    state["rng"] = jax.random.PRNGKey(0)
    return jax.device_put(state, trainer.state_shardings)


def two_steps(config, devices=None):
    """The real jitted train step, twice, on synthetic CIFAR-shaped inputs; returns the last metrics."""
    trainer = Trainer(config, "/nonexistent-workdir", devices, info=CIFAR_INFO)
    frozen = trainer.task.load_frozen(trainer.mesh, trainer.abstract_images)
    trainer.compile(frozen)
    state = host_state(trainer)
    rng = np.random.default_rng(0)
    for i in range(2):
        batch = {"image": rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
                 "label": rng.integers(0, 100, size=8).astype(np.int32),
                 "index": np.arange(8 * i, 8 * i + 8, dtype=np.int32)}
        state, metrics = trainer.jit_train_step(state, frozen, parallel.global_batch(trainer.mesh, batch))
    assert int(state["step"]) == 2
    return jax.device_get(metrics)


# The row whose step is compiled for the 8-device data-parallel mesh; the others use one device, which
# compiles ~35% faster (GSPMD partitioning of these larger programs): sharding itself is tested elsewhere.
SHARDED_ROW = "resnet56_resnet20"


@pytest.mark.parametrize("path", ROWS, ids=rel)
def test_cifar100_row_compiles_and_trains_two_steps(path):
    if os.path.basename(path) == SHARDED_ROW + ".py":
        metrics = two_steps(config_lib.load(path, SMOKE))
    else:
        metrics = two_steps(config_lib.load(path, SMOKE + ["--config.mesh_shape=data=1"]), jax.devices()[:1])
    assert np.isfinite(metrics["loss/total"]) and np.isfinite(metrics["loss/term0_kd"])


def test_every_method_trains_in_one_step():
    """All presets' terms in one KD step (one compile instead of one per method) on a small CIFAR pair."""
    sections = {m: methods.distill_section(m, warmup_steps=1) for m in methods.METHODS}
    terms = [t for section in sections.values() for t in section["terms"]]
    config = config_lib.load(os.path.join(CIFAR_DIR, "resnet56_resnet20.py"),
                             SMOKE + ["--config.model.name=resnet8", "--config.teacher.name=resnet14",
                                      "--config.mesh_shape=data=1"])
    config.distill.terms = tuple(terms)
    config_lib.validate(config)
    metrics = two_steps(config, jax.devices()[:1])  # one device compiles faster; sharding is tested elsewhere
    assert np.isfinite(metrics["loss/total"])
    for i, term in enumerate(terms):
        assert np.isfinite(metrics[f"loss/term{i}_{term['name']}"]), term


# Rows whose student and teacher stage3 grids differ (ShuffleNet 4x4 vs the teachers' 8x8): TRG compares token
# graphs on the coarser grid (the teacher map is average-pooled), so these trace like every other row.
TRG_GRID_ROWS = ("resnet32x4_shufflenetv1", "resnet32x4_shufflenetv2", "wrn_40_2_shufflenetv1")


def trace_step(config):
    """Traces (no compile) the jitted train step: tap names, connectors and loss shapes are all checked."""
    trainer = Trainer(config, "/nonexistent-workdir", info=CIFAR_INFO)
    teacher = trainer.task.teachers[0]
    params, state = jax.eval_shape(lambda x: common.init_model(teacher, jax.random.key(0), x), trainer.abstract_images)
    batch = {"image": jax.ShapeDtypeStruct((8, 32, 32, 3), np.float32),
             "label": jax.ShapeDtypeStruct((8,), np.int32), "index": jax.ShapeDtypeStruct((8,), np.int32)}
    frozen = {"teachers": [{"params": params, "model_state": state}],
              "class_means": trainer.task.abstract_class_means(trainer.abstract_images)}
    return jax.eval_shape(trainer.train_step, trainer.abstract_state, frozen, batch)[1]


@pytest.mark.parametrize("path", ROWS, ids=rel)
def test_every_method_traces_on_every_cifar100_row(path):
    """Every method preset (with the row's per-pair hyper-parameters) in one traced step of each row."""
    row = os.path.basename(path)[:-3]
    config = config_lib.load(path, SMOKE)
    teacher, student = config.teacher.name, config.model.name
    terms = [t for m in methods.METHODS
             for t in methods.distill_section(m, warmup_steps=1, **methods.pair_overrides(m, teacher, student))["terms"]]
    config.distill.terms = tuple(terms)
    metrics = trace_step(config)
    assert all(f"loss/term{i}_{t['name']}" in metrics for i, t in enumerate(terms))


@pytest.mark.parametrize("row", TRG_GRID_ROWS)
def test_trg_on_rows_with_different_token_grids(row):
    metrics = trace_step(config_lib.load(os.path.join(CIFAR_DIR, row + ".py") + ":method=trg", SMOKE))
    assert metrics["loss/term0_trg"].shape == ()


# --------------------------------------------------------------------------- the KD table, end to end


def test_kd_table_runs_through_the_cli(tmp_path, data_dir):
    """`make kd-table`'s command with its `dataset=` argument: sklearn's 8x8 digits, the SLA+SD arm."""
    builders.prepare("digits", data_dir)
    workdir = str(tmp_path / "table_digits")
    # One CPU device and XLA's default LLVM optimization: the ResNets run ~10 steps and 6 evaluations here,
    # which unoptimized (-O0) code makes slower than the compile time it saves (80 s -> 58 s on 2 cores).
    xla_flags = "--xla_force_host_platform_device_count=1 --xla_cpu_experimental_ynn_fusion_type="
    env = {**os.environ, "TFDS_DATA_DIR": data_dir, "XLA_FLAGS": xla_flags}
    proc = subprocess.run([sys.executable, "-m", "transferlab.main", "--config",
                           "experiments/kd/table.py:dataset=digits,steps=3,seeds=1,methods=sla_sd",
                           "--workdir", workdir], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for arm in ("teacher", "student", "student+sla_sd"):
        with open(os.path.join(workdir, arm, "seed_0", "results.json"), encoding="utf-8") as f:
            results = json.load(f)
        assert results["selection"] == "last step" and results["test"]["count"] == 360  # the digits test split
    assert "aggregated_accuracy" in results["test"]  # the SLA arm reports its M-copy ensemble too
    with open(os.path.join(workdir, "results.md"), encoding="utf-8") as f:
        table = f.read()
    assert all(f"| {arm} |" in table for arm in ("teacher", "student", "student+sla_sd"))
    # the CLI preloads mimalloc where JAX runs on the CPU (on a GPU host it keeps the system allocator)
    allocator = "mimalloc" if host_allocator.preloaded(env) or host_allocator.preload_environment(env) else "system"
    assert "Environment: git " in table and f"allocator {allocator}" in table
    # The header comes from the config (study.title/description) and names the command that ran the study.
    assert table.startswith("# KD methods on digits: resnet20 teacher → resnet8 student, 1 seed(s)\n")
    assert "sklearn's 8x8 UCI digits" in table and "**Selection rule: the last step.**" in table
    assert ("Command: `python -m transferlab.main --config "
            "experiments/kd/table.py:dataset=digits,steps=3,seeds=1,methods=sla_sd --workdir ") in table
    assert os.listdir(os.path.join(workdir, "xla_cache"))  # table.py's compilation cache, under --workdir


# --------------------------------------------------------------------------- a config's own model and loss


def test_a_config_file_can_bring_its_own_model_and_loss(tmp_path, data_dir):
    """tests/configs/own_model_and_loss.py registers a student model and a loss: it trains through the
    CLI, exports with `--config`, loads again in one process, and a name already taken is one line."""
    own = os.path.join(REPO, "tests", "configs", "own_model_and_loss.py")
    env = {**os.environ, "TFDS_DATA_DIR": data_dir}
    run, out = str(tmp_path / "run"), str(tmp_path / "export")
    proc = subprocess.run([sys.executable, "-m", "transferlab.main", "--config", own, "--workdir", run], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"), encoding="utf-8")]
    assert any("loss/term0_l2_logits" in r for r in records)
    export = [sys.executable, "-m", "transferlab.export", "--workdir", run, "--out", out]
    proc = subprocess.run(export, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "pass that file with --config FILE" in proc.stderr
    proc = subprocess.run(export + ["--config", own], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for _ in range(2):  # executing the file again re-registers the same definitions
        config = config_lib.load(own)
    assert config.model.name in models.names() and "l2_logits" in losses.names()
    taken = tmp_path / "taken.py"
    taken.write_text("from transferlab import losses\n\n@losses.register('kd', taps=('logits', 'logits'))\n"
                     "def kd(student, teacher, batch):\n    return 0.0\n\n\ndef get_config():\n    return {}\n")
    with pytest.raises(config_lib.ConfigError, match=r"cannot execute it: ValueError: loss 'kd' is already "
                                                     r"registered \(transferlab.losses.logit.kd\)"):
        config_lib.load(str(taken))
