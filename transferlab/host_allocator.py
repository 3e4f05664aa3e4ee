"""The host memory allocator of CPU runs: mimalloc, preloaded by re-executing the command line.

Why: XLA:CPU allocates each step's temporary buffer (~120 MB for a resnet20 training step at batch
64) and Eigen's convolution packing buffers afresh on every call. glibc serves allocations that big
with new `mmap`s and unmaps them on `free`, so every step page-faults (~29,000 minor faults) and
zeroes them again; on a 2-core host that is ~15% of the step. mimalloc (Leijen, Zorn & de Moura,
"Mimalloc: Free List Sharding in Action", 2019) keeps freed segments mapped and reuses them. glibc's
own knobs cannot do the same here: its per-thread arenas are capped at 64 MB, so the temp buffer only
stays mapped with a single arena, which slows the worker threads' small allocations (bench/).

A preload must be in place before the process starts, so the CLI (`python -m transferlab.main`)
re-executes itself once with `LD_PRELOAD` naming the mimalloc that `cmeel-mimalloc` installs. Only
on Linux, only when JAX will run on the CPU (no CUDA/ROCm/TPU plugin installed, or `JAX_PLATFORMS`
says `cpu`), and `TRANSFERLAB_ALLOCATOR=system` turns it off. Numerics are unaffected.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys

from transferlab.errors import UserError

CHOICE_ENV = "TRANSFERLAB_ALLOCATOR"
CHOICES = ("mimalloc", "system")
_ACCELERATOR_DISTRIBUTIONS = re.compile(r"^(jax[-_](cuda|rocm)\d*[-_](plugin|pjrt)|libtpu)", re.IGNORECASE)


class AllocatorChoiceError(UserError):
    """$TRANSFERLAB_ALLOCATOR holds neither of CHOICES."""


def mimalloc_path() -> str | None:
    """The shared library installed by the `cmeel-mimalloc` package, or None if it is not installed."""
    try:
        path = importlib.metadata.distribution("cmeel-mimalloc").locate_file("cmeel.prefix/lib/libmimalloc.so")
    except importlib.metadata.PackageNotFoundError:
        return None
    return str(path) if os.path.exists(path) else None


def runs_on_cpu(environ) -> bool:
    """Whether JAX will run on the CPU: `JAX_PLATFORMS` names it first, or no CUDA/ROCm/TPU plugin is installed."""
    platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    names = (dist.metadata.get("Name") or "" for dist in importlib.metadata.distributions())
    return not any(_ACCELERATOR_DISTRIBUTIONS.match(name) for name in names)


def choice(environ=None) -> str:
    """'mimalloc' (the default) or 'system', from $TRANSFERLAB_ALLOCATOR."""
    environ = os.environ if environ is None else environ
    value = environ.get(CHOICE_ENV, "mimalloc").strip().lower() or "mimalloc"
    if value not in CHOICES:
        raise AllocatorChoiceError(f"{CHOICE_ENV}={environ[CHOICE_ENV]!r}: expected one of {', '.join(CHOICES)}")
    return value


def preload_entries(environ=None) -> list[str]:
    """The libraries $LD_PRELOAD names (the loader accepts colons and whitespace between them)."""
    environ = os.environ if environ is None else environ
    return [p for p in re.split(r"[:\s]+", environ.get("LD_PRELOAD", "")) if p]


def is_mimalloc(library: str) -> bool:
    return "libmimalloc" in os.path.basename(library)


def preloaded(environ=None) -> bool:
    return any(is_mimalloc(p) for p in preload_entries(environ))


def preload_environment(environ=None) -> dict | None:
    """The environment to re-execute with (mimalloc preloaded), or None when nothing is to be done."""
    environ = dict(os.environ if environ is None else environ)
    if (not sys.platform.startswith("linux") or choice(environ) != "mimalloc" or preloaded(environ)
            or not runs_on_cpu(environ)):
        return None
    library = mimalloc_path()
    if library is None:
        return None
    environ["LD_PRELOAD"] = " ".join([library, *preload_entries(environ)])
    return environ


def reexec_with_mimalloc() -> None:
    """Replace this process by the same command line with mimalloc preloaded (no-op when not wanted).

    Call it first thing in a command-line entry point, before JAX is imported; never in a notebook.
    """
    environ = preload_environment()
    if environ is None:
        return
    argv = list(getattr(sys, "orig_argv", [])) or [sys.executable, *sys.argv]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], environ)
    except OSError:  # e.g. no usable sys.executable: run on with the system allocator
        return
