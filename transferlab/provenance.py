"""Where a result came from: code version, software, hardware and host allocator of a run.

Recorded in every run's results.json (`environment`) and summarized above each study table,
so a committed results file says which commit, JAX, devices and allocator produced it.
"""

from __future__ import annotations

import datetime
import os
import subprocess

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(short: bool = True) -> str:
    """The commit of the checkout transferlab runs from, '+dirty' if it has uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], cwd=_ROOT,
                             capture_output=True, text=True, timeout=10)
        if sha.returncode:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_ROOT,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def host_allocator() -> str:
    """'mimalloc' if it is mapped into this process (see transferlab/host_allocator.py), else 'system'."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            return "mimalloc" if any("libmimalloc" in line for line in f) else "system"
    except OSError:
        return "system"


def environment() -> dict:
    import jax

    devices = jax.devices()
    return {
        "git_commit": git_commit(), "jax": jax.__version__, "backend": jax.default_backend(),
        "devices": f"{len(devices)} x {devices[0].device_kind}", "processes": jax.process_count(),
        "host_cpus": os.cpu_count(), "host_cpu": cpu_name(), "host_allocator": host_allocator(),
        "finished_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def summary_line(environments: list[dict]) -> str:
    """One line for a table of several runs: each field's distinct values, in order of appearance."""
    environments = [e for e in environments if e]
    if not environments:
        return "Environment: not recorded."

    def values(key):
        seen = list(dict.fromkeys(str(e.get(key, "?")) for e in environments))
        return " / ".join(seen)

    finished = sorted(str(e.get("finished_utc", "?")) for e in environments)
    return (f"Environment: git {values('git_commit')}; jax {values('jax')} on {values('backend')} "
            f"({values('devices')}, {values('processes')} process(es)); host {values('host_cpus')} CPUs "
            f"({values('host_cpu')}), allocator {values('host_allocator')}; runs finished "
            f"{finished[0]} to {finished[-1]} UTC.")
