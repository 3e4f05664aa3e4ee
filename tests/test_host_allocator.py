"""transferlab.host_allocator: when the CLI re-executes itself with mimalloc preloaded, and that it works."""

import os
import subprocess
import sys
import types

import pytest

from transferlab import host_allocator
from transferlab.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_ENV = {"JAX_PLATFORMS": "cpu", "PATH": os.environ.get("PATH", "")}

PROBE = """
import sys
from transferlab import host_allocator
host_allocator.reexec_with_mimalloc()
mapped = any("libmimalloc" in line for line in open("/proc/self/maps"))
print("mapped" if mapped else "not mapped", sys.argv[1:])
"""


def test_mimalloc_is_installed_with_the_requirements():
    path = host_allocator.mimalloc_path()
    assert path is not None and os.path.isfile(path)


def test_choice_defaults_to_mimalloc_and_rejects_unknown_values():
    assert host_allocator.choice({}) == "mimalloc"
    assert host_allocator.choice({"TRANSFERLAB_ALLOCATOR": " System "}) == "system"
    with pytest.raises(UserError, match="TRANSFERLAB_ALLOCATOR='jemalloc'"):
        host_allocator.choice({"TRANSFERLAB_ALLOCATOR": "jemalloc"})


def test_preload_environment_prepends_mimalloc_and_keeps_other_preloads():
    env = host_allocator.preload_environment({**CPU_ENV, "LD_PRELOAD": "/opt/libother.so"})
    assert env is not None
    first, rest = env["LD_PRELOAD"].split(" ", 1)
    assert first == host_allocator.mimalloc_path() and rest == "/opt/libother.so"
    assert host_allocator.preloaded(env)


@pytest.mark.parametrize("environ", [
    {**CPU_ENV, "TRANSFERLAB_ALLOCATOR": "system"},
    {**CPU_ENV, "LD_PRELOAD": "/somewhere/libmimalloc.so.3"},  # already preloaded: no second exec
    {"JAX_PLATFORMS": "cuda"},
    {"JAX_PLATFORMS": "tpu,cpu"},
])
def test_preload_environment_leaves_these_alone(environ):
    assert host_allocator.preload_environment(environ) is None


def test_an_installed_accelerator_plugin_keeps_the_system_allocator(monkeypatch):
    fake = [types.SimpleNamespace(metadata={"Name": "numpy"}),
            types.SimpleNamespace(metadata={"Name": "jax-cuda12-plugin"})]
    monkeypatch.setattr(host_allocator.importlib.metadata, "distributions", lambda: iter(fake))
    assert host_allocator.preload_environment({}) is None
    assert host_allocator.preload_environment({"JAX_PLATFORMS": "cpu"}) is not None  # cpu asked for


def _probe(env):
    out = subprocess.run([sys.executable, "-c", PROBE, "a", "b c"], env={**os.environ, **env}, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_reexec_maps_mimalloc_and_keeps_the_arguments():
    env = {"JAX_PLATFORMS": "cpu", "LD_PRELOAD": "", "TRANSFERLAB_ALLOCATOR": ""}
    assert _probe(env) == "mapped ['a', 'b c']"
    assert _probe({**env, "TRANSFERLAB_ALLOCATOR": "system"}) == "not mapped ['a', 'b c']"


def test_cli_rejects_an_unknown_allocator_in_one_line(tmp_path):
    env = {**os.environ, "TRANSFERLAB_ALLOCATOR": "tcmalloc"}
    out = subprocess.run([sys.executable, "-m", "transferlab.main", "--config", "experiments/kd/quickstart.py",
                          "--workdir", str(tmp_path / "run")], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "transferlab: error: TRANSFERLAB_ALLOCATOR='tcmalloc': expected one of mimalloc, system"]
    assert not (tmp_path / "run").exists()
