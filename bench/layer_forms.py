"""Forward and forward+backward time of each layer form at the joint model's own shapes.

    python bench/layer_forms.py --size 128 --batch 4
    python bench/layer_forms.py --size 256 --batch 2 --reps 3

Times, for every stride-2 transposed convolution of the full-width joint model (U-IQE's four 4x4 ones,
CE-Net's 3x3 decoder ones and its final 4x4 one, at the spatial size ``--size`` gives them) and for
the ResNet stem max-pool, each form of ``layers.LayerForms``: the forward alone and the gradient of
a fixed random projection of the output with respect to input and kernel (what the train step needs).
Median of ``--reps`` after one warm-up each. Prints a markdown table and one JSON line per layer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import flax.linen as nn  # noqa: E402

from cleaq_jax.models import layers  # noqa: E402


def shapes(size: int, batch: int) -> list[tuple[str, tuple, tuple]]:
    """(name, input shape, kernel shape) of the joint model's up-samplings at width 1."""
    s = size
    return [("u_iqe up3 4x4", (batch, s // 16, s // 16, 128), (4, 4, 128, 128)),
            ("u_iqe up2 4x4", (batch, s // 8, s // 8, 128), (4, 4, 128, 64)),
            ("u_iqe up1 4x4", (batch, s // 4, s // 4, 64), (4, 4, 64, 64)),
            ("u_iqe up0 4x4", (batch, s // 2, s // 2, 64), (4, 4, 64, 32)),
            ("ce-net decoder4 3x3", (batch, s // 32, s // 32, 128), (3, 3, 128, 128)),
            ("ce-net decoder1 3x3", (batch, s // 4, s // 4, 16), (3, 3, 16, 16)),
            ("ce-net finaldeconv1 4x4", (batch, s // 2, s // 2, 64), (4, 4, 64, 32))]


def timed(fn, *args, reps: int) -> float:
    """Median seconds of ``fn(*args)`` (jitted, waited for) after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def upsample_row(name, xs, ws, reps) -> dict:
    x = jax.random.normal(jax.random.key(0), xs)
    w = 0.1 * jax.random.normal(jax.random.key(1), ws)
    t = jax.random.normal(jax.random.key(2), (xs[0], 2 * xs[1], 2 * xs[2], ws[3]))
    row = {"layer": name, "input": list(xs), "kernel": list(ws)}
    for form in layers.UPSAMPLE_FORMS:
        fwd = jax.jit(lambda x, w, f=form: layers.conv_transpose_2x(x, w, f))
        grad = jax.jit(jax.grad(lambda x, w, f=form: jnp.sum(layers.conv_transpose_2x(x, w, f) * t), argnums=(0, 1)))
        row[form] = {"forward_ms": 1e3 * timed(fwd, x, w, reps=reps), "grad_ms": 1e3 * timed(grad, x, w, reps=reps)}
    return row


def pool_row(size, batch, reps) -> dict:
    xs = (batch, size // 2, size // 2, 64)  # the stem's output (S/2, 64 channels)
    x = jax.random.normal(jax.random.key(3), xs)
    forms = {"masked": layers.max_pool_3x3_2x,
             "reduce_window": lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))}
    row = {"layer": "resnet stem max-pool 3x3/2", "input": list(xs), "kernel": None}
    for form, f in forms.items():
        t = jax.random.normal(jax.random.key(4), f(x).shape)
        grad = jax.jit(jax.grad(lambda x, f=f: jnp.sum(f(x) * t)))
        row[form] = {"forward_ms": 1e3 * timed(jax.jit(f), x, reps=reps), "grad_ms": 1e3 * timed(grad, x, reps=reps)}
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    rows = [upsample_row(*s, args.reps) for s in shapes(args.size, args.batch)] + [pool_row(args.size, args.batch, args.reps)]
    print(f"{args.size} px batch {args.batch}, median of {args.reps}, load {load:.1f} -> {os.getloadavg()[0]:.1f}\n")
    print("| layer (input) | form: forward / forward+backward ms |\n|---|---|")
    for r in rows:
        forms = [k for k in r if isinstance(r[k], dict)]
        print(f"| {r['layer']} {tuple(r['input'])} | "
              + "; ".join(f"{f} {r[f]['forward_ms']:.1f} / {r[f]['grad_ms']:.1f}" for f in forms) + " |")
    for r in rows:
        print(json.dumps({**r, "size": args.size, "batch": args.batch, "load_1min": load}))


if __name__ == "__main__":
    main()
