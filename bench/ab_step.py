"""Two configurations of one train step, compiled in one process and timed in alternation (ABBA).

    python bench/ab_step.py --a model.upsample=subpixel --b model.upsample=subpixel4
    python bench/ab_step.py --a model.stem_pool=reduce_window --b model.stem_pool=masked --size 256 --batch 2
    python bench/ab_step.py --a model.scan_blocks=False --b model.scan_blocks=True --steps 0   # compile only

Each side is built as training builds it (``bench/train_step.py``) with its own ``--a`` / ``--b``
overrides (repeat the flag for several keys); both are compiled and warmed up, then ``--rounds``
rounds run ``--steps`` steps of A then B, or B then A on odd rounds, so background load falls on
both alike. This is how a formulation switch's default is chosen: the faster side, by the median of
its steps. Prints a line and a JSON line: compile time, optimised-HLO size, median step, images/s,
GFLOP/s of each side, and the ratio A / B of the step times (above 1: B is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as tsb  # noqa: E402  (bench/ sibling: the step as training builds it)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--a", action="append", default=[], metavar="KEY=VALUE", help="overrides of side A")
    p.add_argument("--b", action="append", default=[], metavar="KEY=VALUE", help="overrides of side B")
    p.add_argument("--stage", default="stage3", choices=tsb.STAGES)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="overrides of both sides")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=1, help="steps per side per round (0: compile only)")
    return p.parse_args(argv)


def build(args, overrides: list[str]) -> dict:
    """Compile one side and warm it up; returns its callable, state, batch and compile figures."""

    cfg = tsb.bench_config(args.stage, args.size, args.batch, args.dtype, False, args.width,
                           tsb.parse_overrides([*args.set, *overrides]))
    step, state, batch, _ = tsb.build_step(cfg, args.stage)
    compiled, info = tsb.compile_step(step, state, batch)
    side = {"compiled": compiled, "state": state, "batch": batch, "overrides": overrides,
            "compile_s": info["compile_s"], "flops_per_image": info["flops"] / args.batch,
            "hlo_chars": len(compiled.as_text()), "wall": []}
    if args.steps:
        run(side, 1)  # warm-up: first-touch allocation
        side["wall"] = []
    return side


def run(side: dict, steps: int) -> None:
    import jax

    for _ in range(steps):
        start = time.perf_counter()
        side["state"], metrics = side["compiled"](side["state"], side["batch"])
        jax.block_until_ready((side["state"], metrics))
        side["wall"].append(time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load = os.getloadavg()[0]
    sides = {"a": build(args, args.a), "b": build(args, args.b)}
    for r in range(args.rounds if args.steps else 0):
        for name in ("a", "b") if r % 2 == 0 else ("b", "a"):
            run(sides[name], args.steps)
    out = {}
    for name, side in sides.items():
        rec = {k: side[k] for k in ("overrides", "compile_s", "flops_per_image", "hlo_chars")}
        if side["wall"]:
            med = statistics.median(side["wall"])
            rec.update(step_s=med, steps=[round(t, 3) for t in side["wall"]], images_per_s=args.batch / med,
                       gflops_per_s=side["flops_per_image"] * args.batch / med / 1e9)
        out[name] = rec
    ratio = out["a"]["step_s"] / out["b"]["step_s"] if "step_s" in out["a"] else None
    text = lambda r: (f"compile {r['compile_s']:.0f} s, HLO {r['hlo_chars'] / 1e6:.1f} M chars"
                      + (f", step {r['step_s']:.3f} s, {r['gflops_per_s']:.0f} GFLOP/s" if "step_s" in r else ""))
    print(f"{args.stage} {args.size} px batch {args.batch}: A {args.a}: {text(out['a'])} | B {args.b}: "
          f"{text(out['b'])}" + (f" | A/B step time {ratio:.3f}" if ratio else "")
          + f" | load {load:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
    print(json.dumps(dict(stage=args.stage, size=args.size, batch=args.batch, width=args.width, dtype=args.dtype,
                          common=args.set, rounds=args.rounds, steps_per_round=args.steps, a=out["a"], b=out["b"],
                          a_over_b=ratio, load_1min_at_start=load, load_1min_at_end=os.getloadavg()[0],
                          time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))), flush=True)


if __name__ == "__main__":
    main()
