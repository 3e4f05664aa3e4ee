"""Two processes x 4 CPU devices through jax.distributed, as on a pod: train, checkpoint, resume."""

import json
import os
import shutil
import subprocess
import sys

from conftest import REPO


def test_two_processes_train_and_resume(tmp_path, data_dir):
    workdir = str(tmp_path / "mp")
    env = {**os.environ, "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=", "PYTHON": sys.executable}

    def launch(steps):
        args = ["bash", "launch/local.sh", "2", "4", "--config", "tests/configs/tiny.py", "--workdir", workdir,
                f"--config.total_steps={steps}", "--config.checkpoint_every_steps=6",
                "--config.eval_every_steps=6", "--config.log_every_steps=6", "--config.mesh_shape=data=4,fsdp=2"]
        return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    proc = launch(12)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert results["test"]["count"] == 360  # every test example counted once across both processes
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["_versions"]["processes"] == 2 and config["_versions"]["devices"].startswith("8 x")
    shutil.rmtree(os.path.join(workdir, "checkpoints", "12"))  # as if both processes died after step 6's save
    os.remove(os.path.join(workdir, "results.json"))
    proc = launch(12)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert any(r.get("event") == "resumed" and r["step"] == 6 for r in records)
    resumed = json.load(open(os.path.join(workdir, "results.json")))
    assert resumed["selected_step"] == 12
    assert resumed["test"] == results["test"] and resumed["validation"] == results["validation"]
