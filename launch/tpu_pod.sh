#!/usr/bin/env bash
# TPU VM pod slice: the same command on every worker; jax.distributed.initialize() auto-detects the pod.
#   launch/tpu_pod.sh TPU_NAME ZONE --config experiments/kd/cifar100/resnet32x4_resnet8x4.py --workdir gs://bucket/runs/kd
# The repository must be at ~/transferlab on every worker (e.g. `--command "git clone ..."` first), and the
# tfds data prepared under a shared data_dir (gs://... works with tfds.data_source) set by --config.dataset.data_dir.
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; shift 2
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/transferlab && (test -d .venv || make setup) && .venv/bin/pip install -q 'jax[tpu]' && .venv/bin/python -m transferlab.main --distributed${args}"
