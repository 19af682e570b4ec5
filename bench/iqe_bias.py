"""What a trained IQE does to images it is given as they are: the mean change of brightness in the centre
and at the rim of the retina, of the red channel in the centre, and the PSNR of the output against its input,
per quality level.

    python bench/iqe_bias.py --checkpoint W/stage1 --data W/data [--split test]

An IQE that has learned to undo a degradation only where there is one returns a good image nearly as it came
(a high PSNR against itself, changes near 0); one that applies the same correction to every image changes good
images too. Centre: within 0.35 of the image's half-width from its middle; rim: beyond 0.6; both inside the
retinal mask. Changes are of float images in [0, 1], averaged over the channels (red: channel 0) and images.
Prints one JSON line per quality level.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cleaq_jax.data import shards
from cleaq_jax.data.records import QUALITY_NAMES
from cleaq_jax.evaluation import inference, metrics, restore


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a stage directory whose checkpoint holds IQE")
    p.add_argument("--data", required=True, help="the shard directory")
    p.add_argument("--split", default="test")
    args = p.parse_args(argv)
    restored = restore.load_checkpoint(args.checkpoint)
    records = list(shards.iter_records(args.data, args.split))
    image = np.stack([r["image"] for r in records])
    mask = np.stack([r["mask"] for r in records])
    quality = np.array([r["quality"] for r in records])

    @jax.jit
    def enhance(image, mask):
        """The float input, IQE's output and its PSNR against that input inside the mask (as evaluation's)."""
        x, m = inference.inputs({"image": image, "mask": mask})
        out = inference.enhance(restored.models, restored.state, x, m)["enhanced"]
        return x, out, metrics.psnr(out, x, m)

    x, out, psnr = (np.concatenate(parts) for parts in zip(*(
        jax.device_get(enhance(image[i:i + 40], mask[i:i + 40])) for i in range(0, len(image), 40))))
    size = image.shape[1]
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot(yy - size / 2 + 0.5, xx - size / 2 + 0.5) / (size / 2)
    inside = mask > 0
    centre, rim = inside & (radius < 0.35), inside & (radius > 0.6)

    def mean_over(region, values):
        return np.array([v[r].mean() for v, r in zip(values, region)])

    change = out - x
    for q, name in enumerate(QUALITY_NAMES):
        rows = quality == q
        if not rows.any():
            continue
        print(json.dumps({
            "quality": name, "images": int(rows.sum()), "checkpoint": args.checkpoint, "step": restored.step,
            "centre_change": round(float(mean_over(centre[rows], change[rows].mean(-1)).mean()), 4),
            "rim_change": round(float(mean_over(rim[rows], change[rows].mean(-1)).mean()), 4),
            "red_centre_change": round(float(mean_over(centre[rows], change[rows][..., 0]).mean()), 4),
            "psnr_against_input_db": round(float(psnr[rows].mean()), 2)}))


if __name__ == "__main__":
    main()
