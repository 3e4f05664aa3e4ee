"""Two processes x 4 CPU devices through jax.distributed, as on a pod: train, checkpoint, resume."""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_two_processes_train_and_resume(tmp_path, data_dir):
    env = {**os.environ, "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=", "PYTHON": sys.executable}

    def launch(workdir, steps, **extra_env):
        args = ["bash", "launch/local.sh", "2", "4", "--config", "tests/configs/tiny.py", "--workdir", workdir,
                f"--config.total_steps={steps}", "--config.checkpoint_every_steps=6",
                "--config.eval_every_steps=6", "--config.log_every_steps=6", "--config.mesh_shape=data=4,fsdp=2"]
        return subprocess.run(args, cwd=REPO, env={**env, **extra_env}, capture_output=True, text=True, timeout=300)

    straight = str(tmp_path / "straight")
    proc = launch(straight, 12)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.load(open(os.path.join(straight, "results.json")))
    assert results["test"]["count"] == 360  # every test example counted once across both processes
    config = json.load(open(os.path.join(straight, "config.json")))
    assert config["_versions"]["processes"] == 2 and config["_versions"]["devices"].startswith("8 x")

    # One host's preemption notice (process 1 sends itself SIGTERM after step 2): JAX spreads it, both
    # processes stop at the same step (else the collective save would hang), save, and exit 0.
    workdir = str(tmp_path / "mp")
    proc = launch(workdir, 12, TRANSFERLAB_FAULT_TERM_AT="2:1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("stopped (SIGTERM) at step") == 2, proc.stdout[-2000:]
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    stopped = [r["step"] for r in records if r.get("event", "").startswith("stopped (SIGTERM)")]
    assert len(stopped) == 1 and os.path.isdir(os.path.join(workdir, "checkpoints", str(stopped[0])))
    proc = launch(workdir, 12)  # the same command resumes, and ends bitwise as the run that never stopped
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert any(r.get("event") == "resumed" and r["step"] == stopped[0] for r in records)
    resumed = json.load(open(os.path.join(workdir, "results.json")))
    assert resumed["selected_step"] == 12
    assert resumed["test"] == results["test"] and resumed["validation"] == results["validation"]


STUDY = '''
import ml_collections
def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.dataset = {"name": "digits"}
    c.model = {"name": "mlp", "kwargs": {"hidden_sizes": (32,)}}
    c.total_steps, c.batch_size, c.eval_batch_size, c.log_every_steps = 4, 32, 64, 2
    c.study = {"arms": ({"name": "a", "overrides": {}}, {"name": "b", "overrides": {"optimizer.learning_rate": 0.01}})}
    return c
'''


def test_a_preemption_notice_stops_a_multi_process_study_and_the_rerun_finishes_it(tmp_path, data_dir):
    """The notice (process 1, after step 2 of the first run) reaches its sync point in that run or, if the run
    ends first, after the first step of the next run: either way every process stops at the same step."""
    (tmp_path / "study.py").write_text(STUDY)
    workdir = str(tmp_path / "study")
    env = {**os.environ, "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=", "PYTHON": sys.executable}

    def launch(**extra_env):
        args = ["bash", "launch/local.sh", "2", "2", "--config", str(tmp_path / "study.py"), "--workdir", workdir]
        return subprocess.run(args, cwd=REPO, env={**env, **extra_env}, capture_output=True, text=True, timeout=300)

    proc = launch(TRANSFERLAB_FAULT_TERM_AT="2:1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("stopped (SIGTERM) at step") == 2, proc.stdout[-2000:]
    assert not os.path.exists(os.path.join(workdir, "b", "seed_0", "results.json"))
    proc = launch()
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = open(os.path.join(workdir, "results.md")).read()
    assert "| a | mlp |" in table and "| b | mlp |" in table
    assert proc.stdout.count("| a | mlp |") == 1  # process 0 alone writes and prints the report (two raced)


def test_slurm_script_requeues_a_run_stopped_before_its_time_limit(tmp_path):
    """launch/slurm.sbatch with stand-ins for srun and scontrol: a run without results.json after srun
    returned 0 (SIGTERM before the time limit) is requeued; a finished one is not."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*"\n')
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_SUBMIT_DIR": REPO}
    workdir = tmp_path / "run"

    def submit(*workdir_args):
        return subprocess.run(["bash", "launch/slurm.sbatch", "--config", "experiments/kd/quickstart.py",
                               *workdir_args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)

    stopped = submit("--workdir", str(workdir))
    assert stopped.returncode == 0 and stopped.stdout.splitlines()[-1] == "scontrol requeue 42", stopped.stdout
    workdir.mkdir()
    (workdir / "results.json").write_text("{}")
    finished = submit(f"--workdir={workdir}")
    assert finished.returncode == 0 and "scontrol" not in finished.stdout


def test_tpu_pod_script_runs_the_pinned_jax_and_passes_the_arguments_through(tmp_path):
    """launch/tpu_pod.sh with a stand-in gcloud: the remote command installs jax[tpu] at requirements.txt's
    version and hands the CLI its arguments intact (a space in a path too)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    (bin_dir / "gcloud").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "launch/tpu_pod.sh", "my-tpu", "us-central2-b", "--config",
                           "experiments/kd/quickstart.py", "--workdir", "/mnt/b/run 1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    remote = proc.stdout.splitlines()[-1]  # the --command value, as the workers' shell gets it
    out = subprocess.run(["bash", "-c", remote.replace("cd ~/transferlab && (test -d .venv || make setup) && ", "")
                          .replace(".venv/bin/pip install -q", "echo pip")
                          .replace(".venv/bin/python -m transferlab.main", "printf '[%s]' ")],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    jax_pin = next(line.split("==")[1] for line in open(os.path.join(REPO, "requirements.txt"))
                   if line.startswith("jax=="))
    assert out.stdout.splitlines() == [f"pip jax[tpu]=={jax_pin.strip()}", "[--distributed][--config]"
                                       "[experiments/kd/quickstart.py][--workdir][/mnt/b/run 1]"], out


def test_processes_given_different_configs_stop_with_one_line(tmp_path, data_dir):
    """Processes of one run with different arguments would hang in a collective (SIGTERM cannot end that):
    every process exits 2 with one line right after jax.distributed starts, and no workdir is made."""
    import random
    port = 20000 + random.randrange(20000)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    workdir = str(tmp_path / "run")
    procs = [subprocess.Popen([sys.executable, "-m", "transferlab.main", "--config", "tests/configs/tiny.py",
                               "--workdir", workdir, f"--config.total_steps={steps}",
                               "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
                               "--process_id", str(i)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i, steps in enumerate((20, 30))]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs):
        errors = [line for line in err.splitlines() if line.startswith("transferlab: error:")]
        assert p.returncode == 2 and errors == ["transferlab: error: process 1 was given another config or "
                                                "--workdir than process 0; every process of a run needs the "
                                                "same --config, --config.KEY overrides and --workdir"], err[-2000:]
        assert "Traceback" not in err
    assert not os.path.exists(workdir)
