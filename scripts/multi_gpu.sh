#!/usr/bin/env bash
# Start one cleaq_jax training process per GPU group on this host, joined by jax.distributed.
#
# Usage:
#   scripts/multi_gpu.sh [--num-processes N] [--port PORT] [--log-dir DIR] -- MAIN_ARGS...
#
#   MAIN_ARGS     everything cleaq_jax.main takes: --config=... --workdir=... [--config.key=value ...]
#   --num-processes N   processes to start (default: one per GPU that nvidia-smi lists)
#   --port PORT         coordinator port on 127.0.0.1 (default: 29400 + a value from this shell's PID)
#   --log-dir DIR       each process writes DIR/process_<i>.log (default: <workdir>/logs)
#
# Process i runs
#   $PYTHON -m cleaq_jax.main MAIN_ARGS --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i
# with CUDA_VISIBLE_DEVICES set to its share of the GPUs (GPUs / N each, in order). On a host without
# nvidia-smi the visible devices are left alone (CPU runs; set XLA_FLAGS for several CPU devices).
# Environment: PYTHON (default: python). SIGTERM or SIGINT is passed on to every process, which saves a
# checkpoint and exits; if one process fails, the others are stopped. Exit status: the first failure's.
# One process driving every GPU (no script needed) is usually simpler: see docs/launch.md.
# Needs bash >= 5.1.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

num_processes="" port="" log_dir=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num-processes) num_processes="${2:?--num-processes needs a value}"; shift 2 ;;
    --port) port="${2:?--port needs a value}"; shift 2 ;;
    --log-dir) log_dir="${2:?--log-dir needs a value}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "multi_gpu.sh: unknown option '$1' (put cleaq_jax.main's arguments after --)" >&2; exit 2 ;;
  esac
done
main_args=("$@")
if [[ ${#main_args[@]} -eq 0 ]]; then
  echo "multi_gpu.sh: no arguments for cleaq_jax.main after --; e.g. -- --config=configs/stage1.py --workdir=DIR" >&2
  exit 2
fi

gpus=0
if command -v nvidia-smi > /dev/null 2>&1; then
  gpus=$(nvidia-smi -L | grep -c '^GPU' || true)
fi
if [[ -z "$num_processes" ]]; then
  if [[ "$gpus" -eq 0 ]]; then
    echo "multi_gpu.sh: no GPUs found by nvidia-smi; pass --num-processes N" >&2
    exit 2
  fi
  num_processes=$gpus
fi
if ! [[ "$num_processes" =~ ^[1-9][0-9]*$ ]]; then
  echo "multi_gpu.sh: --num-processes must be a positive integer, got '$num_processes'" >&2
  exit 2
fi
if [[ "$gpus" -gt 0 && $((gpus % num_processes)) -ne 0 ]]; then
  echo "multi_gpu.sh: $gpus GPUs cannot be split evenly over --num-processes $num_processes" >&2
  exit 2
fi
port=${port:-$((29400 + $$ % 1000))}
if [[ -z "$log_dir" ]]; then
  workdir=""
  for arg in "${main_args[@]}"; do [[ "$arg" == --workdir=* ]] && workdir=${arg#--workdir=}; done
  if [[ -z "$workdir" || "$workdir" == *://* ]]; then
    echo "multi_gpu.sh: pass --log-dir DIR (no local --workdir=... to put logs under)" >&2
    exit 2
  fi
  log_dir="$workdir/logs"
fi
mkdir -p "$log_dir"

declare -A running=() signalled=()  # pid -> process index, until it exits; pids sent SIGTERM
stopping=0
# Bash runs a trap between two commands, so it may come between starting a process and recording its
# pid, or halfway through starting them: stop_all sends each recorded process SIGTERM once, and the
# start loop passes a stop on to a process recorded after it and starts no more.
stop_all() {
  stopping=1
  for pid in "${!running[@]}"; do
    [[ -n "${signalled[$pid]:-}" ]] && continue
    signalled[$pid]=1
    kill -TERM "$pid" 2> /dev/null || true
  done
}
trap 'stop_all' TERM INT

for ((i = 0; i < num_processes && stopping == 0; i++)); do
  cmd=("${PYTHON:-python}" -m cleaq_jax.main "${main_args[@]}" --coordinator_address="127.0.0.1:$port"
       --num_processes="$num_processes" --process_id="$i")
  (
    # Ctrl-C reaches the whole terminal group: the processes ignore it and get SIGTERM from the trap above.
    trap '' INT
    if [[ "$gpus" -gt 0 ]]; then
      per=$((gpus / num_processes))
      CUDA_VISIBLE_DEVICES=$(seq -s, $((i * per)) $((i * per + per - 1)))
      export CUDA_VISIBLE_DEVICES
    fi
    exec "${cmd[@]}"
  ) > "$log_dir/process_$i.log" 2>&1 &
  running[$!]=$i
  if [[ $stopping -eq 1 ]]; then stop_all; fi
  # A signal interrupting a write to a full pipe makes echo fail: the message is lost, not the job.
  echo "process $i (pid $!): ${cmd[*]} > $log_dir/process_$i.log" || true
done

status=0
while [[ ${#running[@]} -gt 0 ]]; do
  code=0 finished=""
  wait -n -p finished "${!running[@]}" || code=$?
  [[ -z "${finished:-}" ]] && continue  # woken by a signal (passed on by the trap), not by an exit
  unset "running[$finished]"
  if [[ $code -ne 0 && $status -eq 0 ]]; then
    status=$code
    echo "multi_gpu.sh: a process exited with status $code; stopping the others (see $log_dir)" >&2 || true
    stop_all
  fi
done
exit "$status"
