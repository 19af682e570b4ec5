"""Evaluation of the CE-Net vessel teacher of the pseudo structure masks (paper III-C).

`evaluate_state`: Dice, accuracy, sensitivity, specificity and AUC of the vessel map inside the
field-of-view mask on ``config.data.eval_split`` (DRIVE test), on the images as they are and on
QT-degraded copies of them (op1 or op2 by example id, fixed keys), written as eval.json and eval.md.

Its training steps are in `cleaq_jax.training.steps` (on-device augmentation: `cleaq_jax.data.augment`);
restoring it is `restore.restore_teacher`, its vessel probabilities `inference.predict_vessels`
(used by ``python -m cleaq_jax.data_prep.pseudo_masks``).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cleaq_jax import errors
from cleaq_jax.data import degrade, pipeline
from cleaq_jax.evaluation import inference, report
from cleaq_jax.models import factory
from cleaq_jax.runtime import console, parallel, storage
from cleaq_jax.training import stages

THRESHOLD = 0.5  # vessel probability above which a pixel is a vessel (CE-Net's)
# AUC from histograms of the logits: bins of 1/128 logit over [-32, 32] (exact to ~1e-4 in tests).
AUC_BINS = 8192
AUC_LOGIT_RANGE = 32.0


# --------------------------------------------------------------------------- evaluation
def segmentation_counts(logits: jax.Array, vessel: jax.Array, mask: jax.Array, weight: jax.Array
                        ) -> dict[str, jax.Array]:
    """Pixel counts of a batch inside the field of view, summable over batches (and devices).

    logits: (B, H, W) float32 vessel logits; vessel, mask: (B, H, W) {0, 1}; weight: (B,) {0, 1} (0 for
    padding rows and images without a vessel mask). Returns float32 scalars tp, fp, fn, tn (at
    probability `THRESHOLD`), dice_sum (sum of per-image Dice) and images, and (AUC_BINS,) histograms
    pos_hist / neg_hist of the logits of vessel / background pixels.
    """
    inside = mask.astype(jnp.float32) * weight.astype(jnp.float32)[:, None, None]
    truth = vessel.astype(jnp.float32)
    pred = (logits > jnp.log(THRESHOLD / (1 - THRESHOLD))).astype(jnp.float32)
    per_image = lambda a: jnp.sum(a * inside, axis=(1, 2))  # noqa: E731
    tp, fp = per_image(pred * truth), per_image(pred * (1 - truth))
    fn, tn = per_image((1 - pred) * truth), per_image((1 - pred) * (1 - truth))
    denominator = 2 * tp + fp + fn
    dice = jnp.where(denominator > 0, 2 * tp / jnp.where(denominator > 0, denominator, 1.0), 1.0)
    scaled = (jnp.clip(logits, -AUC_LOGIT_RANGE, AUC_LOGIT_RANGE) + AUC_LOGIT_RANGE) / (2 * AUC_LOGIT_RANGE)
    bins = jnp.clip((scaled * AUC_BINS).astype(jnp.int32), 0, AUC_BINS - 1).ravel()
    histogram = lambda w: jax.ops.segment_sum(w.ravel(), bins, num_segments=AUC_BINS)  # noqa: E731
    return {"tp": tp.sum(), "fp": fp.sum(), "fn": fn.sum(), "tn": tn.sum(),
            "dice_sum": jnp.sum(dice * weight), "images": jnp.sum(weight.astype(jnp.float32)),
            "pos_hist": histogram(inside * truth), "neg_hist": histogram(inside * (1 - truth))}


def auc_from_histograms(pos_hist: np.ndarray, neg_hist: np.ndarray) -> float | None:
    """Area under the ROC curve from score histograms (ties within a bin count one half).

    pos_hist, neg_hist: (K,) counts of positive / negative pixels per ascending score bin.
    Returns None when either class is absent.
    """
    pos, neg = np.asarray(pos_hist, np.float64), np.asarray(neg_hist, np.float64)
    if pos.sum() <= 0 or neg.sum() <= 0:
        return None
    below = np.cumsum(neg) - neg
    return float(np.sum(pos * (below + 0.5 * neg)) / (pos.sum() * neg.sum()))


def summarise_counts(counts: dict[str, np.ndarray]) -> dict[str, Any]:
    """`segmentation_counts` summed over a split -> {images, dice (pooled pixels), mean_image_dice,
    accuracy, sensitivity, specificity, auc}; None where undefined."""
    tp, fp, fn, tn = (float(counts[k]) for k in ("tp", "fp", "fn", "tn"))
    ratio = lambda a, b: a / b if b > 0 else None  # noqa: E731
    images = float(counts["images"])
    return {"images": int(images), "dice": ratio(2 * tp, 2 * tp + fp + fn),
            "mean_image_dice": ratio(float(counts["dice_sum"]), images),
            "accuracy": ratio(tp + tn, tp + fp + fn + tn), "sensitivity": ratio(tp, tp + fn),
            "specificity": ratio(tn, tn + fp), "auc": auc_from_histograms(counts["pos_hist"], counts["neg_hist"])}


def _eval_counts(model: nn.Module, qt: degrade.QTParams, variables: dict, batch: dict) -> dict:
    """Counts on the images as they are ("raw") and QT-degraded ("degraded": op2 for even, op1 for odd
    id hashes, keys fixed by the id), in one forward pass over both."""
    x, mask = inference.inputs(batch)
    keys = degrade.eval_keys(jax.random.key(inference.EVAL_KEY_SEED), batch["id_hash"])
    degraded = degrade.quality_transform_batch(x, mask, batch["id_hash"] % 2, keys, qt)
    logits = model.apply(variables, jnp.concatenate([x, degraded]), train=False)["vessel_logits"][..., 0]
    weight = batch["valid"] & batch["has_vessel"]
    n = x.shape[0]
    return {"raw": segmentation_counts(logits[:n], batch["vessel"], mask, weight),
            "degraded": segmentation_counts(logits[n:], batch["vessel"], mask, weight)}


@functools.lru_cache(maxsize=4)
def _jit_eval_counts(model: nn.Module, qt: degrade.QTParams):
    return jax.jit(functools.partial(_eval_counts, model, qt))


def collect_counts(cfg: ml_collections.ConfigDict, stage: stages.Stage, variables: dict, model: nn.Module, mesh
                   ) -> dict[str, dict[str, np.ndarray]]:
    """`segmentation_counts` of the teacher over config.data.eval_split of ``stage.data_dir``, summed:
    {"raw", "degraded"}. variables: CE-Net's {"params", "batch_stats"} on ``mesh``. Every process gets
    the same sums.
    """
    parallel.check_batch_divisible(int(cfg.eval_batch_size), mesh, "eval_batch_size")
    fn = _jit_eval_counts(model, stage.qt)
    loader = pipeline.eval_loader(stage.data_dir, cfg.data.eval_split, global_batch_size=int(cfg.eval_batch_size),
                                  reading=pipeline.RecordReading(image_size=stage.image_size))
    total: dict[str, dict[str, np.ndarray]] = {}
    batches = pipeline.num_eval_batches(stage.data_dir, cfg.data.eval_split,
                                        global_batch_size=int(cfg.eval_batch_size))
    with console.bar(batches, f"{stage.name} evaluation ({cfg.data.eval_split})", unit="batch") as progress:
        for local in loader:
            out = jax.device_get(fn(variables, parallel.global_batch(local, mesh)))
            total = out if not total else jax.tree.map(np.add, total, out)
            progress.update(1)
    if not total:
        raise errors.ConfigError(f"split {cfg.data.eval_split!r} of {stage.data_dir} is empty (config.data.eval_split)")
    return total


def markdown(result: dict[str, Any]) -> str:
    """The teacher's evaluation as a Markdown table."""
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    keys = ("dice", "mean_image_dice", "accuracy", "sensitivity", "specificity", "auc")
    lines = [f"# Vessel teacher: {result['stage']} on split {result['split']}", "",
             f"{result['raw']['images']} images with vessel masks from `{result['data_dir']}`; pixels inside the "
             f"field-of-view mask; vessel where the probability exceeds {result['threshold']}.", "",
             "| input | Dice | mean Dice per image | accuracy | sensitivity | specificity | AUC |",
             "|---|---|---|---|---|---|---|"]
    for name, label in (("raw", "as is"), ("degraded", "QT-degraded (op2 / op1, fixed keys)")):
        lines.append(f"| {label} | " + " | ".join(fmt(result[name][k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def evaluate_state(cfg: ml_collections.ConfigDict, stage: stages.Stage, state, models: dict, mesh) -> dict[str, Any]:
    """Evaluate the teacher in a train state on config.data.eval_split; write eval.json and eval.md into
    ``<stage.directory>/eval``.

    state: a TrainState (or any object with .params / .batch_stats dicts) holding "cenet", on ``mesh``;
    models: `factory.build_models` output. Returns {stage, split, data_dir, threshold, raw, degraded}, the
    last two from `summarise_counts`.
    """
    counts = collect_counts(cfg, stage, factory.variables(state, "cenet"), models["cenet"], mesh)
    result = {"stage": stage.name, "split": cfg.data.eval_split, "data_dir": stage.data_dir, "threshold": THRESHOLD,
              **{name: summarise_counts(c) for name, c in counts.items()}}
    out_dir = os.path.join(stage.directory, "eval")
    if jax.process_index() == 0:
        storage.makedirs(out_dir)
        report.atomic_file(os.path.join(out_dir, "eval.json"), lambda tmp: _dump(tmp, json.dumps(result, indent=2)))
        report.atomic_file(os.path.join(out_dir, "eval.md"), lambda tmp: _dump(tmp, markdown(result)))
        console.say("%s evaluation written to %s:\n%s", stage.name, out_dir, markdown(result))
    return result


def _dump(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
