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
LIMIT_S="${LIMIT_S:-170}"   # per configuration: start-up, two compilations (init and step), 13 steps
# Keep XLA's memory pool (so the largest batch fits) but let it take nearly the whole GPU.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
export TF_CPP_MIN_LOG_LEVEL=2
# The init program is the same in every configuration: compile it once (the step's compile_s stays honest).
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d)}"

if ! "$PY" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  echo "gpu_check: jax sees no GPU (backend: $("$PY" -c 'import jax; print(jax.default_backend())' 2>&1 | tail -1))."
  echo "Install the CUDA build first: pip install \"jax[cuda12]==0.10.2\""
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
"$PY" -c 'import jax; print("jax", jax.__version__, [d.device_kind for d in jax.devices()])'

# Largest memory.used nvidia-smi reports while the benchmarks run (the XLA pool, not live data;
# the JSON lines' peak_bytes is the allocator's own peak).
smi_log="$(mktemp)"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 >"$smi_log" 2>/dev/null &
smi_pid=$!
trap 'kill "$smi_pid" 2>/dev/null; rm -f "$smi_log"' EXIT

# run REMAT BATCH: one configuration; prints its JSON line, returns 3 when it ran out of memory.
run() {
  local line
  line="$("$PY" bench/train_step.py --stages stage3 --size 512 --dtype bfloat16 --remat "$1" \
          --batch "$2" --steps "$STEPS" --warmup 3 --timeout "$LIMIT_S" | tail -1)"
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
