"""Export: a run's deployable model only (connectors, joint heads, optimizer state dropped)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from transferlab import checkpoint, config as config_lib, data, export
from transferlab.tasks import common
from transferlab.train import Trainer, train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fitnet_run(tmp_path):
    """A 4-step KD run on digits whose FitNet term trains a student-side connector."""
    cfg = config_lib.from_dict({
        "task": "kd", "dataset": {"name": "digits"}, "total_steps": 4, "batch_size": 32, "eval_batch_size": 64,
        "log_every_steps": 2, "eval_every_steps": 0, "checkpoint_every_steps": 4,
        "schedule": {"name": "constant"}, "optimizer": {"learning_rate": 0.05},
        "model": {"name": "mlp", "kwargs": {"hidden_sizes": (16,)}},
        "teacher": {"name": "mlp", "checkpoint": "random", "kwargs": {"hidden_sizes": (32,)}},
        "distill": {"terms": ({"name": "fitnet", "weight": 1.0, "student_tap": "features",
                               "teacher_tap": "features", "connector": "linear"},)}})
    run = str(tmp_path / "run")
    train_and_evaluate(cfg, run)
    return cfg, run


def test_export_keeps_only_the_student_and_reproduces_its_logits(tmp_path, data_dir):
    cfg, run = _fitnet_run(tmp_path)
    out = str(tmp_path / "exported")
    info = export.export(run, out)
    assert info["name"] == "mlp" and info["num_classes"] == 10 and info["step"] == 4
    module, variables = export.load(out)

    trainer = Trainer(cfg, run)
    ckpt = checkpoint.Checkpointer(run, read_only=True)
    state, _ = ckpt.restore(4, checkpoint.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings))
    ckpt.close()
    assert "connectors" in state["params"]  # the run trained one ...
    assert set(variables) == {"params"} and "connectors" not in variables["params"]  # ... the export has none
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), variables["params"],
                 jax.device_get(state["params"]["model"]))
    images = np.asarray(next(trainer.train_iterator())["image"])
    expected = common.forward(trainer.task.model, state["params"]["model"], state["model_state"]["model"],
                              images, train=False)[0]
    np.testing.assert_allclose(module.apply(variables, images, train=False), expected, rtol=1e-6, atol=1e-6)

    # Raw uint8 test images through `export.preprocess` reproduce the run's own test accuracy.
    source = data.get_source("digits", "test", data_dir)
    records = [source[i] for i in range(len(source))]
    raw = np.stack([r["image"] for r in records])
    labels = np.asarray([r["label"] for r in records])
    assert raw.dtype == np.uint8
    logits = module.apply(variables, export.preprocess(out, raw), train=False)
    with open(os.path.join(run, "results.json")) as f:
        test_accuracy = json.load(f)["test"]["accuracy"]
    assert abs(float(np.mean(np.argmax(logits, -1) == labels)) - test_accuracy) < 1e-6

    # An export reads the student alone: a run trained on a mesh this machine lacks (a pod run exported on a
    # laptop), under settings today's checks refuse (one teacher with 'adaptive') or keys they no longer know,
    # exports the same variables.
    with open(os.path.join(run, "config.json"), encoding="utf-8") as f:
        resolved = json.load(f)
    resolved["mesh_shape"] = f"data={2 * jax.device_count()}"
    resolved["distill"]["teacher_combination"] = "adaptive"
    resolved["distill"]["hard_augment"]["gradient_reversal"] = True  # a key an earlier version had
    with open(os.path.join(run, "config.json"), "w", encoding="utf-8") as f:
        json.dump(resolved, f)
    export.export(run, str(tmp_path / "again"))
    jax.tree.map(np.testing.assert_array_equal, export.load(str(tmp_path / "again"))[1], variables)


def test_export_cli_errors_are_one_line_exit_2(tmp_path, data_dir):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "transferlab.export", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "TFDS_DATA_DIR": data_dir})

    missing = cli("--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "x"))
    assert missing.returncode == 2 and "config.json" in missing.stderr and len(missing.stderr.splitlines()) == 1
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    (tmp_path / "nope").mkdir()
    (tmp_path / "nope" / "config.json").write_text(json.dumps({}))
    busy = cli("--workdir", str(tmp_path / "nope"), "--out", str(occupied))
    assert busy.returncode == 2 and "not empty" in busy.stderr and len(busy.stderr.splitlines()) == 1
    assert (occupied / "keep.txt").read_text() == "mine"
    for out in (occupied / "keep.txt", occupied / "keep.txt" / "sub"):  # a file, a path under a file
        bad = cli("--workdir", str(tmp_path / "nope"), "--out", str(out))
        assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "--out" in bad.stderr, bad.stderr
    assert (occupied / "keep.txt").read_text() == "mine"
    garbled = tmp_path / "garbled"  # config.json damaged and no checkpoint holding a copy
    garbled.mkdir()
    (garbled / "config.json").write_text('{"garbage')
    bad = cli("--workdir", str(garbled), "--out", str(tmp_path / "g_out"))
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "cannot be read" in bad.stderr, bad.stderr
    assert not (tmp_path / "g_out").exists()  # nothing created for a failed export
    unrun = tmp_path / "unrun"  # a readable config, no checkpoint: found after --out was created
    unrun.mkdir()
    (unrun / "config.json").write_text(json.dumps({"dataset": {"name": "digits"}, "model": {"name": "mlp"}}))
    bad = cli("--workdir", str(unrun), "--out", str(tmp_path / "u_out" / "a" / "b"))
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "checkpoint" in bad.stderr, bad.stderr
    assert not (tmp_path / "u_out").exists()  # nor the parents it made


def test_export_reads_the_checkpoints_config_when_config_json_is_damaged(tmp_path, data_dir):
    run = str(tmp_path / "run")
    train_and_evaluate(config_lib.from_dict({"dataset": {"name": "digits"}, "model": {"name": "mlp"},
                                             "total_steps": 4, "batch_size": 32}), run)
    with open(os.path.join(run, "config.json"), "w") as f:
        f.write("[1, 2]")
    info = export.export(run, str(tmp_path / "out"))
    assert info["name"] == "mlp" and info["step"] == 4


def test_a_dml_run_exports_any_of_its_students(tmp_path, data_dir):
    from transferlab.errors import UserError
    cfg = config_lib.from_dict({
        "task": "dml", "dataset": {"name": "digits"}, "total_steps": 2, "batch_size": 32, "eval_batch_size": 64,
        "log_every_steps": 2, "eval_every_steps": 0, "checkpoint_every_steps": 2,
        "model": {"name": "mlp", "kwargs": {"hidden_sizes": (16,)}},
        "dml": {"num_students": 3, "peers": ({"name": "mlp", "kwargs": {"hidden_sizes": (8, 8)}},)}})
    run = str(tmp_path / "dml")
    train_and_evaluate(cfg, run)
    trainer = Trainer(cfg, run)
    ckpt = checkpoint.Checkpointer(run, read_only=True)
    state, _ = ckpt.restore(2, checkpoint.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings))
    ckpt.close()
    for student, key, hidden in ((0, "model", [16]), (1, "peer1", [8, 8]), (2, "peer2", [16])):  # peer2: a copy
        info = export.export(run, str(tmp_path / f"s{student}"), student=student)
        assert info["student"] == key and info["kwargs"]["hidden_sizes"] == hidden
        _, variables = export.load(str(tmp_path / f"s{student}"))
        jax.tree.map(np.testing.assert_array_equal, variables["params"], jax.device_get(state["params"][key]))
    # a DML init_checkpoint's mismatch names the saved student it compared with (it named student 0's model)
    assert checkpoint._trained_as(run, "peer1") == "; that run's peer1 was mlp {'hidden_sizes': [8, 8]} on digits"
    assert checkpoint._trained_as(run, "peer2") == "; that run's peer2 was mlp {'hidden_sizes': [16]} on digits"
    with pytest.raises(UserError, match=r"--student 3: out of range .*its 3 DML students are 0-2"):
        export.export(run, str(tmp_path / "s3"), student=3)
    assert not (tmp_path / "s3").exists()
    _, single = _fitnet_run(tmp_path)
    with pytest.raises(UserError, match=r"--student 1: out of range .*a 'kd' run has one student, 0"):
        export.export(single, str(tmp_path / "k1"), student=1)


def test_exporting_a_study_names_its_runs(tmp_path):
    from transferlab.errors import UserError
    for arm in ("teacher", "student"):
        (tmp_path / "study" / arm / "seed_0").mkdir(parents=True)
        (tmp_path / "study" / arm / "seed_0" / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"is a study's directory; export one of its runs \(student/seed_0, "
                                        r"teacher/seed_0\)"):
        export.export(str(tmp_path / "study"), str(tmp_path / "out"))
    with pytest.raises(UserError, match=r"is a study arm's directory; export one of its runs \(seed_0\)"):
        export.export(str(tmp_path / "study" / "teacher"), str(tmp_path / "out"))
