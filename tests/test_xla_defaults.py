"""`import transferlab` sets XLA:CPU's flags before JAX starts, so the CLI, a notebook and an export's `load`
compute alike (bfloat16 numerics differ with YNNPACK on)."""

import os
import subprocess
import sys

import pytest

from conftest import REPO

SHOW = "import os, transferlab; print(os.environ.get('XLA_FLAGS', ''))"


@pytest.mark.parametrize("given, expected", [
    (None, "--xla_cpu_experimental_ynn_fusion_type="),
    ("--xla_force_host_platform_device_count=2", "--xla_force_host_platform_device_count=2 "
                                                 "--xla_cpu_experimental_ynn_fusion_type="),
    ("--xla_cpu_experimental_ynn_fusion_type=eltwise", "--xla_cpu_experimental_ynn_fusion_type=eltwise"),
])
def test_import_sets_the_cpu_flags_unless_the_user_did(given, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TRANSFERLAB_XLA_DEFAULTS")}
    if given is not None:
        env["XLA_FLAGS"] = given
    out = subprocess.run([sys.executable, "-c", SHOW], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
    out = subprocess.run([sys.executable, "-c", SHOW], cwd=REPO, env={**env, "TRANSFERLAB_XLA_DEFAULTS": "0"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == (given or "")
