"""Parameters and FLOPs of the CLEAQ-DR networks, counted by XLA's cost analysis.

For each subnetwork (IQE and its u_iqe / seg_iqe parts, CE-Net, IQA and its c_iqa / lqi_iqa parts,
DR) and for the joint model (IQE -> IQA behind gradient reversal and DR, forward; the joint loss'
gradient), at each image size: parameter count, forward FLOPs and forward+backward FLOPs per batch
(BatchNorm in training mode, as in a training step). Nothing runs at full size: shapes come from
``jax.eval_shape`` and FLOPs from ``jax.jit(f).lower(...).compile().cost_analysis()``.

    python bench/model_cost.py                       # 512 and 256 px, width 1, batch 1
    python bench/model_cost.py --sizes 256 --uiqe-blocks 3 --json costs.jsonl

Prints a table, then one JSON object per row. ``--lowered`` reads the cost analysis of the
unoptimised HLO instead of compiling (same convolution counts, much faster on a small CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cleaq_jax.models.cenet import CENet  # noqa: E402
from cleaq_jax.models.dr import DRGrader  # noqa: E402
from cleaq_jax.models.iqa import CIQA, IQA, LQIIQA  # noqa: E402
from cleaq_jax.models.iqe import IQE, UIQE  # noqa: E402
from cleaq_jax.models.layers import grad_reverse  # noqa: E402
from cleaq_jax.runtime import storage  # noqa: E402

KEY = jax.random.key(0)


def param_count(tree) -> int:
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def xla_flops(fn, args, lowered_only: bool) -> tuple[float, float]:
    """(FLOPs of ``jax.jit(fn)(*args)`` by XLA cost analysis, seconds spent lowering/compiling)."""
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    cost = lowered.cost_analysis() if lowered_only else lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]), time.perf_counter() - start


def _mean_outputs(tree) -> jax.Array:
    """A scalar that depends on every floating output, to differentiate a bare subnetwork."""
    leaves = [jnp.mean(leaf.astype(jnp.float32)) for leaf in jax.tree.leaves(tree)
              if jnp.issubdtype(leaf.dtype, jnp.floating)]
    return sum(leaves)


def module_cost(module, args, lowered_only: bool) -> dict:
    """Params, forward and forward+backward (w.r.t. params) FLOPs of ``module.apply(v, *args)``."""
    variables = jax.eval_shape(lambda *a: module.init(KEY, *a, train=True), *args)

    def forward(variables, *a):
        return module.apply(variables, *a, train=True, mutable=["batch_stats"])[0]

    def grads(variables, *a):
        loss = lambda p: _mean_outputs(forward({**variables, "params": p}, *a))
        return jax.grad(loss)(variables["params"])

    fwd, t_fwd = xla_flops(forward, (variables, *args), lowered_only)
    fb, t_fb = xla_flops(grads, (variables, *args), lowered_only)
    return dict(params=param_count(variables["params"]), forward_flops=fwd,
                forward_backward_flops=fb, compile_s=round(t_fwd + t_fb, 1))


class _Bare:
    """Adapter giving BN-free U-IQE the ``train`` keyword of the other modules."""

    def __init__(self, module):
        self.module = module

    def init(self, key, *args, train):
        return self.module.init(key, *args)

    def apply(self, variables, *args, train, mutable):
        return self.module.apply(variables, *args), {}


def joint_costs(models, x, lowered_only: bool) -> list[dict]:
    """Forward of IQE -> (GRL -> IQA, DR) and the gradient of a stage-3 loss over all parameters."""
    iqe, iqa, dr = models
    b, s = x.shape[0], x.shape[1]
    variables = {name: jax.eval_shape(lambda x, m=m: m.init(KEY, x, train=True), x)
                 for name, m in zip(("iqe", "iqa", "dr"), models)}
    batch = dict(clean=x, mask=jax.ShapeDtypeStruct((b, s, s, 1), jnp.float32),
                 vessel=jax.ShapeDtypeStruct((b, s, s, 1), jnp.float32),
                 grade=jax.ShapeDtypeStruct((b,), jnp.int32),
                 quality=jax.ShapeDtypeStruct((b,), jnp.int32))

    def forward(v, x):
        run = lambda m, name, inp: m.apply(v[name], inp, train=True, mutable=["batch_stats"])[0]
        out = dict(run(iqe, "iqe", x))
        out.update(run(iqa, "iqa", grad_reverse(out["enhanced"], jnp.float32(1.0))))
        out["dr_logits"] = run(dr, "dr", out["enhanced"])
        return out

    def loss(params, v, x, batch):
        out = forward({k: {**v[k], "params": params[k]} for k in v}, x)
        return joint_loss(out, x, batch)

    params = {k: v["params"] for k, v in variables.items()}
    fwd, t_fwd = xla_flops(forward, (variables, x), lowered_only)
    fb, t_fb = xla_flops(jax.grad(loss), (params, variables, x, batch), lowered_only)
    total = param_count(params)
    return [dict(network="joint forward (IQE+IQA+DR)", params=total, forward_flops=fwd,
                 forward_backward_flops=None, compile_s=round(t_fwd, 1)),
            dict(network="joint loss gradient", params=total, forward_flops=None,
                 forward_backward_flops=fb, compile_s=round(t_fb, 1))]


def joint_loss(out, degraded, batch) -> jax.Array:
    """Eq. (11) with unit weights: L_DR + (L_QE + L_Seg) + (L_QA + L_LQI); eq. (5)-(10) terms."""
    mask = batch["mask"]
    ce = lambda logits, y: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
    l2 = lambda a, b: jnp.sum(((a - b) * mask) ** 2) / jnp.maximum(jnp.sum(mask) * 3, 1.0)
    p = jax.nn.sigmoid(out["vessel_logits"]) * mask
    dice = 1 - 2 * jnp.sum(p * batch["vessel"]) / (jnp.sum(p) + jnp.sum(batch["vessel"]) + 1.0)
    return (ce(out["dr_logits"], batch["grade"]) + l2(out["enhanced"], batch["clean"]) + dice
            + ce(out["quality_logits"], batch["quality"]) + l2(out["lqi"], degraded))


def costs_at(size: int, args) -> list[dict]:
    """Every row of the table at one image size."""
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    common = dict(width=args.width, dtype=dtype)
    x = jax.ShapeDtypeStruct((args.batch, size, size, 3), jnp.float32)
    iqe = IQE(blocks_per_level=args.uiqe_blocks, **common)
    iqa, dr, cenet = IQA(**common), DRGrader(**common), CENet(**common)
    seg = jax.eval_shape(lambda x: cenet.init_with_output(KEY, x)[0], x)["decoder_features"]
    lqi = jax.eval_shape(lambda x: LQIIQA(**common).init_with_output(KEY, x)[0][1], x)
    jobs = [("IQE (u_iqe + seg_iqe)", iqe, (x,)),
            ("  u_iqe", _Bare(UIQE(blocks_per_level=args.uiqe_blocks, **common)), (x, seg[1:])),
            ("  seg_iqe (= CE-Net)", cenet, (x,)),
            ("IQA (c_iqa + lqi_iqa)", iqa, (x,)),
            ("  c_iqa", CIQA(**common), (x, lqi)),
            ("  lqi_iqa", LQIIQA(**common), (x,)),
            ("DR", dr, (x,))]
    rows = []
    for name, module, inputs in jobs:
        rows.append(dict(network=name, **module_cost(module, inputs, args.lowered)))
        print(f"  {size} px {name.strip():24s} done in {rows[-1]['compile_s']:.0f} s", file=sys.stderr)
    rows += joint_costs((iqe, iqa, dr), x, args.lowered)
    for row in rows:
        row.update(size=size, batch=args.batch, width=args.width, dtype=args.dtype,
                   uiqe_blocks=args.uiqe_blocks, counted="lowered" if args.lowered else "compiled")
    return rows


def table(rows) -> str:
    """Markdown table: params (M), forward / forward+backward GFLOP per batch."""
    g = lambda v: "" if v is None else f"{v / 1e9:,.1f}"
    lines = ["| network | size | params (M) | forward GFLOP | fwd+bwd GFLOP |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['network']} | {r['size']} | {r['params'] / 1e6:.2f} | "
                     f"{g(r['forward_flops'])} | {g(r['forward_backward_flops'])} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 256])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--uiqe-blocks", type=int, default=1, help="paper: 1; the authors' code: 3")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--lowered", action="store_true", help="count on unoptimised HLO, no compile")
    p.add_argument("--json", default="", help="also write the JSON lines to this file")
    args = p.parse_args(argv)
    for size in args.sizes:
        if size % 32:
            p.error(f"--sizes: {size} is not a multiple of 32 (the ResNet encoders reach S/32)")
    rows = [row for size in args.sizes for row in costs_at(size, args)]
    print(f"# {jax.devices()[0].platform}, jax {jax.__version__}, batch {args.batch}, "
          f"width {args.width}, {args.dtype}, U-IQE blocks/level {args.uiqe_blocks}")
    print(table(rows))
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    print(lines, end="")
    if args.json:
        storage.atomic_file(args.json, lines)


if __name__ == "__main__":
    main()
