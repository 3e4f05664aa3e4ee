"""transferlab.provenance: what each run records about where it ran, and the study table's summary line."""

import re

from transferlab import host_allocator, provenance


def test_environment_names_commit_software_hardware_and_allocator():
    env = provenance.environment()
    assert re.fullmatch(r"[0-9a-f]{7,}(\+dirty)?|unknown", env["git_commit"])
    assert env["backend"] == "cpu" and env["devices"].startswith("8 x ")  # conftest's 8 simulated devices
    # pytest is not started through the CLI: mimalloc only if whoever ran it preloaded it
    assert env["host_allocator"] == ("mimalloc" if host_allocator.preloaded() else "system")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", env["finished_utc"])


def test_summary_line_lists_distinct_values_and_the_time_span():
    base = {"git_commit": "abc1234", "jax": "0.10.2", "backend": "cpu", "devices": "2 x cpu", "processes": 1,
            "host_cpus": 2, "host_cpu": "Xeon", "host_allocator": "mimalloc", "finished_utc": "2026-11-26 22:50"}
    later = {**base, "git_commit": "def5678", "finished_utc": "2026-11-26 23:29"}
    line = provenance.summary_line([later, base, None, base])
    assert line.startswith("Environment: git def5678 / abc1234; jax 0.10.2 on cpu (2 x cpu, 1 process(es))")
    assert "allocator mimalloc" in line and line.endswith("runs finished 2026-11-26 22:50 to 2026-11-26 23:29 UTC.")
    assert provenance.summary_line([None, {}]) == "Environment: not recorded."
