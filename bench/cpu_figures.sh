#!/usr/bin/env bash
# Every CPU figure of docs/performance.md, in one run, on an idle machine (nothing else running: the
# comparison warns when the 1-minute load average is above 0.5 at its start).
#
#   bash bench/cpu_figures.sh [OUT_DIR]        # TORCH_PYTHON=... to name the torch interpreter
#
# Writes each command's output to OUT_DIR (default cpu_figures_<UTC date>/) and prints it. In order:
#   1. the joint step against the PyTorch peer, eager and torch.compile'd, alternating: 128 px batch 4
#      and 256 px batch 2, variants paper and uiqe3;
#   2. the A/B runs that chose each layer form's default (128 px batch 4);
#   3. the per-op profile of the joint step, top ten, with the earlier forms (before) and the defaults;
#   4. the layer forms one by one at the model's shapes;
#   5. the 512 px joint step's compile time and optimised-HLO size: earlier forms, defaults, scanned stages;
#   6. the checkerboard energy of IQE's output per up-sampling initialisation (not a timing).
# About 60-75 minutes on the 2-core x86-64 CPU (most of it compilation: ours about 1 minute per program,
# torch.compile several minutes per size).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python}"
TORCH_PYTHON="${TORCH_PYTHON:-/work/torchvenv/bin/python}"
OUT="${1:-cpu_figures_$(date -u +%Y%m%d_%H%M)}"
mkdir -p "$OUT"
unset JAX_COMPILATION_CACHE_DIR  # compile times must be real compilations
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OLD_FORMS=(--set model.upsample=subpixel --set model.stem_pool=reduce_window)  # the forms before the switches

step() {  # step NAME COMMAND...: run, keep stdout+stderr in OUT/NAME.log, print stdout's lines as they come
  local name="$1"; shift
  echo "== $name: $* ($(date -u +%H:%M:%S), load $(cut -d' ' -f1 /proc/loadavg))"
  "$@" 2>"$OUT/$name.err" | grep -v '^{"phase"' | tee "$OUT/$name.log"
}

{ date -u; uname -m; nproc; lscpu | grep -E 'Model name|MHz|Flags' | cut -c1-200; git rev-parse --short HEAD; uptime; } >"$OUT/machine.txt"
cat "$OUT/machine.txt"
start=$SECONDS

step compare_128 "$PY" bench/compare_torch.py --torch-python "$TORCH_PYTHON" --size 128 --batch 4 \
  --variants paper,uiqe3 --peers eager,compiled --rounds 4 --steps 1 --standalone 2
step compare_256 "$PY" bench/compare_torch.py --torch-python "$TORCH_PYTHON" --size 256 --batch 2 \
  --variants paper,uiqe3 --peers eager,compiled --rounds 4 --steps 1 --standalone 2
step ab_upsample "$PY" bench/ab_step.py --size 128 --batch 4 --rounds 4 \
  --a model.upsample=subpixel --b model.upsample=subpixel4
step ab_stem_pool "$PY" bench/ab_step.py --size 128 --batch 4 --rounds 4 \
  --a model.stem_pool=reduce_window --b model.stem_pool=masked
step profile_before "$PY" bench/profile_step.py --size 128 --batch 4 --steps 2 --top 10 "${OLD_FORMS[@]}"
step profile_after "$PY" bench/profile_step.py --size 128 --batch 4 --steps 2 --top 10
step layer_forms "$PY" bench/layer_forms.py --size 128 --batch 4 --reps 5
step compile_512_forms "$PY" bench/ab_step.py --size 512 --batch 1 --steps 0 \
  --a model.upsample=subpixel --a model.stem_pool=reduce_window
step compile_512_scan "$PY" bench/ab_step.py --size 512 --batch 1 --steps 0 \
  --a model.scan_blocks=False --b model.scan_blocks=True
step checkerboard "$PY" bench/checkerboard.py --size 64 --width 0.25 --steps 0,60 --seeds 0,1

echo "== done in $((SECONDS - start)) s; outputs in $OUT/ ($(uptime))"
