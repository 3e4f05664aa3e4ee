#!/usr/bin/env bash
# Multi-process on one machine: N processes, each with its own (simulated) CPU devices.
#   launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS --config FILE --workdir DIR [--config.KEY=VALUE ...]
# Every process runs transferlab.main with the same arguments; process 0 writes the
# workdir's metrics and results, all processes write their shards of each checkpoint.
set -euo pipefail
num_processes=${1:?number of processes}; devices=${2:?devices per process}; shift 2
port=${PORT:-$((20000 + RANDOM % 20000))}
python=${PYTHON:-.venv/bin/python}
pids=()
for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}" \
    "$python" -m transferlab.main "$@" --coordinator_address "127.0.0.1:${port}" \
    --num_processes "$num_processes" --process_id "$i" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
