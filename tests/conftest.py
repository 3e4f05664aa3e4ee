"""Test setup: 8 simulated CPU devices, strict rank promotion, a shared offline data dir."""

import os

import importlib.metadata  # noqa: E402

from transferlab.host_allocator import runs_on_cpu  # noqa: E402  (does not start a JAX backend)

ON_CPU = runs_on_cpu(os.environ)
# XLA's legacy (elemental IR) CPU emitters instead of its fusion emitters, which the library runs with: at -O0 they
# compile these programs ~30% faster (the whole suite ~25%, measured A/B on 2 cores). Same HLO, same math; the one
# test about the fusion emitters' own output (tests/test_models.py, the fusion barrier) reruns under them. Newer
# XLA has no such flag and aborts on it as unknown (jaxlib 0.11.2, 2026-11-27), so only where it exists.
_JAXLIB = tuple(int(part) for part in importlib.metadata.version("jaxlib").split(".")[:2])
FUSION_EMITTERS = (os.environ.get("TRANSFERLAB_TEST_FUSION_EMITTERS") == "1" or not ON_CPU
                   or _JAXLIB >= (0, 11))
# On a GPU, XLA picks cuBLAS/cuDNN kernels by timing them at compile time, and scatter-adds use atomics, so two
# compilations of one step on a GPU shared by several test workers can round differently (an H200, 8 workers:
# a resumed run's params 2e-4 relative apart; alone, bitwise). The resume tests compare bitwise, so the suite
# runs a GPU with fixed kernels and deterministic scatters: it tests the resume, not XLA's kernel choice.
GPU_DETERMINISM = " --xla_gpu_autotune_level=0 --xla_gpu_deterministic_ops=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_experimental_ynn_fusion_type="
                           # LLVM -O0: halves compile time, which dominates these tiny tests (same HLO, same math)
                           " --xla_backend_optimization_level=0" +
                           ("" if FUSION_EMITTERS else " --xla_cpu_use_fusion_emitters=false") +
                           ("" if ON_CPU else GPU_DETERMINISM)).strip()
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def needs_devices(count: int):
    """Skips a sharding test where JAX's default backend has fewer than `count` devices (one GPU, say: the
    CPU run simulates 8 above, and bench/gpu_check.sh's `suite` stage runs the whole suite on one GPU)."""
    have = jax.device_count()
    return pytest.mark.skipif(have < count, reason=f"needs {count} devices; the {jax.default_backend()} backend "
                              f"has {have}")


@pytest.fixture(scope="session")
def data_dir():
    """The offline datasets, prepared once per machine (concurrent workers are safe)."""
    return os.environ["TFDS_DATA_DIR"]
