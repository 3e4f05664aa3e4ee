"""transferlab.provenance: what each run records about where it ran, and the study table's summary line."""

import re
import subprocess

import jax

from transferlab import host_allocator, provenance


def test_environment_names_commit_software_hardware_and_allocator():
    env = provenance.environment()
    assert re.fullmatch(r"[0-9a-f]{7,}(\+dirty)?|unknown", env["git_commit"])
    # conftest's 8 simulated CPU devices, or the accelerator JAX picked (bench/gpu_check.sh's `suite` stage)
    assert env["backend"] == jax.default_backend() and env["devices"].startswith(f"{jax.device_count()} x ")
    # pytest is not started through the CLI: mimalloc only if whoever ran it preloaded it
    assert env["host_allocator"] == ("mimalloc" if host_allocator.preloaded() else "system")
    # the native conv kernels run on one CPU device only (tests/test_native_conv.py); here there are 8, or a GPU
    assert env["convolutions"] == "XLA (not one CPU device)"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", env["finished_utc"])


def test_summary_line_lists_distinct_values_and_the_time_span():
    base = {"git_commit": "abc1234", "jax": "0.10.2", "backend": "cpu", "devices": "2 x cpu", "processes": 1,
            "host_cpus": 2, "host_cpu": "Xeon", "host_allocator": "mimalloc", "convolutions": "native",
            "finished_utc": "2026-11-26 22:50"}
    later = {**base, "git_commit": "def5678", "finished_utc": "2026-11-26 23:29"}
    line = provenance.summary_line([later, base, None, base])
    assert line.startswith("Environment: git def5678 / abc1234; jax 0.10.2 on cpu (2 x cpu, 1 process(es))")
    assert "allocator mimalloc, convolutions native; runs" in line and line.endswith(
        "runs finished 2026-11-26 22:50 to 2026-11-26 23:29 UTC. Only 3 of the 4 runs recorded theirs "
        "(the others predate the record).")  # the run without a record is counted, not guessed
    assert provenance.summary_line([base]).endswith("UTC.")
    assert provenance.summary_line([None, {}]) == "Environment: not recorded."


def test_git_commit_is_the_commit_the_process_started_with(tmp_path, monkeypatch):
    """A commit made while a long study runs must not be credited with the study's results."""
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "f").write_text("1")
    git("add", "f")
    git("commit", "-qm", "one")
    monkeypatch.setattr(provenance, "_ROOT", str(tmp_path))
    provenance._head.cache_clear()
    try:
        first, first_long = provenance.git_commit(), provenance.git_commit(short=False)
        assert re.fullmatch(r"[0-9a-f]{7,}", first) and first_long.startswith(first) and len(first_long) == 40
        (tmp_path / "f").write_text("2")
        git("commit", "-qam", "two")  # HEAD moves on while "the study runs"
        assert (provenance.git_commit(), provenance.git_commit(short=False)) == (first, first_long)
    finally:
        provenance._head.cache_clear()
