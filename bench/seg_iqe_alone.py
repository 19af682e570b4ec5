"""Seg-IQE's vessel branch (a CE-Net) trained alone on stage 1's own batches: how well it can learn the
demo's vessels at a given width, step count, loss, learning rate and input size.

    python bench/seg_iqe_alone.py --workdir W                      # the demo's settings, seeds 0,1,2
    python bench/seg_iqe_alone.py --workdir W --width 0.25 --steps 720 --seeds 0
    python bench/seg_iqe_alone.py --workdir W --loss bce --upsample 2

The data is the demo's (``configs/demo.py``: 800 synthetic images at 64 px, built into ``W/data`` on
first use; ``--size N`` builds the same eyes at N px; ``--data DIR`` names shards of one's own). Every step takes the next batch of stage 1's loader, degrades it as stage 1
does (good images by op2, the others as they are; ``--good-op`` changes the good images' operator) and
trains the CE-Net on the good images' vessel masks with Adam at a constant rate, the loss being stage 1's
``L_Seg`` (``loss.seg``). Nothing of U-IQE or DR takes part: this is the ceiling of the branch itself.

It prints one JSON line per seed: the training loss averaged over the last 30 steps, and on the test
split (the images the evaluation's vessel table segments: good ones degraded by op2, the others as
they are) the per-image AUC of the vessel probability and Dice of
probability > 0.5 inside the retina, averaged over images as eval.md's vessel table averages them, and the
fraction of the retina predicted and truly vessel; a first line scores the classical segmenter
(``eval.vessel_method``) on the same images.
``--upsample N`` resizes inputs N times (bilinear) before the network and its map back (linear), so the
same vessels cover N times more pixels of the network's feature maps.
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
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cleaq_jax.configs import demo
from cleaq_jax.data import degrade, pipeline
from cleaq_jax.evaluation import inference
from cleaq_jax.models import factory
from cleaq_jax.programs import pictures, train
from cleaq_jax.training import losses

GOOD_OPS = {"op2": 0, "op1": 1, "none": 2}  # the QT quality code that gives a good image that operator


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="where the demo's data is built on first use")
    p.add_argument("--data", default="", help="shards to use instead of the demo's")
    p.add_argument("--size", type=int, default=64, help="image size of the demo's data built in --workdir (the demo: 64)")
    p.add_argument("--seeds", default="0,1,2", help="comma list of initialisation seeds")
    p.add_argument("--steps", type=int, default=180, help="training steps (the demo's stage 1: 180)")
    p.add_argument("--width", type=float, default=0.125, help="model.width (the demo: 1/8)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's constant learning rate")
    p.add_argument("--loss", default="dice", choices=("dice", "bce", "dice+bce"), help="the segmentation loss")
    p.add_argument("--upsample", type=int, default=1, help="resize inputs by this factor before the network")
    p.add_argument("--good-op", default="op2", choices=tuple(GOOD_OPS), help="QT operator on good training images")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model key of configs/demo.py, e.g. model.upsample_init=lecun")
    return p.parse_args(argv)


def resize(x: jax.Array, factor: int, method: str) -> jax.Array:
    if factor == 1:
        return x
    b, h, w = x.shape[:3]
    return jax.image.resize(x, (b, h * factor, w * factor, *x.shape[3:]), method)


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = demo.get_config()
    cfg.stage, cfg.model.width, cfg.data.image_size = "stage1", args.width, args.size
    if args.data:
        cfg.data.dir = args.data
    for item in args.set:
        key, _, value = item.partition("=")
        section, name = key.split(".", 1)
        cfg[section][name] = type(cfg[section][name])(value)
    stage, _ = train.describe(cfg, args.workdir, "stage1")
    model = factory.build_models(cfg)["cenet"]
    up, good_code = args.upsample, GOOD_OPS[args.good_op]
    terms = {"dice": (losses.dice_loss,), "bce": (losses.bce_loss,), "dice+bce": (losses.dice_loss, losses.bce_loss)}[args.loss]
    tx = optax.adam(args.lr)

    def loss_fn(params, batch_stats, batch, key):
        x, mask = inference.inputs(batch)
        good = batch["quality"] == 0
        degraded = degrade.quality_transform_batch(x, mask, jnp.where(good, good_code, 2),
                                                   jax.random.split(key, x.shape[0]), stage.qt)
        out, updates = model.apply({"params": params, "batch_stats": batch_stats}, resize(degraded, up, "bilinear"),
                                   train=True, mutable=["batch_stats"])
        vessel = resize(batch["vessel"].astype(jnp.float32)[..., None], up, "nearest")
        pixels = resize(mask[..., None], up, "nearest")
        weight = (good & batch["has_vessel"]).astype(jnp.float32)
        return sum(f(out["vessel_logits"], vessel, pixels, weight) for f in terms), updates["batch_stats"]

    @jax.jit
    def step(params, batch_stats, opt_state, batch, key):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    @jax.jit
    def predict(params, batch_stats, image, mask):
        """Vessel logits (B, S, S, 1) at the image's size (linearly resized back under --upsample)."""
        x, _ = inference.inputs({"image": image, "mask": mask})
        logits = model.apply({"params": params, "batch_stats": batch_stats}, resize(x, up, "bilinear"),
                             train=False)["vessel_logits"]
        return jax.image.resize(logits, (*image.shape[:3], 1), "linear")

    # The test images the evaluation's vessel table segments, degraded by its rule (op2 on good images, the
    # others as they are, keyed by record), and the classical segmenter's scores on them for comparison.
    examples = pictures.load_examples(stage.data_dir, cfg, limit=10**9)
    examples = {k: v[np.asarray(examples["has_vessel"], bool)] for k, v in examples.items()}
    image = pictures.vessel_inputs(stage.qt, examples, 40)[0]["input"]
    mask, vessel = examples["mask"], examples["vessel"]
    classical = pictures.segment_kinds(pictures.classical_segmenter(cfg.eval.vessel_method), {"input": image}, {},
                                       vessel, mask)["input"]
    inside = mask > 0
    print(json.dumps({"segmenter": f"classical ({cfg.eval.vessel_method})", "test_images": len(image),
                      "test_auc": round(float(np.nanmean(classical["auc"])), 3),
                      "test_dice": round(float(np.nanmean(classical["dice"])), 3),
                      "predicted_fraction": round(float(classical["vessels"][inside].mean()), 3),
                      "vessel_fraction": round(float(vessel[inside].mean()), 3)}), flush=True)
    for seed in (int(s) for s in args.seeds.split(",")):
        start = time.perf_counter()
        variables = model.init(jax.random.key(seed), jnp.zeros((2, args.size * up, args.size * up, 3)), train=False)
        params, batch_stats = variables["params"], variables["batch_stats"]
        opt_state = tx.init(params)
        loader = iter(pipeline.train_loader(stage.data_dir, stage.train_split, global_batch_size=stage.batch_size,
                                            sampling=stage.sampling, reading=stage.reading))
        recent = []
        for i in range(args.steps):
            batch = {k: jnp.asarray(v) for k, v in next(loader).items()}
            params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, batch,
                                                        jax.random.fold_in(jax.random.key(seed), i))
            recent = (recent + [loss])[-30:]
        logits = np.concatenate([np.asarray(predict(params, batch_stats, image[j:j + 40], mask[j:j + 40]))
                                 for j in range(0, len(image), 40)])
        scores = pictures.score_seg_iqe(logits, image, vessel, mask)  # as eval.md's Seg-IQE row scores it
        print(json.dumps({
            "seed": seed, "steps": args.steps, "width": args.width, "lr": args.lr, "loss": args.loss,
            "size": args.size, "upsample": up, "good_op": args.good_op, "set": args.set,
            "train_loss_last30": round(float(np.mean(jax.device_get(recent))), 4),
            "test_auc": round(float(np.nanmean(scores["auc"])), 3),
            "test_dice": round(float(np.nanmean(scores["dice"])), 3),
            "predicted_fraction": round(float(scores["vessels"][inside].mean()), 3),
            "vessel_fraction": round(float(vessel[inside].mean()), 3),
            "test_images": len(image), "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
