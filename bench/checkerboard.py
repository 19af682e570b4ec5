"""2x2-periodic (checkerboard) energy of U-IQE's output, untrained and briefly trained, per up-sampling
initialisation.

    python bench/checkerboard.py                          # 64 px, width 1/4, 0 and 60 steps
    python bench/checkerboard.py --size 128 --steps 0,100 --inits icnr,lecun --seeds 0,1,2

A stride-2 transposed convolution computes each of its four output phases (even/odd row x even/odd
column) with its own taps of the kernel, so a kernel whose taps are drawn independently ("lecun")
turns a smooth input into a 2x2 pattern; "icnr" starts all four phases equal. This script measures
that pattern in the enhanced image of the real fundus photograph scikit-image ships
(``skimage.data.retina()``, resized), degraded by the quality transform's op2 (the stage-1 input),
for the whole IQE (U-IQE guided by Seg-IQE) at the given width: at initialisation and after
``--steps`` Adam steps of the stage-1 enhancement loss (L2 to the clean image inside the mask) on
that one image.

``periodic_energy``: in every 8x8 window, the four phase means of the window's deviation from its
mean are the part of the window that repeats with period 2 in both axes; their energy over the
windows' total deviation energy. A pure checkerboard scores 1, smooth content near 0 (a linear ramp
of slope s scores about s^2/4 over its variance per window). Prints one JSON line per
(init, seed, steps) and a summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
WINDOW = 8  # pixels per side of the windows the periodic part is measured in (allows slow modulation)


def periodic_energy(image: np.ndarray, mask: np.ndarray | None = None, window: int = WINDOW) -> float:
    """Fraction of the local (``window`` x ``window``) deviation energy of ``image`` (H, W, C) that
    repeats with period 2 in rows and columns. Windows not wholly inside ``mask`` (H, W) are left out."""
    h, w, c = image.shape
    h, w = h // window * window, w // window * window
    x = image[:h, :w].astype(np.float64).reshape(h // window, window, w // window, window, c)
    x = x.transpose(0, 2, 1, 3, 4)  # (wy, wx, y, x, c)
    keep = np.ones(x.shape[:2], bool)
    if mask is not None:
        m = mask[:h, :w].reshape(h // window, window, w // window, window).transpose(0, 2, 1, 3)
        keep = m.min(axis=(2, 3)) > 0
    x = x[keep]  # (n, y, x, c)
    dev = x - x.mean(axis=(1, 2), keepdims=True)
    phases = dev.reshape(len(x), window // 2, 2, window // 2, 2, c).mean(axis=(1, 3))  # (n, 2, 2, c)
    periodic = (phases ** 2).sum() * (window // 2) ** 2  # each phase mean covers (window/2)^2 pixels
    return float(periodic / max((dev ** 2).sum(), 1e-30))


def fundus(size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's retina photograph resized to (size, size, 3) float32 in [0, 1], and its disc mask."""
    import cv2
    import skimage.data

    img = skimage.data.retina().astype(np.float32) / 255.0
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    mask = (yy ** 2 + xx ** 2 <= (0.48 * size) ** 2).astype(np.float32)
    return img * mask[..., None], mask


def run(init: str, seed: int, steps_list: list[int], args) -> list[dict]:
    """Build IQE with ``init``, degrade the fundus, train ``max(steps_list)`` steps; measure at each."""
    import jax
    import jax.numpy as jnp
    import optax

    from cleaq_jax.data import degrade
    from cleaq_jax.models import iqe as iqe_lib
    from cleaq_jax.models import layers

    clean, mask = fundus(args.size)
    qt = degrade.QTParams.from_config(None, image_size=args.size)
    x = jnp.asarray(clean)[None]
    m = jnp.asarray(mask)[None]
    degraded = degrade.op2(x[0], m[0], jax.random.key(100 + seed), qt)[None]
    model = iqe_lib.IQE(width=args.width, encoder_stages=(1, 1, 1, 1), residual=args.residual,
                        forms=layers.LayerForms(upsample_init=init))
    variables = model.init(jax.random.key(seed), degraded, train=False)
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(args.lr)
    opt = tx.init(params)

    def loss_fn(p, s):
        out, upd = model.apply({"params": p, "batch_stats": s}, degraded, train=True, mutable=["batch_stats"])
        diff = (out["enhanced"] - x) * m[..., None]
        return jnp.sum(diff ** 2) / jnp.maximum(jnp.sum(m) * 3, 1.0), upd["batch_stats"]

    @jax.jit
    def step(p, s, o):
        (loss, s), g = jax.value_and_grad(loss_fn, has_aux=True)(p, s)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), s, o, loss

    @jax.jit
    def enhance(p, s):
        return model.apply({"params": p, "batch_stats": s}, degraded, train=False)["enhanced"][0]

    records, done, loss = [], 0, float("nan")
    for target in sorted(steps_list):
        while done < target:
            params, stats, opt, loss = step(params, stats, opt)
            done += 1
        out = np.asarray(enhance(params, stats)) * mask[..., None]
        records.append(dict(init=init, seed=seed, steps=done, size=args.size, width=args.width,
                            residual=args.residual, loss=float(loss),
                            periodic_energy=periodic_energy(out, mask),
                            input_periodic_energy=periodic_energy(np.asarray(degraded[0]), mask),
                            clean_periodic_energy=periodic_energy(clean, mask)))
        print(json.dumps(records[-1]), flush=True)
    return records


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--steps", default="0,60", help="comma list of step counts to measure at")
    p.add_argument("--inits", default="lecun,icnr")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--residual", action="store_true", help="U-IQE corrects its input (model.uiqe_residual)")
    args = p.parse_args(argv)
    steps_list = [int(s) for s in args.steps.split(",")]
    start = time.perf_counter()
    records = [r for init in args.inits.split(",") for seed in map(int, args.seeds.split(","))
               for r in run(init, seed, steps_list, args)]
    print(f"\n{args.size} px, width {args.width}, residual {args.residual}, {time.perf_counter() - start:.0f} s, "
          f"load {os.getloadavg()[0]:.1f}\n\n| init | steps | periodic energy (mean over seeds) | per seed | loss |\n"
          "|---|---:|---:|---|---:|")
    for init in args.inits.split(","):
        for s in sorted(steps_list):
            rows = [r for r in records if r["init"] == init and r["steps"] == s]
            print(f"| {init} | {s} | {statistics.mean(r['periodic_energy'] for r in rows):.4f} | "
                  + ", ".join(f"{r['periodic_energy']:.4f}" for r in rows)
                  + f" | {statistics.mean(r['loss'] for r in rows):.4f} |")
    print(f"\nclean image {records[0]['clean_periodic_energy']:.4f}, degraded input "
          f"{records[0]['input_periodic_energy']:.4f}")


if __name__ == "__main__":
    main()
