#!/usr/bin/env bash
# The GPU checks, as one script for a lent CUDA machine with no network (run from the repo root):
#   bench64     bench/kd_step.py --device gpu, batch 64: resnet56 -> resnet20 (fusion barrier off
#               and on) and resnet32x4 -> resnet8x4 (barrier on), transferlab vs torchdistill;
#   bench256    the same for resnet56 -> resnet20 at batch 256 (barrier on);
#   quickstart  the quickstart job (`make run`'s config, 1 seed) on the GPU, end to end;
#   overhead    bench/loss_overhead.py on the GPU: each method's step overhead over plain KD,
#               resnet56 -> resnet20 (~3 min: 20 step builds, XLA:GPU autotuning included);
#   overhead8x4 the same for resnet32x4 -> resnet8x4 (~3 min);
#   tests       the numerics tests on the GPU backend: loss parity against the torchdistill /
#               paper goldens (rtol 1e-5), connector parity, the loss and model unit tests
#               (~2 min; needs the pytest wheels in .whl/);
#   suite       the whole test suite with the GPU as JAX's default backend (~4 min; the sharding tests
#               that need 8 devices skip on one GPU; multi-process launches run on simulated CPU devices).
# Usage: bash bench/gpu_check.sh [STAGE ...]   (default: bench64 bench256 quickstart).
# Packages missing on that machine travel as wheels in .whl/ (see bench/README.md); outputs go
# to $OUT (or /tmp/gpu_out).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
STAGES=${*:-bench64 bench256 quickstart}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TFDS_DATA_DIR=/tmp/tfds
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__)"
common="--device gpu --variants default --iters 50 --warmup 5 --repeats 1 --retries 0 --wait-idle 0"
for stage in $STAGES; do
  case $stage in
    bench64)
      timeout 240 python3 bench/kd_step.py $common --pairs resnet56:resnet20 --fusion-barrier both \
        --json "$OUT/gpu_resnet20.json" 2>&1 | tee "$OUT/gpu_resnet20.md"
      timeout 120 python3 bench/kd_step.py $common --pairs resnet32x4:resnet8x4 --fusion-barrier on \
        --json "$OUT/gpu_resnet8x4.json" 2>&1 | tee "$OUT/gpu_resnet8x4.md" ;;
    bench256)
      timeout 150 python3 bench/kd_step.py $common --batch 256 --pairs resnet56:resnet20 --fusion-barrier on \
        --json "$OUT/gpu_resnet20_b256.json" 2>&1 | tee "$OUT/gpu_resnet20_b256.md" ;;
    quickstart)
      python3 -m transferlab.data.prepare --datasets mnist5k >/dev/null 2>&1 || echo "prepare failed"
      ( time timeout 150 python3 -m transferlab.main --config experiments/kd/quickstart.py:seeds=1 \
        --workdir /tmp/quickstart ) 2>&1 | tail -25 | tee "$OUT/gpu_quickstart.txt" ;;
    overhead)
      JAX_PLATFORMS=cuda timeout 300 python3 bench/loss_overhead.py --rounds 20 --warmup 2 2>&1 \
        | tee "$OUT/gpu_loss_overhead.md" ;;
    overhead8x4)
      JAX_PLATFORMS=cuda timeout 270 python3 bench/loss_overhead.py --pair resnet32x4:resnet8x4 --rounds 20 \
        --warmup 2 2>&1 | tee "$OUT/gpu_loss_overhead_resnet8x4.md" ;;
    tests)
      XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda timeout 300 python3 -m pytest -p no:cacheprovider \
        -n 4 -rfE tests/test_loss_parity.py tests/test_connector_parity.py tests/test_losses.py \
        tests/test_chunked_conv.py tests/test_models.py \
        --deselect tests/test_chunked_conv.py::test_batch_sharded_chunks_need_no_communication_but_the_gradient_sum \
        2>&1 | tail -40 | tee "$OUT/gpu_tests.txt" ;;  # (deselected: needs 8 devices)
    suite)
      XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 420 python3 -m pytest -p no:cacheprovider -n 8 -rfEs tests \
        2>&1 | tail -60 | tee "$OUT/gpu_suite.txt" ;;
    *) echo "gpu_check: unknown stage '$stage' (bench64, bench256, quickstart, overhead, overhead8x4, tests, suite)"
       exit 2 ;;
  esac
done
