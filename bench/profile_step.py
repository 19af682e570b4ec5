"""Per-op profile of a stage's train step on this machine: where the step's time goes, op by op.

    python bench/profile_step.py --size 128 --batch 4                  # the joint step, full networks
    python bench/profile_step.py --size 64 --batch 2 --width 0.25 --top 20
    python bench/profile_step.py --set model.upsample=transpose ...    # any config key

The step is built as training builds it (``bench/train_step.py``), compiled and warmed up, then
``--steps`` steps are timed, then ``--steps`` more run under ``jax.profiler`` (the trace is kept in ``--trace-dir`` for TensorBoard's
profile plugin). Every XLA thunk the runtime executed is an event named after its instruction in the
optimised HLO; this script sums the events' durations per instruction, divides by the steps and
labels each instruction with its HLO opcode, shape and the jax operation it came from (the
``op_name`` metadata, e.g. ``.../transpose(jvp(IQE))/u_iqe/up0/conv_general_dilated``).

Durations are wall time per thunk; thunks on different threads may overlap, so the column ``% of
op time`` divides by the sum of all op durations, not by the step time. Prints a markdown table of
the ``--top`` instructions, a table by category (opcode, and forward / backward from the op_name)
and one JSON line with both.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as tsb  # noqa: E402  (bench/ sibling: the step as training builds it)

# One HLO instruction line: "%name = shape opcode(...)..., metadata={op_name="..." ...}".
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\S+(?:\{[^}]*\})?)\s+([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", default="stage3", choices=tsb.STAGES)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=2, help="profiled steps (after one warm-up step)")
    p.add_argument("--top", type=int, default=10, help="instructions in the table")
    p.add_argument("--trace-dir", default="", help="where the trace is written (default: a temporary folder)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of configs/default.py")
    args = p.parse_args(argv)
    if args.steps < 1 or args.top < 1:
        p.error("--steps and --top must be at least 1")
    return args


def hlo_index(hlo_text: str) -> dict[str, dict]:
    """Instruction name -> {opcode, shape, op_name} for every instruction of the optimised HLO; a
    fusion takes the op_name of its fused root when it has none of its own."""
    index, computations, current, roots = {}, {}, None, {}
    for line in hlo_text.splitlines():
        head = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(|\{)", line)
        if head and ("{" in line and "=" not in line.split("{")[0]):
            current = head.group(1)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, opcode = m.groups()
        op = _OP_NAME.search(line)
        calls = _CALLS.search(line)
        index[name] = {"opcode": opcode, "shape": shape.split("{")[0], "op_name": op.group(1) if op else "",
                       "calls": calls.group(1) if calls else None}
        if current is not None:
            computations.setdefault(current, []).append(name)
            if line.lstrip().startswith("ROOT"):
                roots[current] = name
    for info in index.values():  # a fusion without metadata: describe it by its fused computation's root
        if info["opcode"] == "fusion" and info["calls"] in roots:
            root = index.get(roots[info["calls"]], {})
            info["op_name"] = info["op_name"] or root.get("op_name", "")
            info["root"] = root.get("opcode")
    return index


def op_durations(trace_dir: str) -> dict[str, float]:
    """Sum of event durations (seconds) per event name over the XLA thunk lines of the trace."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        raise SystemExit(f"{trace_dir}: the profiler wrote no .xplane.pb")
    import jax

    data = jax.profiler.ProfileData.from_file(paths[-1])
    total: dict[str, float] = collections.defaultdict(float)
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":  # host-side Python and PjRt bookkeeping, not ops
                continue
            for event in line.events:
                name = event.name
                # Markers, and the executors that contain the thunks (counted once, as thunks).
                if name.startswith(("end: ", "ThreadpoolListener", "ThunkExecutor")):
                    continue
                total[name] += event.duration_ns * 1e-9
    return dict(total)


def direction(op_name: str) -> str:
    """'backward' for ops jax emitted while transposing (the gradient), else 'forward'."""
    return "backward" if "transpose(" in op_name else "forward"


def short_op_name(op_name: str, keep: int = 4) -> str:
    """The last ``keep`` path components of an op_name, without the jit/jvp/transpose wrappers."""
    parts = [re.sub(r"^(?:jit|jvp|transpose|vmap|remat|checkpoint)\((.*)\)$", r"\1", p)
             for p in op_name.split("/") if p]
    return "/".join(parts[-keep:])


def profile_table(durations: dict[str, float], index: dict[str, dict], steps: int, top: int) -> dict:
    """Top instructions and the category totals, seconds per step."""
    total = sum(durations.values()) or 1.0
    rows = []
    for name, seconds in sorted(durations.items(), key=lambda kv: -kv[1]):
        info = index.get(name, {"opcode": "?", "shape": "", "op_name": ""})
        rows.append(dict(name=name, ms_per_step=1e3 * seconds / steps, share=seconds / total,
                         opcode=info["opcode"] + (f"({info['root']})" if info.get("root") else ""),
                         shape=info["shape"], direction=direction(info["op_name"]),
                         op=short_op_name(info["op_name"])))
    categories: dict[str, float] = collections.defaultdict(float)
    for r in rows:
        categories[f"{r['opcode']} {r['direction']}"] += r["ms_per_step"]
    cats = [dict(category=k, ms_per_step=v, share=v * steps / 1e3 / total)
            for k, v in sorted(categories.items(), key=lambda kv: -kv[1])]
    return {"op_ms_per_step": 1e3 * total / steps, "top": rows[:top], "categories": cats[:top]}


def print_tables(table: dict) -> None:
    print(f"op time per step (sum over threads): {table['op_ms_per_step']:.0f} ms\n")
    print("| # | ms / step | % of op time | HLO instruction | opcode | shape | from |")
    print("|---:|---:|---:|---|---|---|---|")
    for i, r in enumerate(table["top"], 1):
        print(f"| {i} | {r['ms_per_step']:.1f} | {100 * r['share']:.1f} | `{r['name']}` | {r['opcode']} "
              f"{r['direction']} | {r['shape']} | `{r['op']}` |")
    print("\n| category (opcode, direction) | ms / step | % of op time |\n|---|---:|---:|")
    for c in table["categories"]:
        print(f"| {c['category']} | {c['ms_per_step']:.1f} | {100 * c['share']:.1f} |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import jax

    cfg = tsb.bench_config(args.stage, args.size, args.batch, args.dtype, False, args.width,
                           tsb.parse_overrides(args.set))
    step, state, batch, _ = tsb.build_step(cfg, args.stage)
    compiled, info = tsb.compile_step(step, state, batch)
    index = hlo_index(compiled.as_text())
    state, metrics = compiled(state, batch)  # warm-up: first-touch allocation
    jax.block_until_ready((state, metrics))
    start = time.perf_counter()  # timed outside the trace: starting and stopping it takes seconds
    for _ in range(args.steps):
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / args.steps
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="cleaq_profile_")
    with jax.profiler.trace(trace_dir):
        for _ in range(args.steps):
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
    table = profile_table(op_durations(trace_dir), index, args.steps, args.top)
    print(f"{args.stage} {args.size} px batch {args.batch} width {args.width} {args.dtype} {args.set}: "
          f"{step_s:.2f} s per step (untraced), compile {info['compile_s']:.0f} s, "
          f"load {os.getloadavg()[0]:.1f}; trace in {trace_dir}\n")
    print_tables(table)
    print(json.dumps(dict(stage=args.stage, size=args.size, batch=args.batch, width=args.width,
                          dtype=args.dtype, overrides=args.set, step_s=step_s, compile_s=info["compile_s"],
                          load_1min=os.getloadavg()[0], **table)), flush=True)


if __name__ == "__main__":
    main()
