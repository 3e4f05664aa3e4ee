#!/usr/bin/env bash
# Creates .venv-bench: transferlab's pinned requirements + CPU PyTorch + torchdistill,
# for bench/kd_step.py (the JAX and the torch side run from the same venv, in separate
# subprocesses). Idempotent: a finished venv is left as it is (delete it to rebuild).
#
# torchdistill declares `torchvision>=0.27` as a dependency, but PyPI's torchvision does
# not import beside the CPU torch 2.13.0 wheel this machine has ('operator
# torchvision::nms does not exist'), and the bench only needs `torchdistill.losses`,
# which never imports torchvision. So torchdistill is installed with --no-deps and its
# other dependencies (numpy, pyyaml, scipy, cython) are named explicitly, in the same
# pip command as torch==2.13.0 so pip never resolves a (CUDA, multi-GB) torch of its own.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-$(command -v python3.11 || command -v python3)}
VENV=.venv-bench
BIN=$VENV/bin
PIP="$BIN/pip install -q --disable-pip-version-check"
MARKER=$VENV/.installed-bench

if [[ -f $MARKER && $MARKER -nt requirements.txt && $MARKER -nt "$0" ]]; then
  echo "setup_peer: $VENV is ready"
  exit 0
fi

[[ -x $BIN/python ]] || "$PY" -m venv "$VENV"
$PIP -r requirements.txt
# One command: torch pinned to the CPU build on disk, plus torchdistill's own deps.
$PIP torch==2.13.0 numpy pyyaml scipy cython -c requirements.txt
$PIP --no-deps torchdistill==1.1.5
$PIP --no-deps --no-build-isolation -e .
"$BIN/python" - <<'EOF'
import torch, torchdistill, jax
from torchdistill.losses.mid_level import KDLoss  # noqa: F401  (the peer loss the bench uses)
print(f"setup_peer: torch {torch.__version__}, torchdistill {torchdistill.__version__}, jax {jax.__version__}")
EOF
touch "$MARKER"
