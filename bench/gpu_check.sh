#!/usr/bin/env bash
# One GPU check of the joint (stage-3) step, prepared to finish in under 8 minutes on an H100 or H200:
# 512 px, bfloat16 compute, per-device batch 32 (16 where 32 does not fit), remat off and on.
# Prints the GPU, one JSON line per configuration (bench/train_step.py) and nvidia-smi's memory.
#
#   bash bench/gpu_check.sh            # PYTHON=/path/to/python to pick the interpreter
#
# Installs nothing. It needs jax with CUDA beside this repository's other dependencies; where only the
# CPU build is present, install the CUDA one first (network or a local wheel cache):
#   pip install "jax[cuda12]==0.10.2"
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python}"
STEPS="${STEPS:-10}"
LIMIT_S="${LIMIT_S:-240}"    # per configuration: start-up, init and step compilation, 13 steps
DEADLINE_S="${DEADLINE_S:-450}"  # all configurations together; the rest of the 8 minutes is set-up
# Keep XLA's memory pool (so the largest batch fits) but let it take nearly the whole GPU.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
export TF_CPP_MIN_LOG_LEVEL=2
# A compilation cache across the configurations: the init program is the same in all of them
# (train_step.py initialises float32 models without remat) and XLA's per-fusion autotuning results are
# kept beside it, so later configurations skip that work; each step program still compiles anew.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d)}"

backend="$("$PY" -c 'import jax; print(jax.default_backend(), jax.__version__, [d.device_kind for d in jax.devices()])' 2>&1 | tail -1)"
if [ "${backend%% *}" != "gpu" ]; then
  echo "gpu_check: jax sees no GPU (jax says: $backend)."
  echo "Install the CUDA build first: pip install \"jax[cuda12]==0.10.2\""
  exit 2
fi
echo "jax: $backend"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv

# Largest memory.used nvidia-smi reports while the benchmarks run (the XLA pool, not live data;
# the JSON lines' peak_bytes is the allocator's own peak).
smi_log="$(mktemp)"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 >"$smi_log" 2>/dev/null &
smi_pid=$!
trap 'kill "$smi_pid" 2>/dev/null; rm -f "$smi_log"' EXIT

# run REMAT BATCH: one configuration within what is left of DEADLINE_S; prints its JSON line
# (a late one names the phase it reached), returns 3 when it ran out of memory.
run() {
  local left=$((DEADLINE_S - SECONDS)) line
  if [ "$left" -lt 60 ]; then
    echo "{\"stage\": \"stage3\", \"remat\": \"$1\", \"batch_per_device\": $2, \"error\": \"skipped: ${left} s left of DEADLINE_S\"}"
    return 0
  fi
  [ "$left" -gt "$LIMIT_S" ] && left="$LIMIT_S"
  line="$("$PY" bench/train_step.py --stages stage3 --size 512 --dtype bfloat16 --remat "$1" \
          --batch "$2" --steps "$STEPS" --warmup 3 --timeout "$left" | tail -1)"
  echo "$line"
  case "$line" in *'"out of memory"'*) return 3 ;; esac
  return 0
}

for remat in off on; do
  run "$remat" 32 || run "$remat" 16
done

kill "$smi_pid" 2>/dev/null
wait "$smi_pid" 2>/dev/null
echo "nvidia-smi memory.used peak: $(sort -n "$smi_log" | tail -1) MiB"
nvidia-smi --query-gpu=memory.used,memory.total --format=csv
