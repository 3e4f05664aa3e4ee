"""The trainer end to end on real data (UCI digits): learning, workdir files, sharding, resume."""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transferlab import checkpoint, config as config_lib, data, parallel, study, train
from transferlab.errors import ConfigError, UserError
from transferlab.metrics import read_jsonl
from transferlab.train import Trainer, train_and_evaluate

from conftest import REPO, needs_devices


def tiny(**overrides):
    base = {"dataset": {"name": "digits"}, "model": {"name": "mlp", "kwargs": {"hidden_sizes": (32,)}},
            "total_steps": 30, "batch_size": 32, "eval_batch_size": 64, "log_every_steps": 5,
            "eval_every_steps": 15, "checkpoint_every_steps": 10,
            "optimizer": {"learning_rate": 0.1}, "schedule": {"name": "constant"}}
    for key, value in overrides.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return config_lib.from_dict(base)


def final_params(workdir, config):
    trainer = Trainer(config, workdir)
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    abstract = checkpoint.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
    state, _ = ckpt.restore(ckpt.latest_step(), abstract)
    ckpt.close()
    return jax.device_get(state)


def test_training_learns_and_writes_the_workdir(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    results = train_and_evaluate(tiny(), workdir)
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert all("step" in r for r in records)
    train = [r for r in records if "loss/ce" in r]
    assert train[-1]["loss/ce"] < 0.5 * train[0]["loss/ce"]
    for key in ("learning_rate", "grad_norm", "accuracy", "steps_per_sec", "examples_per_sec"):
        assert key in train[-1]
    evals = [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [15, 30]
    assert "eval/top5_accuracy" in evals[0] and evals[0]["eval/count"] == 180
    assert results["test"]["count"] == 360 and results["test"]["accuracy"] > 0.7
    assert results["selection"] == "last step" and results["selected_step"] == 30
    with open(os.path.join(workdir, "config.json")) as f:
        resolved = json.load(f)
    assert resolved["total_steps"] == 30 and resolved["_versions"]["jax"] == jax.__version__
    assert "git_commit" in resolved["_versions"]
    assert os.path.isdir(os.path.join(workdir, "tensorboard"))


def test_best_on_validation_selection(tmp_path, data_dir):
    results = train_and_evaluate(tiny(selection="best", eval_every_steps=5), str(tmp_path / "run"))
    records = read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    best = max((r["eval/accuracy"], r["step"]) for r in records if "eval/accuracy" in r)
    assert results["selected_step"] == best[1]
    assert results["validation"]["accuracy"] == pytest.approx(best[0])
    assert "best validation" in results["selection"]


def _three_steps(config, workdir, devices):
    """(state, metrics) after 3 train steps of `config` on `devices`."""
    trainer = Trainer(config, workdir, devices=devices)
    frozen = trainer.task.load_frozen(trainer.mesh, trainer.abstract_images)
    trainer.compile(frozen)
    state = trainer.init_state()
    it = trainer.train_iterator()
    for _ in range(3):
        state, metrics = trainer.jit_train_step(state, frozen, parallel.global_batch(trainer.mesh, next(it)))
    return jax.device_get(state), jax.device_get(metrics)


@needs_devices(8)
def test_sharded_step_equals_single_device_step(tmp_path, data_dir):
    outs = [_three_steps(tiny(batch_size=64, mesh_shape=mesh), str(tmp_path / mesh), devices)
            for mesh, devices in (("data=4,fsdp=2", jax.devices()), ("data=1", jax.devices()[:1]))]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 outs[0][0]["params"], outs[1][0]["params"])
    assert outs[0][1]["loss/ce"] == pytest.approx(outs[1][1]["loss/ce"], rel=1e-5)


@needs_devices(8)
def test_batch_statistics_losses_see_the_global_batch_on_a_sharded_mesh(tmp_path, data_dir):
    """Losses over the whole batch (DIST's per-class relation, SP, RKD, PKT, CRD's negatives and memory bank)
    and mixup's pairing are computed over the global batch, as on one device, not per shard."""
    terms = ({"name": "dist"}, {"name": "sp", "student_tap": "features", "teacher_tap": "features"},
             {"name": "rkd", "student_tap": "features", "teacher_tap": "features"},
             {"name": "pkt", "student_tap": "features", "teacher_tap": "features"},
             {"name": "crd", "embed_dim": 8, "num_negatives": 32})
    kd = {"task": "kd", "batch_size": 64, "augment": {"mixup_alpha": 0.4},
          "teacher": {"name": "mlp", "checkpoint": "random", "kwargs": {"hidden_sizes": (16,)}},
          "distill": {"terms": terms}}
    outs = [_three_steps(tiny(**kd, mesh_shape=mesh), str(tmp_path / mesh), devices)
            for mesh, devices in (("data=8", jax.devices()), ("data=1", jax.devices()[:1]))]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 {k: outs[0][0][k] for k in ("params", "model_state")},
                 {k: outs[1][0][k] for k in ("params", "model_state")})
    for name, value in outs[1][1].items():
        assert outs[0][1][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    assert "memory" in outs[0][0]["model_state"]  # the CRD bank was compared too


@needs_devices(8)
def test_fsdp_rules_shard_params(tmp_path, data_dir):
    trainer = Trainer(tiny(batch_size=64, mesh_shape="data=4,fsdp=2"), str(tmp_path / "w"))
    specs = [s.spec for s in jax.tree.leaves(trainer.state_shardings["params"])]
    assert any("fsdp" in tuple(spec) for spec in specs)
    replicated = Trainer(tiny(batch_size=64, mesh_shape="data=4,fsdp=2", sharding_rules=((".*", "replicate"),)),
                         str(tmp_path / "w2"))
    assert all(tuple(s.spec) == () for s in jax.tree.leaves(replicated.state_shardings["params"]))


def test_gradient_accumulation_matches_one_big_batch(tmp_path, data_dir):
    params = []
    for k in (1, 4):
        trainer = Trainer(tiny(batch_size=64, optimizer={"accumulate_steps": k}), str(tmp_path / f"a{k}"))
        trainer.compile({})
        state = trainer.init_state()
        batch = parallel.global_batch(trainer.mesh, next(trainer.train_iterator()))
        state, _ = trainer.jit_train_step(state, {}, batch)
        params.append(jax.device_get(state["params"]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), *params)


@needs_devices(8)
def test_restore_onto_a_different_mesh(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    config = tiny(batch_size=64, mesh_shape="data=4,fsdp=2", total_steps=10)
    train_and_evaluate(config, workdir)
    on_eight = final_params(workdir, config)
    small = Trainer(tiny(batch_size=64, mesh_shape="data=1,fsdp=2", total_steps=10), workdir,
                    devices=jax.devices()[:2])
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    state, data_state = ckpt.restore(10, checkpoint.abstract_with_shardings(small.abstract_state,
                                                                           small.state_shardings))
    assert all(len(x.sharding.device_set) == 2 for x in jax.tree.leaves(state["params"]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), on_eight)
    assert data_state


def cli(args, env_extra=None, timeout=240):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "transferlab.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


TINY_CLI = ["--config.dataset.name=digits", "--config.model.name=mlp", "--config.model.kwargs.hidden_sizes=(32,)",
            "--config.total_steps=24", "--config.batch_size=32", "--config.log_every_steps=4",
            "--config.eval_every_steps=12", "--config.checkpoint_every_steps=8", "--config.schedule.name=cosine"]
QUICK = os.path.join("experiments", "kd", "quickstart.py")


def test_kill_and_resume_is_bitwise_exact(tmp_path, data_dir):
    # on a GPU, conftest fixes XLA's kernel choice (GPU_DETERMINISM): the processes inherit its XLA_FLAGS
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    assert cli(["--config", "tests/configs/tiny.py", "--workdir", straight, *TINY_CLI]).returncode == 0
    killed = cli(["--config", "tests/configs/tiny.py", "--workdir", resumed, *TINY_CLI],
                 env_extra={"TRANSFERLAB_FAULT_KILL_AT_STEP": "13"})
    assert killed.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(resumed, "results.json"))
    config = config_lib.load(os.path.join(REPO, "tests/configs/tiny.py"), TINY_CLI)
    trainer = Trainer(config, resumed)
    ckpt = checkpoint.Checkpointer(resumed, read_only=True)
    _, data_state = ckpt.restore(8, checkpoint.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings))
    ckpt.close()
    assert set(data_state) == {"iterator", "elapsed_s", "config", "frozen_sources"} and data_state["elapsed_s"] > 0
    assert config_lib.first_difference(data_state["config"], config) is None
    again = cli(["--config", "tests/configs/tiny.py", "--workdir", resumed, *TINY_CLI])
    assert again.returncode == 0, again.stderr
    # the wall time counts the killed process's time up to its checkpoint too
    assert json.load(open(os.path.join(resumed, "results.json")))["wall_time_s"] > data_state["elapsed_s"]
    config = config_lib.load(os.path.join(REPO, "tests/configs/tiny.py"), TINY_CLI)
    a, b = final_params(straight, config), final_params(resumed, config)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    steps = [r["step"] for r in read_jsonl(os.path.join(resumed, "metrics.jsonl")) if "loss/ce" in r]
    assert steps == sorted(set(steps))  # no duplicated records after the resume


def test_a_compilation_cache_entry_cut_short_by_a_kill_is_dropped(tmp_path):
    """JAX writes its cache entries in place: a kill mid-write leaves one truncated, which JAX would warn about
    on every later run and never rewrite. The CLI removes such entries before JAX reads the cache."""
    from jax._src.compilation_cache import compress_executable
    from transferlab import main
    whole = compress_executable(bytes(range(256)) * 400)
    a, b, c = ("jit_step-" + x * 64 for x in "abc")  # JAX's names: module, sha256 hex digest, '-cache'
    for name, blob in ((f"{a}-cache", whole), (f"{b}-cache", whole[: len(whole) // 2]),
                       (f"{c}-cache", b""), (f"{a}-atime", b"12345678"), ("experiment-cache", b"mine")):
        (tmp_path / name).write_bytes(blob)
    damaged = main.drop_damaged_cache_entries(str(tmp_path))
    assert sorted(os.path.basename(p) for p in damaged) == [f"{b}-cache", f"{c}-cache"]
    assert sorted(os.listdir(tmp_path)) == ["experiment-cache", f"{a}-atime", f"{a}-cache"]  # a user's file kept
    assert main.drop_damaged_cache_entries(str(tmp_path / "absent")) == []
    for cache_dir, message in (("notes.txt", "exists and is not a directory"), (".", "the run's own directory"),
                               ("checkpoints/", "the run's own directory"), ("metrics.jsonl", "the run's own")):
        (tmp_path / "notes.txt").write_text("mine")
        with pytest.raises(ConfigError, match=f"config key 'xla_cache_dir': .*{message}"):
            main._use_compilation_cache(cache_dir, str(tmp_path))


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_save_and_exit_cleanly(tmp_path, data_dir, signum, code):
    """A preemption (SIGTERM, exit 0) or Ctrl-C (exit 130): the step finishes, a checkpoint is saved."""
    workdir = str(tmp_path / "run")
    args = ["--config", "tests/configs/tiny.py", "--workdir", workdir, *TINY_CLI,
            "--config.total_steps=100000", "--config.checkpoint_every_steps=0", "--config.eval_every_steps=0"]
    proc = subprocess.Popen([sys.executable, "-m", "transferlab.main", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        time.sleep(0.2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"stopped ({signal.Signals(signum).name}) at step" in out and "Traceback" not in err
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    assert ckpt.latest_step() and ckpt.latest_step() > 0


def test_a_signal_between_study_runs_starts_no_further_run(tmp_path, monkeypatch):
    """SIGTERM during a run's final evaluation (after its loop) stops the study before the next run."""
    from transferlab import preemption
    flag = preemption.StopFlag()
    monkeypatch.setattr(preemption, "_FLAG", flag)
    config = config_lib.load(os.path.join(REPO, "tests/configs/tiny.py"))
    config.study.arms = ({"name": "a", "overrides": {}}, {"name": "b", "overrides": {}})
    trained = []

    def train_fn(cfg, run_dir):
        trained.append(os.path.relpath(run_dir, tmp_path))
        flag.signum = signal.SIGTERM  # arrives while this run evaluates and writes its results
        return {"test": {}}

    out = study.run_study(config, str(tmp_path), train_fn)
    assert trained == [os.path.join("a", "seed_0")]
    assert out == {"preempted_at_step": None, "signal": "SIGTERM", "before": "b seed 0"}


def test_cli_errors_are_one_line_exit_2(tmp_path, data_dir):
    cases = [
        ["--config", "tests/configs/tiny.py", "--workdir", str(tmp_path / "a"), "--config.modle.name=x"],
        ["--config", "tests/configs/tiny.py", "--workdir", str(tmp_path / "b"), "--config.model.name=resnet9000"],
        ["--config", "tests/configs/missing.py", "--workdir", str(tmp_path / "c")],
        ["--config", "tests/configs/tiny.py", "--workdir", str(tmp_path / "d"), "--config.batch_size=30"],
        ["--config", "tests/configs/tiny.py", "--workdir", str(tmp_path / "e"), "--bogus"],
        # a tfds dataset that is not prepared: tfds's own absl warnings must not precede our line
        ["--config", "tests/configs/tiny.py", "--workdir", str(tmp_path / "f"), "--config.dataset.name=cifar10"],
        # a workdir that is a file, or lies under one
        ["--config", "tests/configs/tiny.py", "--workdir", str(tmp_path / "file")],
        ["--config", "tests/configs/tiny.py", "--workdir", str(tmp_path / "file" / "run")],
        # checkpoints/ not writable (Orbax hung 5 min at the first save), a metric the task does not report
        # (found at the first evaluation, after training), a tfds version that does not exist
        ["--config", "tests/configs/tiny.py", "--workdir", str(tmp_path / "g")],
        ["--config", "tests/configs/tiny.py", "--workdir", str(tmp_path / "h"),
         "--config.selection_metric=teacher_agreement", "--config.eval_every_steps=0"],
        ["--config", "tests/configs/tiny.py", "--workdir", str(tmp_path / "i"), "--config.dataset.name=digits:9.9.9"],
        # its parents were left behind (created before the over-long name failed)
        ["--config", "tests/configs/tiny.py", "--workdir", str(tmp_path / "j" / "k" / ("z" * 300) / "run")],
    ]
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "checkpoints").write_text("x")
    errors = []
    for args in cases:
        # On the 8 simulated CPU devices whatever the host has (batch 30 does not divide over them; one GPU would)
        proc = cli(args, {"JAX_PLATFORMS": "cpu"})
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("transferlab: error:"), proc.stderr
        assert "Traceback" not in proc.stderr
        errors.append(lines[0])
    assert "batch_size" in errors[3]
    assert "is not a directory" in errors[6] and (tmp_path / "file").read_text() == "not a directory"
    assert "checkpoints is not a writable directory" in errors[8]
    assert "'selection_metric': 'teacher_agreement' is not an eval metric of task 'classify'" in errors[9]
    assert "'dataset.name': 'digits:9.9.9'" in errors[10]
    assert "cannot create it" in errors[11]
    # no empty run is left behind in a workdir the failed command created; one that existed is kept
    assert sorted(os.listdir(tmp_path)) == ["file", "g"] and (tmp_path / "g" / "checkpoints").read_text() == "x"


@pytest.mark.parametrize("extra, message", [
    (["--workdir", "elsewhere"], "--workdir is given more than once"),
    (["--coordinator_address", "127.0.0.1:2345"], "--coordinator_address needs --num_processes and --process_id"),
    (["--num_processes", "2", "--process_id", "1"], "--num_processes needs --coordinator_address too"),
    (["--coordinator_address", "nohost", "--num_processes", "1", "--process_id", "0"],
     "--coordinator_address 'nohost': expected HOST:PORT"),
    (["--coordinator_address", "h:1", "--num_processes", "2", "--process_id", "2"], "--process_id 2: expected 0 to 1"),
    (["--coordinator_address", "h:1", "--num_processes", "0", "--process_id", "0"], "--num_processes 0: expected at"),
    (["--distributed", "--process_id", "0"], "--distributed detects the cluster itself; drop --process_id"),
    # abbreviations are not taken (they slipped past the checks above)
    (["--work", "elsewhere"], "unrecognized arguments: --work elsewhere"),
    (["--coord", "127.0.0.1:2345"], "unrecognized arguments: --coord"),
])
def test_cli_flag_mistakes_are_one_line_before_anything_starts(extra, message, capsys):
    from transferlab.main import parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", "tests/configs/tiny.py", "--workdir", "w", *extra])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_workdir_that_cannot_be_created_is_a_clear_error(tmp_path):
    from transferlab.errors import UserError
    from transferlab.main import check_workdir
    check_workdir(str(tmp_path / "new" / "run"))  # creatable: fine, and nothing is created by the check
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(UserError, match="--workdir"):
            check_workdir(str(bad))


def test_a_single_run_and_a_study_do_not_share_a_workdir(tmp_path):
    """Either would overwrite the other's results.json (a KD run reads its teacher's selected step there)."""
    from transferlab.errors import UserError
    from transferlab.main import check_workdir
    study_dir, run_dir = tmp_path / "study", tmp_path / "run"
    (study_dir / "teacher" / "seed_0" / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match=r"holds a study \(runs under it: teacher/seed_0\); a single run needs"):
        check_workdir(str(study_dir))
    with pytest.raises(UserError, match=r"holds a single run \(checkpoints\); a study needs"):
        check_workdir(str(run_dir), study=True)
    check_workdir(str(study_dir), study=True)
    check_workdir(str(run_dir))
    notes = tmp_path / "notes"  # a directory that merely looks like a study (no run in it) is no study
    (notes / "drafts" / "seed_1").mkdir(parents=True)
    check_workdir(str(notes))
    for study_or_not in (False, True):  # nor inside a run, nor in a study's arm directory
        with pytest.raises(UserError, match=r"is a study arm's directory \(runs in it: seed_0\)"):
            check_workdir(str(study_dir / "teacher"), study=study_or_not)
    (run_dir / "config.json").write_text('{"_versions": {}}')
    for inside in (run_dir / "checkpoints", run_dir / "checkpoints" / "new", run_dir / "tensorboard" / "x"):
        with pytest.raises(UserError, match=f"lies inside {run_dir}/{inside.relative_to(run_dir).parts[0]}, which "
                                            f"the run in {run_dir} writes"):
            check_workdir(str(inside))
    with pytest.raises(UserError, match=f"lies inside the run in {run_dir}; use a directory outside it"):
        check_workdir(str(run_dir / "students" / "kd"))  # (moving or deleting that run would take this one along)
    for stray in (study_dir / "teacher" / "seed_5", study_dir / "teacher" / "seed_0" / "sub"):
        with pytest.raises(UserError, match="lies inside"):  # the study's report would count it as a seed
            check_workdir(str(stray))
    (study_dir / "teacher" / "seed_0" / "config.json").write_text('{"_versions": {}}')
    check_workdir(str(study_dir / "teacher" / "seed_0"))  # an arm's own run, rerun by hand, is that run
    check_workdir(str(study_dir / "student" / "seed_0"))  # a new arm of the study: its directory holds no run
    project = tmp_path / "project"  # another tool's config.json and checkpoints/: not a transferlab run
    (project / "checkpoints").mkdir(parents=True)
    (project / "config.json").write_text('{"lr": 1}')
    check_workdir(str(project / "checkpoints" / "run"))


def test_incompatible_checkpoint_is_a_clear_error(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    assert cli(["--config", "tests/configs/tiny.py", "--workdir", workdir, *TINY_CLI]).returncode == 0
    changed = ["--config", "tests/configs/tiny.py", "--workdir", workdir, *TINY_CLI,
               "--config.model.kwargs.hidden_sizes=(16,)"]
    proc = cli(changed)  # the saved config.json names the change
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "different config (model.kwargs.hidden_sizes: saved [32], now [16])" in proc.stderr
    with open(os.path.join(workdir, "config.json")) as f:  # nothing already written is lost
        assert json.load(f)["model"]["kwargs"]["hidden_sizes"] == [32]
    saved = {name: open(os.path.join(workdir, name)).read() for name in ("config.json", "results.json")}
    for name in saved:  # without config.json, the copy of the config in the checkpoint names it
        os.remove(os.path.join(workdir, name))
    proc = cli(changed)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "different config (model.kwargs.hidden_sizes: saved [32], now [16])" in proc.stderr
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    trainer = Trainer(config_lib.load(os.path.join(REPO, "tests/configs/tiny.py"), changed[4:]), workdir)
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)  # and the saved arrays' shapes are checked
    with pytest.raises(UserError, match=r"checkpoint .*/24 does not match this config \(model or optimizer"):
        ckpt.restore(24, checkpoint.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings))
    ckpt.close()
    proc = cli(["--config", "tests/configs/tiny.py", "--workdir", workdir, *TINY_CLI])
    assert proc.returncode == 0, proc.stderr  # the original config still resumes (and finishes)
    assert json.load(open(os.path.join(workdir, "results.json")))["test"] == json.loads(saved["results.json"])["test"]


def test_unreadable_checkpoint_is_a_clear_error_naming_the_earlier_one(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    args = ["--config", "tests/configs/tiny.py", "--workdir", workdir, *TINY_CLI, "--config.keep_checkpoints=3"]
    assert cli(args).returncode == 0  # checkpoints at steps 8, 16 and 24; then as if killed after step 16:
    shutil.rmtree(os.path.join(workdir, "checkpoints", "24"))
    os.remove(os.path.join(workdir, "results.json"))
    latest = os.path.join(workdir, "checkpoints", "16")
    for root, _, files in os.walk(os.path.join(latest, "state")):
        for name in files:
            if os.path.basename(root) == "d":  # the array data files: truncated, as by a broken disk
                open(os.path.join(root, name), "w").close()
    proc = cli(args)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # no TensorStore/asyncio noise above it
    assert "checkpoints/16 cannot be restored" in proc.stderr and "to resume from step 8" in proc.stderr
    os.rename(latest, str(tmp_path / "bad_16"))  # the hint: move it away, and the run resumes from step 8
    proc = cli(args)
    assert proc.returncode == 0, proc.stderr
    assert os.path.exists(os.path.join(workdir, "checkpoints", "24"))

    # Damaged JSON inside a checkpoint (found by a kill-and-resume audit: 20-60 line tracebacks before).
    os.remove(os.path.join(workdir, "results.json"))
    for relative, garbage, message in (
            ("8/metrics/metrics", "garbage", "cannot be read (JSONDecodeError: Expecting value: line 1 column 1 "
                                             "(char 0)); " + os.path.join(workdir, "checkpoints", "8", "metrics",
                                                                          "metrics") + " is damaged"),
            ("8/metrics/metrics", '{"selection_metric": "abc"}', "metrics/metrics: its selection_metric is not a "
                                                                   "number); move that step's directory"),
            ("24/data/metadata", '{"iterator": {}, "elapsed_s": 1.0}', "checkpoints/24: its data-iterator state is "
                                                                       "damaged")):
        path = os.path.join(workdir, "checkpoints", relative)
        saved = open(path).read()
        with open(path, "w") as f:
            f.write(garbage)
        proc = cli(args)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert message in proc.stderr, proc.stderr
        with open(path, "w") as f:
            f.write(saved)
    path = os.path.join(workdir, "checkpoints", "24", "data", "metadata")
    saved = open(path).read()
    for key, value in (("elapsed_s", "abc"), ("elapsed_s", None), ("next_index", -5)):  # (tracebacks before)
        damaged = json.loads(saved)
        (damaged if key == "elapsed_s" else damaged["iterator"])[key] = value
        with open(path, "w") as f:
            json.dump(damaged, f)
        proc = cli(args)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "checkpoints/24: its data-iterator state is damaged" in proc.stderr, proc.stderr
    with open(path, "w") as f:
        f.write(saved)
    # Array data damaged on disk after the save restored silently before (exit 0, other numbers). The digests
    # saved beside the arrays are checked at restore (test_checksum.py: any flipped bit changes one); here a
    # digest that no longer matches its array: one line naming the array and the earlier step, exit 2.
    damaged = json.loads(saved)
    leaf = sorted(damaged["checksums"])[0]
    damaged["checksums"][leaf] = "0" * 16
    with open(path, "w") as f:
        json.dump(damaged, f)
    proc = cli(args)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"checkpoints/24 cannot be restored" in proc.stderr and "to resume from step 16" in proc.stderr
    assert f"its array {leaf} does not match the checksum saved with it" in proc.stderr, proc.stderr
    with open(path, "w") as f:
        f.write(saved)
    # A step directory copied by hand under another step's name: the state inside says which step it is.
    shutil.copytree(os.path.join(workdir, "checkpoints", "16"), os.path.join(workdir, "checkpoints", "30"))
    proc = cli(args)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "checkpoints/30 holds the state of step 16; move that directory away" in proc.stderr, proc.stderr
    shutil.rmtree(os.path.join(workdir, "checkpoints", "30"))
    # Killed after logging the final evaluation, before results.json: evaluated again, logged once.
    assert cli(args).returncode == 0
    finals = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if any(k.startswith("final/") for k in r)]
    assert len(finals) == 1, finals


def test_a_results_file_of_the_wrong_shape_is_evaluated_again(tmp_path, data_dir):
    """Valid JSON that lacks what the summary line reads (tracebacks before, from the CLI's print)."""
    workdir = str(tmp_path / "run")
    args = ["--config", "tests/configs/tiny.py", "--workdir", workdir, *TINY_CLI]
    assert cli(args).returncode == 0
    path = os.path.join(workdir, "results.json")
    good = json.load(open(path))
    for damaged in ({"test": {"accuracy": 0.5}}, {"test": 5},
                    {**good, "test": {"accuracy": "x"}}, {**good, "selected_step": "24"}):
        with open(path, "w") as f:
            json.dump(damaged, f)
        proc = cli(args)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert json.load(open(path))["test"] == good["test"]


def test_nonfinite_loss_stops_and_keeps_the_checkpoint(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    overrides = [*TINY_CLI, "--config.total_steps=60", "--config.checkpoint_every_steps=2",
                 "--config.schedule.name=linear", "--config.schedule.warmup_steps=60",
                 "--config.optimizer.learning_rate=1e30", "--config.optimizer.momentum=0.0"]
    proc = cli(["--config", "tests/configs/tiny.py", "--workdir", workdir, *overrides])
    assert proc.returncode == 3, proc.stderr
    assert "non-finite" in proc.stderr
    config = config_lib.load(os.path.join(REPO, "tests/configs/tiny.py"), overrides)
    state = final_params(workdir, config)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_quickstart_study_end_to_end(tmp_path, data_dir):
    workdir = str(tmp_path / "study")
    proc = cli(["--config", QUICK + ":steps=20,seeds=2", "--workdir", workdir,
                "--config.log_every_steps=10"], timeout=400)
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(workdir, "results.json")) as f:
        summary = json.load(f)
    arms = {row["arm"]: row for row in summary["arms"]}
    assert set(arms) == {"teacher", "student", "student+kd"}
    assert len(arms["student+kd"]["seeds"]) == 2 and arms["student"]["selection"] == "last step"
    assert "student+kd" in proc.stdout and "±" in proc.stdout
    kd_config = json.load(open(os.path.join(workdir, "student+kd", "seed_0", "config.json")))
    assert kd_config["teacher"]["checkpoint"] == os.path.join(os.path.abspath(workdir), "teacher", "seed_0")
    rerun = cli(["--config", QUICK + ":steps=20,seeds=2", "--workdir", workdir,
                 "--config.log_every_steps=10"], timeout=200)
    assert rerun.returncode == 0 and "already finished" in rerun.stdout
    # the study directory moved (copied from a pod, renamed): its KD runs' teacher moved with them
    moved = str(tmp_path / "elsewhere" / "study")
    os.renames(workdir, moved)
    rerun = cli(["--config", QUICK + ":steps=20,seeds=2", "--workdir", moved,
                 "--config.log_every_steps=10"], timeout=200)
    assert rerun.returncode == 0 and rerun.stdout.count("already finished") == 5, rerun.stderr[-2000:]
    assert "student+kd" in open(os.path.join(moved, "results.md"), encoding="utf-8").read()
    assert json.load(open(os.path.join(moved, "study.json")))["arms"][0] == {"name": "teacher", "seeds": [0]}
    # copied while the original is in the place its runs recorded: refused, saying why and what to do (it
    # advised retraining)
    copy = str(tmp_path / "copy")
    shutil.copytree(moved, copy)
    os.renames(moved, workdir)
    rerun = cli(["--config", QUICK + ":steps=20,seeds=2", "--workdir", copy], timeout=200)
    assert rerun.returncode == 2 and len(rerun.stderr.strip().splitlines()) == 1, rerun.stderr
    assert f"this run is a copy of {workdir}/student+kd/seed_0, which is still there" in rerun.stderr
    assert "move (or rename) the original study away and rerun to continue the copy" in rerun.stderr


def test_study_checks_every_arm_before_training_any(tmp_path, data_dir):
    """A wrong tap in the last arm is reported (naming the arm) before the first arm trains."""
    config = config_lib.load(os.path.join(REPO, "tests/configs/tiny.py"))
    kd = {"task": "kd", "teacher.name": "mlp", "teacher.checkpoint": "{workdir}/teacher/seed_0",
          "distill.terms": ({"name": "fitnet", "weight": 1.0, "student_tap": "hiden", "teacher_tap": "features"},)}
    config.study.arms = ({"name": "teacher", "overrides": {}}, {"name": "kd", "overrides": kd})
    trained = []
    with pytest.raises(ConfigError, match=r"study.arms\[1\] \(kd\): .*'hiden' is not a tap of the student"):
        study.run_study(config, str(tmp_path), lambda cfg, d: trained.append(d), train.check_config)
    assert trained == [] and not os.listdir(tmp_path)
    # without the mistake every arm passes the check and trains, in order
    config.study.arms = ({"name": "teacher", "overrides": {}},
                         {"name": "kd", "overrides": {**kd, "distill.terms": ({"name": "kd", "weight": 1.0},)}})
    checked = []
    out = study.run_study(config, str(tmp_path),  # a fake train_fn that "is preempted" after the first run
                          lambda cfg, d: (trained.append(d), {"preempted_at_step": 0})[1],
                          lambda cfg: (checked.append(cfg.task), train.check_config(cfg)))
    assert out == {"preempted_at_step": 0} and checked == ["classify", "kd"]
    assert [os.path.relpath(d, tmp_path) for d in trained] == [os.path.join("teacher", "seed_0")]


def test_closed_loop_callback_errors_are_dropped_and_others_pass_through(monkeypatch):
    """What TensorStore's threads report after a failed read (see checkpoint._ignore_closed_loop_callbacks)."""
    import asyncio
    from types import SimpleNamespace
    from transferlab import checkpoint
    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *info: seen.append(info[1]))
    monkeypatch.setattr(sys, "unraisablehook", lambda args: seen.append(args.exc_value))
    checkpoint._ignore_closed_loop_callbacks()
    checkpoint._ignore_closed_loop_callbacks()  # installed once
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        closed = e
    other = RuntimeError("Event loop is closed")  # same message, not raised inside asyncio
    for exc in (closed, other, ValueError("x")):
        sys.excepthook(type(exc), exc, exc.__traceback__)
        sys.unraisablehook(SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=exc.__traceback__,
                                           err_msg=None, object=None))
    assert [type(e) for e in seen] == [RuntimeError, RuntimeError, ValueError, ValueError]
    assert seen[0] is other and seen[1] is other


def test_best_checkpoint_is_recorded_on_disk_and_survives_a_restart(tmp_path):
    """The best validation step is read back by a new process and kept by its preservation policy
    (Orbax persists step metrics only with `best_fn`; without it the best was forgotten and deleted)."""
    state = {"w": jnp.zeros((3,), jnp.float32)}
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
    for step, score in [(1, 0.5), (2, 0.9), (3, None), (4, 0.6)]:
        ckpt.save(step, {"w": state["w"] + step}, {"position": step}, score)
    ckpt.wait()
    ckpt.close()
    again = checkpoint.Checkpointer(str(tmp_path), keep=2)  # a restarted run
    assert again.best_step() == 2
    for step, score in [(5, 0.7), (6, None), (7, 0.1)]:
        again.save(step, {"w": state["w"] + step}, {"position": step}, score)
    again.wait()
    assert again.best_step() == 2 and 2 in again.manager.all_steps()
    assert sorted(again.manager.all_steps())[-2:] == [6, 7]
    target = {"w": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
    restored, data = again.restore(2, target)
    assert float(restored["w"][0]) == 2.0 and data == {"position": 2}
    again.close()


def test_a_changed_config_is_refused_on_resume_and_a_finished_run_is_kept(tmp_path, data_dir):
    """A resume with another total_steps would mislabel the result (the step-10 model reported as step 5);
    rerunning a finished run with its own config returns its results without touching them."""
    workdir = str(tmp_path / "run")
    first = train_and_evaluate(tiny(total_steps=10, eval_every_steps=0), workdir)
    before = open(os.path.join(workdir, "results.json")).read()
    records = len(read_jsonl(os.path.join(workdir, "metrics.jsonl")))
    again = train_and_evaluate(tiny(total_steps=10, eval_every_steps=0, log_every_steps=1), workdir)
    assert again == first and open(os.path.join(workdir, "results.json")).read() == before
    assert len(read_jsonl(os.path.join(workdir, "metrics.jsonl"))) == records
    with pytest.raises(UserError, match=r"different config \(total_steps: saved 10, now 5\)"):
        train_and_evaluate(tiny(total_steps=5, eval_every_steps=0), workdir)
    os.remove(os.path.join(workdir, "results.json"))  # as if killed after the last checkpoint
    with pytest.raises(UserError, match=r"started with a different config \(optimizer.learning_rate"):
        train_and_evaluate(tiny(total_steps=10, eval_every_steps=0, optimizer={"learning_rate": 0.5}), workdir)


def test_workdir_files_of_the_wrong_kind_are_one_line_errors_before_training(tmp_path, data_dir):
    """A directory where a workdir file goes (or a file for `tensorboard`) is refused when the run starts,
    not when it first writes there (results.json: after all the training); unwritable writes name the file."""
    from transferlab import files
    for name, make in (("results.json", os.mkdir), ("metrics.jsonl", os.mkdir), ("config.json", os.mkdir),
                       ("tensorboard", lambda p: open(p, "w").close())):
        workdir = tmp_path / name.replace(".", "_")
        workdir.mkdir()
        make(str(workdir / name))
        kind = "directory" if name == "tensorboard" else "file"
        with pytest.raises(UserError, match=rf"{re.escape(str(workdir / name))} is not a {kind}; move it away"):
            train_and_evaluate(tiny(total_steps=2), str(workdir))
        assert not (workdir / "checkpoints").exists()
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match=r"cannot write .*/taken: Is a directory"):
        files.write_json(str(tmp_path / "taken"), {})
    assert not (tmp_path / "taken.tmp").exists()


def test_a_resume_drops_metrics_lines_that_are_not_utf8(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    train_and_evaluate(tiny(total_steps=10, eval_every_steps=0), workdir)
    os.remove(os.path.join(workdir, "results.json"))
    with open(os.path.join(workdir, "metrics.jsonl"), "ab") as f:
        f.write(b"\xff\xfe torn by a crash\n")
    results = train_and_evaluate(tiny(total_steps=10, eval_every_steps=0), workdir)
    assert results["selected_step"] == 10
    assert all(isinstance(r, dict) for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")))


def test_the_config_guard_survives_a_deleted_or_garbled_config_json(tmp_path, data_dir):
    """Each checkpoint keeps a copy of the run's config: with config.json gone or garbled, a resume (or a
    rerun of a finished run) with another recipe is still refused, and the own recipe still resumes."""
    workdir = str(tmp_path / "run")
    train_and_evaluate(tiny(total_steps=10, eval_every_steps=0), workdir)
    config_json = os.path.join(workdir, "config.json")
    os.remove(config_json)
    with pytest.raises(UserError, match=r"finished with a different config \(total_steps: saved 10, now 5\)"):
        train_and_evaluate(tiny(total_steps=5, eval_every_steps=0), workdir)
    os.remove(os.path.join(workdir, "results.json"))  # as if killed after the last checkpoint
    with open(config_json, "w") as f:
        f.write('{"seed": 0, "optimi')  # garbled by a crash mid-write on a non-atomic filesystem
    with pytest.raises(UserError, match=r"started with a different config \(optimizer.learning_rate"):
        train_and_evaluate(tiny(total_steps=10, eval_every_steps=0, optimizer={"learning_rate": 0.5}), workdir)
    results = train_and_evaluate(tiny(total_steps=10, eval_every_steps=0), workdir)
    assert results["selected_step"] == 10 and json.load(open(config_json))["total_steps"] == 10  # rewritten


def test_a_study_refuses_an_ensemble_evaluated_with_other_members(tmp_path):
    """Changing an ensemble's arms on an old workdir must not report the old ensemble under the new recipe."""
    config = config_lib.load(os.path.join(REPO, "tests/configs/tiny.py"))
    config.study.arms = ({"name": "a", "overrides": {}}, {"name": "b", "overrides": {}})
    config.study.ensembles = ({"name": "e", "arms": ("a",)},)
    ens_dir = tmp_path / "e" / "seed_0"
    ens_dir.mkdir(parents=True)
    (ens_dir / "results.json").write_text(json.dumps({"members": [str(tmp_path / "a" / "seed_0"),
                                                                  str(tmp_path / "b" / "seed_0")]}))
    trained = []
    with pytest.raises(ConfigError, match=r"study.ensembles\[0\] \(e\) seed 0: .* evaluated with other members "
                                          r"\(a, b\)"):
        study.run_study(config, str(tmp_path), lambda cfg, d: trained.append(d))
    assert trained == []


@pytest.mark.parametrize("arm_b, message", [
    ({"seeds": (0,)}, r"arms 'a' and 'b' run different seeds \(\[0, 1\] and \[0\]\)"),
    ({"overrides": {"dataset.name": "mnist5k"}}, r"arms 'a' and 'b' have different dataset.name \('digits' and 'mnist5k'\)"),
    ({"overrides": {"dataset.eval_split": "train[:10%]"}}, r"arms 'a' and 'b' have different dataset.eval_split"),
])
def test_a_study_refuses_an_ensemble_of_arms_that_do_not_match(tmp_path, arm_b, message):
    """An ensemble averages its arms per seed on one dataset's splits: arms with other seeds (a 1-member
    'ensemble' for some seed) or another dataset (a shape error after all the training) fail first."""
    config = config_lib.load(os.path.join(REPO, "tests/configs/tiny.py"))
    config.study.seeds = (0, 1)
    config.study.arms = ({"name": "a", "overrides": {}}, {"name": "b", **arm_b})
    config.study.ensembles = ({"name": "e", "arms": ("a", "b")},)
    trained = []
    with pytest.raises(ConfigError, match=r"study.ensembles\[0\] \(e\): " + message):
        study.run_study(config, str(tmp_path), lambda cfg, d: trained.append(d))
    assert trained == []
    config.study.arms = ({"name": "a", "seeds": (3, 4)}, {"name": "b", "seeds": (4, 3)})  # same seeds: fine
    study.check_ensembles(config, study.resolve_arms(config, str(tmp_path)))


def test_a_study_checks_existing_teacher_and_init_checkpoints_before_anything_trains(tmp_path, data_dir):
    """A later arm whose teacher (or init) checkpoint is of another architecture fails, naming the arm,
    before the first arm trains (checked on the checkpoint's metadata; no array is read)."""
    teacher_dir = str(tmp_path / "mlp32")
    train_and_evaluate(tiny(total_steps=2, eval_every_steps=0), teacher_dir)
    config = config_lib.load(os.path.join(REPO, "tests/configs/tiny.py"))
    kd = {"task": "kd", "teacher.name": "mlp", "teacher.kwargs": {"hidden_sizes": (16,)},
          "teacher.checkpoint": teacher_dir, "distill.terms": ({"name": "kd"},)}
    for overrides, message in ((kd, r"study.arms\[1\] \(b\): teacher.checkpoint: .* do not match the "
                                    r"configured model .* that run trained mlp"),
                               ({"init_checkpoint": teacher_dir, "model.kwargs": {"hidden_sizes": (8,)}},
                                r"study.arms\[1\] \(b\): config key 'init_checkpoint': .* do not match")):
        config.study.arms = ({"name": "a", "overrides": {}}, {"name": "b", "overrides": overrides})
        trained = []
        with pytest.raises(ConfigError, match=message):
            study.run_study(config, str(tmp_path / "study"), lambda cfg, d: trained.append(d), train.check_config)
        assert trained == []
    empty = tmp_path / "study" / "t" / "seed_0" / "checkpoints"  # a teacher arm killed before its first save:
    empty.mkdir(parents=True)                                     # it trains again first, the check passes
    config.study.arms = ({"name": "t", "overrides": {}},
                         {"name": "b", "overrides": {**kd, "teacher.checkpoint": "{workdir}/t/seed_0"}})
    study.check_arms(config, study.resolve_arms(config, str(tmp_path / "study")), str(tmp_path / "study"),
                     train.check_config)
    kd["teacher.kwargs"] = {"hidden_sizes": (32,)}  # the teacher's own architecture: checks pass
    config.study.arms = ({"name": "b", "overrides": kd},)
    study.check_arms(config, study.resolve_arms(config, str(tmp_path / "study")), str(tmp_path / "study"),
                     train.check_config)


def test_a_study_refuses_a_finished_run_of_another_recipe(tmp_path):
    """Rerunning a study on its workdir with other arguments (steps=) must not average old and new runs."""
    config = config_lib.load(os.path.join(REPO, "tests/configs/tiny.py"))
    config.study.arms = ({"name": "a", "overrides": {}},)
    config.study.seeds = (0, 1)
    run_dir = tmp_path / "a" / "seed_0"
    run_dir.mkdir(parents=True)
    old = config_lib.to_plain(study.resolve_arms(config, str(tmp_path))[0][2])
    old["total_steps"] = 60
    (run_dir / "config.json").write_text(json.dumps(old))
    (run_dir / "results.json").write_text("{}")
    trained = []
    with pytest.raises(ConfigError, match=r"a seed 0: .* different config \(total_steps: saved 60, now"):
        study.run_study(config, str(tmp_path), lambda cfg, d: trained.append(d))
    assert trained == []
    old["total_steps"] = config.total_steps
    old["study"] = {"seeds": [0, 1, 2]}  # the study's own section is not compared
    (run_dir / "config.json").write_text(json.dumps(old))
    out = study.run_study(config, str(tmp_path), lambda cfg, d: (trained.append(d), {"preempted_at_step": 1})[1])
    assert [os.path.relpath(d, tmp_path) for d in trained] == [os.path.join("a", "seed_1")] and out


def test_a_study_checks_every_runs_checkpoint_inputs_before_training(tmp_path):
    """A KD arm reading `teacher/seed_{seed}` for a seed the teacher arm never trains, or a mistyped
    directory, fails before the first arm trains."""
    config = config_lib.load(os.path.join(REPO, "tests/configs/tiny.py"))
    kd = {"task": "kd", "teacher.name": "mlp", "distill.terms": ({"name": "kd"},)}
    config.study.seeds = (0, 1)
    for path, culprit in [("{workdir}/teacher/seed_{seed}", "kd) seed 1: teacher.checkpoint"),
                          ("{workdir}/teachr/seed_0", "kd) seed 0: teacher.checkpoint")]:
        config.study.arms = ({"name": "teacher", "overrides": {}, "seeds": (0,)},
                             {"name": "kd", "overrides": {**kd, "teacher.checkpoint": path}})
        trained = []
        with pytest.raises(ConfigError, match=re.escape(culprit)):
            study.run_study(config, str(tmp_path), lambda cfg, d: trained.append(d))
        assert trained == []


def test_study_placeholders_are_replaced_in_nested_values_too(tmp_path):
    """`{workdir}`/`{seed}` inside a list of dicts (an extra teacher's checkpoint) as in a plain string."""
    config = config_lib.load(os.path.join(REPO, "tests/configs/tiny.py"))
    config.study.seeds = (0, 1)
    kd = {"task": "kd", "teacher.name": "mlp", "teacher.checkpoint": "{workdir}/t1/seed_{seed}",
          "extra_teachers": ({"name": "mlp", "checkpoint": "{workdir}/t2/seed_{seed}"},),
          "distill.terms": ({"name": "kd"},)}
    config.study.arms = ({"name": "t1", "overrides": {}}, {"name": "t2", "overrides": {}},
                         {"name": "kd", "overrides": kd})
    runs = study.resolve_arms(config, str(tmp_path))
    study.check_run_inputs(config, runs, str(tmp_path))  # every input is written by an earlier arm
    extra = {seed: dict(cfg.extra_teachers[0])["checkpoint"] for arm, seed, cfg in runs if arm == "kd"}
    assert extra == {s: os.path.join(str(tmp_path), "t2", f"seed_{s}") for s in (0, 1)}


def test_split_slices_select_the_examples_and_overlaps_are_noted(tmp_path, data_dir, capfd):
    """A validation slice held out of train (`train[:80%]` / `train[80%:]`) is disjoint: no note; an
    eval slice that overlaps the train slice is noted when the run starts; CRD's bank is the slice's size."""
    held_out = Trainer(tiny(dataset={"train_split": "train[:80%]", "eval_split": "train[80%:]"}), str(tmp_path / "a"))
    assert held_out.split_notes == []
    terms = ({"name": "crd", "embed_dim": 8, "num_negatives": 16},)
    overlapping = tiny(dataset={"train_split": "train[:80%]", "eval_split": "train[70%:]"}, task="kd",
                       teacher={"name": "mlp", "checkpoint": "random"}, distill={"terms": terms}, total_steps=2,
                       eval_every_steps=0)
    trainer = Trainer(overlapping, str(tmp_path / "b"))
    assert trainer.task.num_train_examples == data.split_size("digits", "train[:80%]", data_dir)
    trainer.run()
    shared = data.shared_examples("digits", "train[:80%]", "train[70%:]", data_dir)
    assert shared > 100 and (f"[note] dataset.eval_split 'train[70%:]' shares {shared} examples with "
                             "dataset.train_split 'train[:80%]'") in capfd.readouterr().err


def test_best_selection_on_examples_of_the_test_split_is_refused(tmp_path, data_dir):
    """selection='best' must not pick the model on test data, however the splits are written: an eval split
    that shares examples with test_split is one line; disjoint slices of one split are fine."""
    with pytest.raises(ConfigError, match="'train\\[90%:\\]' shares 126 examples with dataset.test_split"):
        Trainer(tiny(selection="best", dataset={"train_split": "train[:80%]", "eval_split": "train[90%:]",
                                                "test_split": "train[88%:]"}), str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="shares 180 examples"):
        Trainer(tiny(selection="best", dataset={"eval_split": "validation", "test_split": "validation"}),
                str(tmp_path / "b"))
    Trainer(tiny(selection="best", dataset={"train_split": "train[:80%]", "eval_split": "train[80%:90%]",
                                            "test_split": "train[90%:]"}), str(tmp_path / "c"))


def test_main_run_in_process_leaves_no_stop_behind(tmp_path, data_dir, monkeypatch):
    """`main.run` called twice from one process (a notebook): a stop signal of the first run must not stop the
    second at its first step, and the signal handlers are the caller's own again afterwards."""
    from transferlab import main
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    tiny_cfg = os.path.join(REPO, "tests", "configs", "tiny.py")
    monkeypatch.setattr(train, "_FAULT_TERM_AT_STEP", 8)  # a SIGTERM to this process after step 8
    assert main.run(["--config", tiny_cfg, "--workdir", str(tmp_path / "a"), *TINY_CLI]) == 0
    assert not (tmp_path / "a" / "results.json").exists()  # stopped, resumable
    monkeypatch.setattr(train, "_FAULT_TERM_AT_STEP", 0)
    assert main.run(["--config", tiny_cfg, "--workdir", str(tmp_path / "b"), *TINY_CLI]) == 0
    assert json.load(open(tmp_path / "b" / "results.json"))["selected_step"] == 24
    assert {s: signal.getsignal(s) for s in before} == before


def test_main_run_in_process_uses_each_runs_own_compilation_cache(tmp_path, data_dir, monkeypatch):
    """JAX sets its persistent cache up once per process: a notebook's second `main.run` must write into its own
    workdir's xla_cache, and a run without `xla_cache_dir` into none."""
    from transferlab import main
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    previous = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    tiny_cfg = os.path.join(REPO, "tests", "configs", "tiny.py")
    cache = ["--config.xla_cache_dir=xla_cache"]
    try:
        counts = []
        for name, steps, extra in (("a", 8, cache), ("b", 12, cache), ("c", 16, [])):  # other programs each time
            assert main.run(["--config", tiny_cfg, "--workdir", str(tmp_path / name), *TINY_CLI,
                             f"--config.total_steps={steps}", *extra]) == 0
            counts.append({n: len(os.listdir(tmp_path / n / "xla_cache")) for n in "ab"
                           if (tmp_path / n / "xla_cache").exists()})
        assert counts[0]["a"] and counts[1]["b"] and counts[1]["a"] == counts[0]["a"] and counts[2] == counts[1]
        assert not (tmp_path / "c" / "xla_cache").exists()
    finally:
        main._use_compilation_cache("", str(tmp_path))  # this test process without a cache again
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)
    assert jax.config.jax_compilation_cache_dir is None


def test_the_python_api_validates_a_hand_built_config_and_refuses_a_study(tmp_path):
    """A notebook may build its config from defaults() (never validated) or pass a study's config to
    train_and_evaluate (which trains one run): both are one-line config errors, nothing trains."""
    config = config_lib.defaults()
    config.dataset.name, config.optimizer.learning_rate = "digits", -1.0
    with pytest.raises(ConfigError, match="'optimizer.learning_rate' must be >= 0, got -1.0"):
        train_and_evaluate(config, str(tmp_path / "a"))
    study = config_lib.from_dict({"dataset": {"name": "digits"}, "study": {"arms": ({"name": "a"},)}})
    with pytest.raises(ConfigError, match="'study.arms': this config is a study of several runs"):
        train_and_evaluate(study, str(tmp_path / "b"))
    assert not os.listdir(tmp_path)


def test_a_second_ctrl_c_inside_a_checkpoint_save_logs_no_traceback(caplog):
    """Orbax logs the KeyboardInterrupt a second Ctrl-C raises inside its save wait, traceback and all
    (found by a kill-and-resume audit); the CLI drops such records and keeps other errors."""
    from absl import logging as absl_logging
    from transferlab import main
    main._quiet_library_warnings()
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        absl_logging.exception("Save Finalize thread (save_finalize) failed.")
    try:
        raise ValueError("a real failure")
    except ValueError:
        absl_logging.exception("something else failed")
    logged = [r.getMessage() for r in caplog.records]
    assert logged == ["something else failed"], logged


def test_a_checkpoint_that_cannot_be_written_is_one_line(tmp_path):
    """Disk full during an async save (seen on a 1 MB tmpfs: ~470 traceback lines from Orbax's threads and
    the main thread, exit 1): the one-line error, and Orbax's logged tracebacks of it are dropped."""
    import logging

    from transferlab.errors import UserError
    from transferlab.main import _filter_library_logs
    full = ValueError('RESOURCE_EXHAUSTED: Error writing "opt_state.0" in OCDBT database: No space left on device')
    assert checkpoint.is_write_failure(full) and checkpoint.is_write_failure(OSError(28, "No space left on device"))
    chained = RuntimeError("save failed")
    chained.__cause__ = full
    assert checkpoint.is_write_failure(chained) and not checkpoint.is_write_failure(ValueError("shape mismatch"))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "run"))

    class Failing:
        def wait_until_finished(self):
            raise full

        def close(self):
            raise ValueError("something else")

    real, ckpt.manager = ckpt.manager, Failing()
    with pytest.raises(UserError, match=r"checkpoints in .*/run/checkpoints cannot be written \(ValueError: "
                                        r"RESOURCE_EXHAUSTED.*rerun the same command to resume from the latest"):
        ckpt.wait()
    with pytest.raises(ValueError, match="something else"):  # not a write failure: not ours to rephrase
        ckpt.close()
    real.close()
    try:
        raise full
    except ValueError:
        import sys
        logged = logging.LogRecord("absl", logging.ERROR, "f", 1, "[process=0] _SignalingThread.run() raised an "
                                   "exception: %s", (str(full),), sys.exc_info())
    assert not _filter_library_logs(logged)
    other = logging.LogRecord("absl", logging.ERROR, "f", 1, "a real error", (), None)
    assert _filter_library_logs(other)


def test_a_damaged_step_metadata_file_is_one_note(capsys):
    """Orbax logs a garbled _CHECKPOINT_METADATA (with the file's content, so several lines) at each read,
    and resumes fine without it: one [note] line instead."""
    import logging

    from transferlab.main import _filter_library_logs
    record = lambda: logging.LogRecord(  # noqa: E731
        "absl", logging.ERROR, "f", 1, "Failed to json parse Metadata file: %s, file content: %s, error: %s",
        ("/w/checkpoints/16/_CHECKPOINT_METADATA", '{"item_handlers": {"\nmore', "Unterminated string"), None)
    assert not _filter_library_logs(record()) and not _filter_library_logs(record())
    err = capsys.readouterr().err
    assert err.count("[note] /w/checkpoints/16/_CHECKPOINT_METADATA is damaged; Orbax ignores it") == 1


def test_a_malformed_fault_hook_is_one_line(monkeypatch):
    from transferlab.errors import UserError
    monkeypatch.setenv("TRANSFERLAB_FAULT_TERM_AT", "5")
    with pytest.raises(UserError, match=r"\$TRANSFERLAB_FAULT_TERM_AT='5': expected STEP:PROCESS"):
        train._fault_hook("TRANSFERLAB_FAULT_TERM_AT", "STEP:PROCESS")
    monkeypatch.setenv("TRANSFERLAB_FAULT_TERM_AT", "7:1")
    assert train._fault_hook("TRANSFERLAB_FAULT_TERM_AT", "STEP:PROCESS") == [7, 1]
    monkeypatch.delenv("TRANSFERLAB_FAULT_TERM_AT")
    assert train._fault_hook("TRANSFERLAB_FAULT_TERM_AT", "STEP:PROCESS") == [0, 0]
