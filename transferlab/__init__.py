"""transferlab: knowledge distillation, prompt transfer and domain adaptation in JAX."""

__version__ = "0.1.0"

import os as _os

# XLA:CPU with its YNNPACK fusions off: 10-25% faster train steps on the CPUs measured (bench/results_cpu.md),
# and the numerics every run of this library is made with, from the CLI, a notebook or an export's `load`
# alike (bfloat16 results differ with YNNPACK on). Set on import, before JAX starts its CPU backend (import
# transferlab before running JAX code); an `ynn_fusion_type` already in XLA_FLAGS, or
# TRANSFERLAB_XLA_DEFAULTS=0, keeps the user's own setting. No effect on GPUs and TPUs.
CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type="
if "ynn_fusion_type" not in _os.environ.get("XLA_FLAGS", "") and _os.environ.get("TRANSFERLAB_XLA_DEFAULTS") != "0":
    _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + " " + CPU_XLA_FLAGS).strip()
