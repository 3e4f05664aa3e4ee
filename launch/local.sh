#!/usr/bin/env bash
# Multi-process on one machine: N processes, each with its own (simulated) CPU devices (JAX_PLATFORMS=cpu,
# also on a host with a GPU: this launcher tests pod-style runs on CPUs; launch/slurm.sbatch runs GPU jobs).
#   launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS --config FILE --workdir DIR [--config.KEY=VALUE ...]
# Every process runs transferlab.main with the same arguments; process 0 writes the
# workdir's metrics and results, all processes write their shards of each checkpoint.
# SIGTERM / Ctrl-C are passed on to every process (each finishes its step, saves and stops);
# rerunning the same command resumes.
set -uo pipefail
usage="usage: launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS --config FILE --workdir DIR [--config.KEY=VALUE ...]"
fail() { echo "launch/local.sh: error: $1" >&2; exit 2; }
[[ $# -ge 2 ]] || fail "$usage"
num_processes=$1; devices=$2; shift 2
[[ $num_processes =~ ^[1-9][0-9]*$ ]] || fail "NUM_PROCESSES '$num_processes': expected an integer >= 1"
[[ $devices =~ ^[1-9][0-9]*$ ]] || fail "DEVICES_PER_PROCESS '$devices': expected an integer >= 1"
for flag in --config --workdir; do  # (else every process would print the same error)
  found=0
  for arg in "$@"; do [[ $arg == "$flag" || $arg == "$flag="* ]] && found=1; done
  [[ $found == 1 ]] || fail "$flag is required; $usage"
done
port=${PORT:-$((20000 + RANDOM % 20000))}
python=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}  # the repo's venv, from any directory
pids=()
forward() { kill "-$1" "${pids[@]}" 2>/dev/null; }
trap 'forward TERM' TERM
trap 'forward INT' INT
for ((i = 0; i < num_processes; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}" \
    "$python" -m transferlab.main "$@" --coordinator_address "127.0.0.1:${port}" \
    --num_processes "$num_processes" --process_id "$i" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  while true; do  # `wait` returns early when a trapped signal arrives: wait again for the real exit
    wait "$pid"; code=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  [[ $code == 0 ]] || status=$code
done
exit "$status"
