#!/usr/bin/env bash
# The GPU checks, as one script for a lent CUDA machine with no network (run from the repo root):
#   1. bench/kd_step.py --device gpu: transferlab vs torchdistill, resnet56 -> resnet20 (fusion
#      barrier off and on) and resnet32x4 -> resnet8x4 (barrier on), batch 64;
#   2. the quickstart job (`make run`'s config) on the GPU, 1 seed, as an end-to-end smoke.
# Packages missing on that machine travel as wheels in .whl/ (made here with `pip download
# --python-version 3.12 ... -d .whl`, see bench/README.md); results go to $OUT (or /tmp/gpu_out).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TFDS_DATA_DIR=/tmp/tfds
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__)"
common="--device gpu --variants default --iters 50 --warmup 5 --repeats 1 --retries 0 --wait-idle 0"
timeout 240 python3 bench/kd_step.py $common --pairs resnet56:resnet20 --fusion-barrier both \
  --json "$OUT/gpu_resnet20.json" 2>&1 | tee "$OUT/gpu_resnet20.md"
timeout 120 python3 bench/kd_step.py $common --pairs resnet32x4:resnet8x4 --fusion-barrier on \
  --json "$OUT/gpu_resnet8x4.json" 2>&1 | tee "$OUT/gpu_resnet8x4.md"
python3 -m transferlab.data.prepare --datasets mnist5k >/dev/null 2>&1 || echo "prepare failed"
( time timeout 110 python3 -m transferlab.main --config experiments/kd/quickstart.py:seeds=1 \
  --workdir /tmp/quickstart ) 2>&1 | tail -25 | tee "$OUT/gpu_quickstart.txt"
