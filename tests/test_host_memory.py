"""host_memory.keep_freed_memory: freed large blocks are reused without new page faults."""

import platform
import subprocess
import sys

import pytest

from conftest import REPO

# Allocate and free a 64 MiB block a few times, touching every page; print the
# minor page faults of the later rounds (the first maps the pages once).
_PROBE = """
import resource, sys
import numpy as np
from transferlab import host_memory
applied = sys.argv[1] == "keep" and host_memory.keep_freed_memory()
if applied:
    assert host_memory.keep_freed_memory()  # idempotent
np.ones(16 << 20, np.float32).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    np.ones(16 << 20, np.float32).sum()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""


def _faults_per_round(mode):
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=120)
    applied, faults = out.stdout.split()
    return applied == "True", float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc malloc tuning")
def test_freed_blocks_are_reused_without_page_faults():
    applied, faults = _faults_per_round("keep")
    assert applied
    pages = (64 << 20) // 4096
    assert faults < 0.02 * pages, faults
    _, default_faults = _faults_per_round("default")
    # With glibc's defaults each 64 MiB block is a fresh mmap (unless the kernel backs it
    # with huge pages, which also makes the faults few): never fewer faults than tuned.
    assert default_faults >= faults
