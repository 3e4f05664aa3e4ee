"""Compiles, caches and registers transferlab's native XLA:CPU kernels (XLA FFI custom calls).

A kernel's C++ source ships with the package and is compiled on first use with the machine's C++ compiler
(`$CXX`, else g++, c++ or clang++) for the machine's own CPU (`-march=native`), against the XLA FFI headers
that jaxlib ships, into `$TRANSFERLAB_KERNEL_CACHE` (default `~/.cache/transferlab/kernels`). The file name
hashes the source, the flags, the compiler, jaxlib's version and the CPU's instruction-set flags, so a cache
shared between machines (an NFS home) never hands one CPU another's code. Concurrent first uses (test
workers, processes of one job) each compile to a temporary file and rename it into place.

Where the CPU lacks what a kernel is written for (`supported`: conv2d needs AVX-512), `load` returns None;
where no compiler is found or the build fails, it says so once (a `[note]`) and returns None. Callers then
use XLA's own operations, which compute the same values. `python -m transferlab.kernels.build` builds
every kernel ahead of time (the Makefile's setup does) and prints where.
"""

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import threading

import jax

from transferlab.errors import note

# library -> (C++ source next to this module, {FFI target suffix: handler symbol}, CPU flag it needs)
KERNELS = {
    "conv2d": ("conv2d.cc", {"forward": "TransferlabConv2dForward",
                             "weight_grad": "TransferlabConv2dWeightGrad"}, "avx512f"),
}
DISABLE_ENV = "TRANSFERLAB_NATIVE_KERNELS"  # "0": never build or use the native kernels
_LOCK = threading.Lock()


class BuildError(Exception):
    """A kernel could not be compiled or loaded here."""


def supported(name: str) -> bool:
    """Whether this CPU has what the kernel is written for. conv2d: AVX-512. Its AVX2 build (8-float
    vectors, `TRANSFERLAB_KERNEL_FLAGS=-march=x86-64-v3`, tested) beats XLA on some ResNet convolutions and
    loses on others (bench/results_cpu.md), so CPUs without AVX-512 keep XLA's convolutions."""
    needed = KERNELS[name][2]
    return needed in _cpu_signature().split()


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1") != "0"


def cache_dir() -> str:
    explicit = os.environ.get("TRANSFERLAB_KERNEL_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "transferlab", "kernels")


def compiler() -> str | None:
    explicit = os.environ.get("CXX")
    if explicit:
        return shutil.which(explicit) or explicit
    for name in ("g++", "c++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def flags() -> list[str]:
    """The compiler flags: for this CPU, then `$TRANSFERLAB_KERNEL_FLAGS` (space-separated; later flags win,
    e.g. `-march=skylake-avx512` for a cache shared by several AVX-512 CPU models, or `-march=x86-64-v3` for
    the AVX2 build)."""
    common = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w"]
    if platform.machine() in ("x86_64", "AMD64"):
        common.append("-mprefer-vector-width=512")  # AVX-512 registers where the CPU has them
    return common + os.environ.get("TRANSFERLAB_KERNEL_FLAGS", "").split()


def _cpu_signature() -> str:
    """The CPU's instruction-set flags (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"C++ compiler {cxx} does not run ({e})") from None


def _source(name: str) -> str:
    return os.path.join(os.path.dirname(__file__), KERNELS[name][0])


def library_path(name: str, cxx: str) -> str:
    digest = hashlib.sha256()
    with open(_source(name), "rb") as f:
        digest.update(f.read())
    for part in (" ".join(flags()), _compiler_version(cxx), importlib.metadata.version("jaxlib"),
                 _cpu_signature()):
        digest.update(b"\0" + part.encode())
    return os.path.join(cache_dir(), f"{name}-{digest.hexdigest()[:16]}.so")


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def compile_library(name: str, cxx: str, path: str) -> None:
    """Compiles `name` into `path`, with `path`.sha256 holding the file's digest (written first: a library
    whose digest does not match, cut short by a full disk or a kill, is never opened)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    cmd = [cxx, *flags(), "-I", jax.ffi.include_dir(), _source(name), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"{cxx} failed to run ({e})") from None
    if done.returncode != 0:
        os.path.exists(tmp) and os.remove(tmp)
        first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:200])
        raise BuildError(f"{cxx} failed (exit {done.returncode})" + (f": {first.strip()}" if first.strip() else ""))
    with open(tmp + ".sha256", "w") as f:
        f.write(_file_digest(tmp))
    os.replace(tmp + ".sha256", path + ".sha256")
    os.replace(tmp, path)


def _open(name: str, path: str) -> ctypes.CDLL | None:
    """The library at `path` if its digest is the recorded one and it has every handler, else None. (A
    truncated shared object can crash the process inside dlopen, so it is never handed to it.)"""
    try:
        with open(path + ".sha256") as f:
            if f.read().strip() != _file_digest(path):
                return None
        library = ctypes.CDLL(path)
        for symbol in KERNELS[name][1].values():
            getattr(library, symbol)
    except (OSError, AttributeError):
        return None
    return library


def _build_and_register(name: str) -> ctypes.CDLL:
    cxx = compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found (set $CXX, or install g++)")
    path = library_path(name, cxx)
    library = _open(name, path) if os.path.exists(path) else None
    if library is None:  # not built yet, or a damaged cache entry: build it (again)
        compile_library(name, cxx, path)
        library = _open(name, path)
        if library is None:
            raise BuildError(f"{path} does not load")
    for suffix, symbol in KERNELS[name][1].items():
        jax.ffi.register_ffi_target(target_name(name, suffix), jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")
    return library


_LOADED: dict[str, ctypes.CDLL | None] = {}
_FAILURES: dict[str, str] = {}  # name -> why it was not built (for the runs' records)


def target_name(name: str, suffix: str) -> str:
    """The XLA custom-call target of one of a library's handlers."""
    return f"transferlab_{name}_{suffix}"


def load(name: str) -> ctypes.CDLL | None:
    """The kernel library, built if needed, its handlers registered with XLA (`target_name`); None where
    native kernels are disabled, where the CPU lacks what they are written for (`supported`), or where
    they cannot be built (said once per process)."""
    if not enabled() or not supported(name):
        return None
    with _LOCK:
        if name not in _LOADED:
            try:
                _LOADED[name] = _build_and_register(name)
            except (BuildError, OSError) as e:
                note(f"native CPU kernel '{name}' unavailable, using XLA's operations instead: {e}")
                _LOADED[name], _FAILURES[name] = None, str(e)
        return _LOADED[name]


def failure(name: str) -> str | None:
    """Why `load(name)` returned None after trying to build it, if it did."""
    return _FAILURES.get(name)


def main() -> int:
    for name in KERNELS:
        library = load(name)
        if library is not None:
            print(f"{name}: {library._name}")
        elif not supported(name):
            print(f"{name}: not built: this CPU has no {KERNELS[name][2]} (XLA's operations are used)")
        else:
            print(f"{name}: not built (see the note above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
