"""Keep freed host memory in the process for reuse instead of returning it to the OS.

XLA:CPU allocates each train step's temporary buffer (~118 MB for a ResNet-20
step at batch 64) and Eigen's convolution packing buffers (~38 MB each) with
malloc, and frees them when the step ends. glibc serves blocks that large with
fresh `mmap`s and hands them back with `munmap`, so every step touches ~110 MB
of new pages: ~29,000 page faults and ~70 ms of kernel CPU time per ResNet-20
step on a 2-core CPU (bench/results_cpu.md). With one malloc arena, no `mmap`
for large blocks and a high trim threshold, glibc keeps the freed blocks in its
heap and the next step reuses them without faulting.

The price is that the process keeps its peak host memory until it exits, which
is what a training process does anyway. `transferlab.main` applies this before
JAX starts; notebooks may call `keep_freed_memory()` first thing. A no-op on
other C libraries and platforms, and idempotent.
"""

import ctypes
import platform
import sys

# mallopt(3) parameter numbers (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# Free memory at the top of the heap beyond this is returned to the OS.
_TRIM_THRESHOLD_BYTES = 1 << 30

_applied = False


def keep_freed_memory() -> bool:
    """Tune glibc malloc to reuse freed blocks (see the module docstring); True if applied.

    Call before JAX creates its threads: threads that already have their own
    malloc arena keep it.
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))
    _applied = all(libc.mallopt(param, value) == 1 for param, value in settings)
    return _applied
