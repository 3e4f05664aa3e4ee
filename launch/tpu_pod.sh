#!/usr/bin/env bash
# TPU VM pod slice: the same command on every worker; jax.distributed.initialize() auto-detects the pod.
#   launch/tpu_pod.sh TPU_NAME ZONE --config experiments/kd/cifar100/resnet32x4_resnet8x4.py --workdir /mnt/bucket/runs/kd
# The repository must be at ~/transferlab on every worker (e.g. `--command "git clone ..."` first). The workdir
# and the tfds data (--config.dataset.data_dir) must be paths every worker sees, e.g. a bucket mounted with
# gcsfuse at the same place on each (storage URLs such as gs://... are refused: the run writes with plain files).
# jax[tpu] is installed at the version requirements.txt pins.
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; shift 2
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/transferlab && (test -d .venv || make setup) && .venv/bin/pip install -q \"jax[tpu]==\$(sed -n 's/^jax==//p' requirements.txt)\" && .venv/bin/python -m transferlab.main --distributed${args}"
