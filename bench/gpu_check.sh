#!/usr/bin/env bash
# Staged GPU check of the joint (stage-3) step: numbers come back within the first minutes and each
# configuration prints its line the moment it finishes, smallest first:
#   1. tiny joint step (128 px, width 1/4, one block per ResNet stage): proves the path, compiles fast;
#   2. 256 px, full networks, bfloat16, batch 16;
#   3. 512 px, bfloat16, batch 16 then 32, remat off; then remat on at 32 and 16.
# Each line: compile time, step time, images/s, TFLOP/s, MFU, peak memory (and a JSON line with
# everything). The whole run stops before DEADLINE_S (default 450 s, inside 8 minutes with start-up);
# a configuration that would start with under MIN_LEFT_S left is skipped, one cut short names the phase
# it reached (backend ready / initialised / compiled / warmed up).
#
#   bash bench/gpu_check.sh                        # on the GPU machine
#   PYTHON=/path/python REHEARSE=1 bash bench/gpu_check.sh   # CPU rehearsal: same flow, tiny sizes
#
# Needs only jax (with CUDA on the GPU machine), flax, optax, orbax-checkpoint and numpy beside this
# repository: bench/gpu_step.py runs the library's own stage-3 step (training.steps.make_train_step),
# describing the stage from a plain dict of configs/default.py's keys, so neither the config system
# (ml_collections) nor the data stack (grain, array_record, OpenCV) is imported. A persistent
# compilation cache (JAX_COMPILATION_CACHE_DIR, default /tmp/cleaq_jax_xla_cache) keeps every
# compiled program, with XLA's autotuning results, so a rerun skips compilation.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python3}"
DEADLINE_S="${DEADLINE_S:-450}"
MIN_LEFT_S="${MIN_LEFT_S:-30}"
STEPS="${STEPS:-5}"
REHEARSE="${REHEARSE:-0}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# Keep XLA's memory pool (so the largest batch fits) but let it take nearly the whole GPU.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/cleaq_jax_xla_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
mkdir -p "$JAX_COMPILATION_CACHE_DIR"

if [ "$REHEARSE" = 1 ]; then
  want=cpu
  # The rehearsal proves the flow, not the speed: XLA's CPU compiler at its cheapest (as the tests run
  # it), so that a first rehearsal, its cache empty, fits its deadline on a small, busy machine.
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  configs=("--size 64 --batch 2 --width 0.125 --stages 1 --dtype float32"
           "--size 64 --batch 2 --width 0.125 --stages 1 --dtype bfloat16"
           "--size 64 --batch 4 --width 0.125 --stages 1 --dtype bfloat16 --remat on")
else
  want=gpu
  configs=("--size 128 --batch 8 --width 0.25 --stages 1 --dtype bfloat16"
           "--size 256 --batch 16 --dtype bfloat16"
           "--size 512 --batch 16 --dtype bfloat16"
           "--size 512 --batch 32 --dtype bfloat16"
           "--size 512 --batch 32 --dtype bfloat16 --remat on"
           "--size 512 --batch 16 --dtype bfloat16 --remat on")
fi

backend="$("$PY" -c 'import jax; print(jax.default_backend(), jax.__version__, [d.device_kind for d in jax.devices()])' 2>&1 | tail -1)"
if [ "${backend%% *}" != "$want" ]; then
  echo "gpu_check: expected the $want backend, jax says: $backend"
  [ "$want" = gpu ] && echo "Install jax with CUDA (pip install \"jax[cuda12]\") or rehearse on CPU with REHEARSE=1."
  exit 2
fi
echo "gpu_check: jax $backend, deadline ${DEADLINE_S} s, cache $JAX_COMPILATION_CACHE_DIR"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader

err="$(mktemp)"
trap 'rm -f "$err"' EXIT
for args in "${configs[@]}"; do
  left=$((DEADLINE_S - SECONDS))
  if [ "$left" -lt "$MIN_LEFT_S" ]; then
    echo "skipped ($left s left of DEADLINE_S): $args"
    continue
  fi
  # shellcheck disable=SC2086  # the configuration's flags are meant to split
  timeout -k 5 "$left" "$PY" bench/gpu_step.py $args --steps "$STEPS" --warmup 2 2>"$err"
  code=$?
  if [ "$code" -ne 0 ]; then
    phase="$(grep '^{"phase"' "$err" | tail -1)"
    if [ "$code" -ge 124 ]; then
      why="cut at the deadline after ${left} s"
    elif grep -q -E 'RESOURCE_EXHAUSTED|[Oo]ut of memory' "$err"; then
      why="out of memory"
    else
      why="exit $code: $(grep -v '^{"phase"' "$err" | tail -2 | tr '\n' ' ')"
    fi
    echo "FAILED $args: $why; last phase ${phase:-none}"
  fi
done
echo "gpu_check: done in ${SECONDS} s"
