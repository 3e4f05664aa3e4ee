"""Where a result came from: code version, software, hardware, host allocator and conv kernels of a run.

Recorded in every run's results.json (`environment`) and summarized above each study table,
so a committed results file says which commit, JAX, devices and allocator produced it.
"""

from __future__ import annotations

import datetime
import functools
import os
import subprocess

from transferlab import host_allocator as host_allocator_lib

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(short: bool = True) -> str:
    """The commit of the checkout transferlab runs from, '+dirty' if it has uncommitted changes.

    Read once per process (the first call; `python -m transferlab.main` makes it at start), so
    that every run of a long study names the code it imported, not a commit made while it ran.
    """
    full, abbreviated, dirty = _head()
    return (abbreviated if short else full) + ("+dirty" if dirty else "")


@functools.lru_cache(maxsize=None)
def _head() -> tuple[str, str, bool]:
    """(full sha, short sha, has uncommitted changes) of the checkout, read by git once."""
    sha = _git("rev-parse", "HEAD")
    if not sha:
        return "unknown", "unknown", False
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return sha, _git("rev-parse", "--short", sha) or sha[:7], dirty


def _git(*args: str) -> str:
    """`git ARGS` in the checkout's root: its stripped output, '' if git fails or is missing."""
    try:
        out = subprocess.run(["git", *args], cwd=_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


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
            # a maps line ends with the mapped file's path
            return "mimalloc" if any(host_allocator_lib.is_mimalloc(line.split()[-1]) for line in f
                                     if line.strip()) else "system"
    except OSError:
        return "system"


def environment(dtype="float32") -> dict:
    """This process's record; `dtype`: the run's model compute dtype (which convolutions it ran on)."""
    import jax

    from transferlab.models import native_conv

    devices = jax.devices()
    return {
        "git_commit": git_commit(), "jax": jax.__version__, "backend": jax.default_backend(),
        "devices": f"{len(devices)} x {devices[0].device_kind}", "processes": jax.process_count(),
        "host_cpus": os.cpu_count(), "host_cpu": cpu_name(), "host_allocator": host_allocator(),
        "convolutions": native_conv.status(dtype),
        "finished_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def summary_line(environments: list[dict]) -> str:
    """One line for a table of several runs: each field's distinct values, in order of appearance.

    Runs without a record (None: made before results.json recorded one) are counted, not guessed."""
    total = len(environments)
    environments = [e for e in environments if e]
    if not environments:
        return "Environment: not recorded."
    partial = (f" Only {len(environments)} of the {total} runs recorded theirs (the others predate the record)."
               if len(environments) < total else "")

    def values(key):
        seen = list(dict.fromkeys(str(e.get(key, "?")) for e in environments))
        return " / ".join(seen)

    finished = sorted(str(e.get("finished_utc", "?")) for e in environments)
    return (f"Environment: git {values('git_commit')}; jax {values('jax')} on {values('backend')} "
            f"({values('devices')}, {values('processes')} process(es)); host {values('host_cpus')} CPUs "
            f"({values('host_cpu')}), allocator {values('host_allocator')}, convolutions "
            f"{values('convolutions')}; runs finished "
            f"{finished[0]} to {finished[-1]} UTC.{partial}")
