"""Evaluation's pictures: downstream vessel segmentation (paper Fig. 8) and Grad-CAM of DR grading (Fig. 9).

- `vessel_evaluation`: a vessel segmenter (the CE-Net vessel teacher named by ``config.eval.vessel_teacher``,
  else the classical filter of `cleaq_jax.data.vesselness`) segments the degraded input of the enhancement
  table (`inference.enhancement_pair`: a good image degraded by op2, a usable or reject image with a clean
  reference as it is, op1 of a usable one without), IQE's enhancement of it and its reference; Dice, AUC
  and accuracy inside the field of view against the split's true vessels, per quality level of the
  original (`vessel_table`). Only splits whose vessel masks are ground truth
  count (synthetic sets, DRIVE): pseudo masks written by ``cleaq_jax.data_prep.pseudo_masks`` are not.
- `gradcam_grid`: a few test photographs per grade (the lowest quality first), IQE's enhancement of them
  and the grader's Grad-CAM on each.

Both run on the first ``config.eval.vessel_max_images`` examples of the split, on the host of every
process (the state may span devices of all of them); process 0 writes them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import cv2
import jax
import ml_collections
import numpy as np

from cleaq_jax import errors
from cleaq_jax.data import pipeline, vesselness
from cleaq_jax.data import shards
from cleaq_jax.data.records import QUALITY_NAMES
from cleaq_jax.evaluation import gradcam, inference, metrics, report, restore
from cleaq_jax.models import factory
from cleaq_jax.programs import teacher as teacher_program
from cleaq_jax.training import stages

VESSEL_KINDS = ("input", "enhanced", "reference", "Seg-IQE")
SCORES = ("dice", "auc", "accuracy")


# --------------------------------------------------------------------------- segmenters
@dataclasses.dataclass(frozen=True)
class Segmenter:
    """A vessel segmenter: ``segment(images uint8 (B, S, S, 3), masks uint8 (B, S, S)) -> (scores float32
    (B, S, S), vessels bool (B, S, S))``; ``name`` says which one, for the table."""

    name: str
    segment: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def classical_segmenter(method: str = "frangi") -> Segmenter:
    """The classical fallback (`vesselness.vessel_segmentation`): its response ranks pixels for the AUC, its
    mask (top 12% of the eroded field of view, small components dropped) is the prediction."""
    if method not in vesselness.METHODS:
        raise errors.ConfigError(f"config.eval.vessel_method={method!r}: choose one of {vesselness.METHODS}")

    def segment(images: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pairs = [vesselness.vessel_segmentation(img, m, method) for img, m in zip(images, masks)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]).astype(bool)

    return Segmenter(f"classical {method} filter", segment)


def teacher_segmenter(path: str) -> Segmenter:
    """The CE-Net vessel teacher restored from ``path`` (a teacher_b stage directory); images are resized
    to the teacher's size and its probabilities back, thresholded at its 0.5."""
    teacher = restore.restore_teacher(path)
    size = teacher.image_size

    def segment(images: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        side = images.shape[1]
        if side != size:
            images = np.stack([cv2.resize(i, (size, size), interpolation=cv2.INTER_AREA) for i in images])
            masks = np.stack([cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST) for m in masks])
        probs = inference.predict_vessels(teacher, images, masks)
        if side != size:
            probs = np.stack([cv2.resize(p, (side, side), interpolation=cv2.INTER_LINEAR) for p in probs])
        return probs, probs > teacher_program.THRESHOLD

    return Segmenter(f"CE-Net vessel teacher {teacher.directory} (step {teacher.step})", segment)


def segmenter_for(cfg: ml_collections.ConfigDict) -> Segmenter:
    """config.eval.vessel_teacher when set, else the classical config.eval.vessel_method."""
    path = cfg.eval.vessel_teacher
    return teacher_segmenter(path) if path else classical_segmenter(cfg.eval.vessel_method)


def true_vessels(data_dir: str, split: str) -> str:
    """Why the split's vessel masks cannot score a segmentation ("" when they are ground truth)."""
    entry = shards.read_manifest(data_dir)["splits"].get(split, {})
    if not entry.get("with_vessel_mask"):
        return f"split {split!r} of {data_dir} has no vessel masks"
    if "vessel_masks" in entry:
        return (f"split {split!r} of {data_dir} carries pseudo vessel masks (cleaq_jax.data_prep.pseudo_masks, "
                f"{entry['vessel_masks'].get('method', '?')}), not true vessels")
    return ""


# --------------------------------------------------------------------------- the vessel table
@functools.lru_cache(maxsize=4)
def _jit_pair(qt):
    def pair(image, mask, quality, id_hash, reference, has_reference):
        batch = {"image": image, "mask": mask, "quality": quality, "id_hash": id_hash, "reference": reference,
                 "has_reference": has_reference}
        x, mask = inference.inputs(batch)
        return inference.enhancement_pair(qt, batch, x, mask)

    return jax.jit(pair)


def _uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(image, np.float32) * 255.0), 0, 255).astype(np.uint8)


def vessel_inputs(qt, batch: dict[str, np.ndarray], batch_size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The images the table segments, by the enhancement table's rule (`inference.enhancement_pair`).

    batch: host arrays of N examples: image (N, S, S, 3) uint8, mask (N, S, S), quality, id_hash (N,),
    optional reference (N, S, S, 3) uint8 and has_reference (N,). A record with a clean reference is
    compared with it (a good image degraded by op2 first); without one, op2(good) and op1(usable) with
    their original; reject images without a reference have none. Returns ({'input', 'reference'}: (N, S,
    S, 3) uint8, masked) and (N,) bool: the rows with a reference.
    """
    n = len(batch["image"])
    reference = batch.get("reference", np.zeros_like(batch["image"]))
    has_reference = np.asarray(batch.get("has_reference", np.zeros(n, bool)), bool)
    degraded, ref, scored = _in_chunks(_jit_pair(qt), n, batch_size, batch["image"], batch["mask"],
                                       np.asarray(batch["quality"], np.int32), np.asarray(batch["id_hash"], np.int32),
                                       reference, has_reference)
    return {"input": _uint8(degraded), "reference": _uint8(ref)}, np.asarray(scored, bool)


def segment_kinds(segmenter: Segmenter, images: dict[str, np.ndarray], present: dict[str, np.ndarray],
                  vessel: np.ndarray, mask: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Segment each kind of image and score it against the true vessels inside the field of view.

    images: {kind: (B, S, S, 3) uint8} for kinds of VESSEL_KINDS; present: {kind: (B,) bool} rows that
    count (default all); vessel, mask: (B, S, S) true vessels and retinal mask.
    Returns {kind: {'dice', 'auc', 'accuracy': (B,) float (NaN where the row does not count), 'vessels':
    (B, S, S) bool, 'image': the (B, S, S, 3) uint8 segmented}}.
    """
    out = {}
    for kind, image in images.items():
        image = (np.asarray(image) * (mask[..., None] != 0)).astype(np.uint8)
        scores, vessels = segmenter.segment(image, mask)
        out[kind] = _scored(scores, vessels, image, vessel, mask, present.get(kind))
    return out


def _scored(scores, vessels, image, vessel, mask, keep=None) -> dict[str, np.ndarray]:
    """One kind's row of `segment_kinds`: Dice, AUC and accuracy of ``vessels`` (ranked by ``scores``) against
    the true ``vessel`` inside ``mask``, NaN outside the rows ``keep`` (default all), with what was segmented."""
    values = jax.device_get(metrics.segmentation_scores(scores, vessel, mask, pred=vessels))
    keep = np.ones(len(image), bool) if keep is None else keep
    return {**{k: np.where(keep, np.asarray(v, np.float64), np.nan) for k, v in values.items()},
            "vessels": vessels, "image": image}


def _means(per_kind: dict[str, dict[str, np.ndarray]], rows: np.ndarray) -> dict[str, dict[str, Any]]:
    table = {}
    for kind in VESSEL_KINDS:
        if kind not in per_kind:
            continue
        counted = rows & np.isfinite(per_kind[kind]["accuracy"])
        table[kind] = {"n": int(counted.sum())}
        for score in SCORES:
            values = per_kind[kind][score][counted]
            values = values[np.isfinite(values)]
            table[kind][score] = float(values.mean()) if values.size else None
    return table


def vessel_table(per_kind: dict[str, dict[str, np.ndarray]], quality: np.ndarray) -> dict[str, Any]:
    """Means of `segment_kinds` scores over images, overall and per quality level of the photograph.

    per_kind: {kind: {'dice', 'auc', 'accuracy': (N,)}} over N images; quality: (N,) int.
    Returns {'overall': {kind: {n, dice, auc, accuracy}}, 'per_quality': {level name: {...}}}; None where
    no image defines a score.
    """
    quality = np.asarray(quality)
    every = np.ones(quality.shape, bool)
    per_quality = {name: _means(per_kind, quality == q) for q, name in enumerate(QUALITY_NAMES) if (quality == q).any()}
    return {"overall": _means(per_kind, every), "per_quality": per_quality}


# --------------------------------------------------------------------------- model passes
@functools.lru_cache(maxsize=4)
def _jit_enhance(model_items: tuple):
    models = dict(model_items)

    def enhance(state, image, mask):
        x, mask = inference.inputs({"image": image, "mask": mask})
        return inference.enhance(models, state, x, mask)

    return jax.jit(enhance)


def load_examples(data_dir: str, cfg: ml_collections.ConfigDict, limit: int) -> dict[str, np.ndarray]:
    """The first ``limit`` valid examples of config.data.eval_split as host arrays (every process alike)."""
    batch_size = max(1, min(limit, int(cfg.eval_batch_size)))
    loader = pipeline.eval_loader(data_dir, cfg.data.eval_split, global_batch_size=batch_size,
                                  reading=pipeline.RecordReading(image_size=int(cfg.data.image_size),
                                                                 process_index=0, process_count=1))
    parts, count = [], 0
    for batch in loader:
        batch = {k: v[batch["valid"]] for k, v in batch.items()}
        parts.append(batch)
        count += len(batch["valid"])
        if count >= limit:
            break
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return {k: v[:limit] for k, v in merged.items()}


def _in_chunks(fn, n: int, size: int, *arrays):
    """fn over rows [i, i + size) of the arrays, the last chunk padded to ``size`` (one compilation); fn
    returns an array or a dict of arrays with one row per input row."""
    parts = []
    for start in range(0, n, size):
        chunk = [a[start:start + size] for a in arrays]
        pad = size - len(chunk[0])
        chunk = [np.concatenate([c, np.zeros((pad, *c.shape[1:]), c.dtype)]) if pad else c for c in chunk]
        parts.append(jax.tree.map(lambda a, keep=size - pad: np.asarray(a)[:keep], jax.device_get(fn(*chunk))))
    return jax.tree.map(lambda *rows: np.concatenate(rows), *parts)


def iqe_outputs(models: dict, state, examples: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """IQE's outputs for each example (`inference.enhance`): "enhanced" (N, S, S, 3) float32 in [0, 1] and,
    with Seg-IQE, "vessel_logits" (N, S, S, 1); zero outside the mask."""
    fn = functools.partial(_jit_enhance(tuple(sorted(models.items()))), state)
    return _in_chunks(fn, len(examples["image"]), batch_size, examples["image"], examples["mask"])


def enhance_examples(models: dict, state, examples: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    """IQE's enhancement of each example: (N, S, S, 3) float32 in [0, 1], zero outside the mask."""
    return iqe_outputs(models, state, examples, batch_size)["enhanced"]


def score_seg_iqe(vessel_logits: np.ndarray, image: np.ndarray, vessel: np.ndarray, mask: np.ndarray
                  ) -> dict[str, np.ndarray]:
    """Seg-IQE's own vessel map of the images IQE enhanced, scored as `segment_kinds` scores a segmenter's:
    its probability ranks pixels for the AUC, probability > 0.5 is its segmentation."""
    probs = np.asarray(jax.nn.sigmoid(np.asarray(vessel_logits, np.float32)[..., 0])) * (mask != 0)
    return _scored(probs, probs > 0.5, image, vessel, mask)


def _example_rows(examples: dict[str, np.ndarray], per_kind: dict) -> tuple[np.ndarray, list[str]]:
    """`report.vessel_rows` of one example per quality level (those with a reference first), and the
    level of each row."""
    n = len(examples["quality"])
    has_ref = np.isfinite(per_kind["reference"]["accuracy"]) if "reference" in per_kind else np.zeros(n, bool)
    picks = []
    for q in range(len(QUALITY_NAMES)):
        rows = np.flatnonzero(examples["quality"] == q)
        if rows.size:
            picks.append(int(rows[np.argsort(~has_ref[rows], kind="stable")][0]))
    picks = np.asarray(picks, int)
    images = {k: np.where(np.isfinite(v["accuracy"][picks])[:, None, None, None], v["image"][picks] / 255.0, 0.0)
              for k, v in per_kind.items()}
    segmented = {k: v["vessels"][picks] for k, v in per_kind.items()}
    levels = [QUALITY_NAMES[int(q)] for q in examples["quality"][picks]]
    return report.vessel_rows(images, segmented, examples["vessel"][picks]), levels


def vessel_evaluation(cfg: ml_collections.ConfigDict, stage: stages.Stage, state, models: dict,
                      examples: dict[str, np.ndarray], batch_size: int, segmenter: Segmenter | None = None
                      ) -> tuple[dict[str, Any] | None, Any]:
    """The downstream vessel block for eval.json / eval.md and the figure's example rows.

    examples: `load_examples` arrays. The degraded input and the reference come from `vessel_inputs`, the
    enhancement is IQE's of that input. Returns (None, reason) when the split has no true vessels, else
    ({'segmenter', 'note', 'overall', 'per_quality'}, rows).
    """
    why = true_vessels(stage.data_dir, cfg.data.eval_split)
    if why:
        return None, why
    rows = np.asarray(examples["has_vessel"], bool)
    examples = {k: v[rows] for k, v in examples.items()}
    images, has_reference = vessel_inputs(stage.qt, examples, batch_size)
    iqe = iqe_outputs(models, state, {"image": images["input"], "mask": examples["mask"]}, batch_size)
    images["enhanced"] = _uint8(iqe["enhanced"])
    segmenter = segmenter_for(cfg) if segmenter is None else segmenter
    per_kind = segment_kinds(segmenter, images, {"reference": has_reference}, examples["vessel"], examples["mask"])
    if "vessel_logits" in iqe:
        per_kind["Seg-IQE"] = score_seg_iqe(iqe["vessel_logits"], images["input"], examples["vessel"],
                                            examples["mask"])
    note = (f"{int(rows.sum())} examples with vessels among the first {len(rows)} of split "
            f"{cfg.data.eval_split!r} (config.eval.vessel_max_images), degraded and referenced as in the "
            "enhancement table.")
    if not cfg.eval.vessel_teacher:
        note += " No vessel teacher configured (config.eval.vessel_teacher): the classical filter segments."
    rows, levels = _example_rows(examples, per_kind)
    block = {"segmenter": segmenter.name, **vessel_table(per_kind, examples["quality"]), "note": note,
             "figure_rows": levels}
    return block, rows


# --------------------------------------------------------------------------- the Grad-CAM grid
def gradcam_picks(grades: np.ndarray, quality: np.ndarray, per_grade: int) -> np.ndarray:
    """Indices of up to ``per_grade`` examples of each grade present, the lowest quality first (the paper's
    Fig. 9 shows degraded photographs), in grade order."""
    picks = []
    for grade in np.unique(grades[grades >= 0]):
        rows = np.flatnonzero(grades == grade)
        picks += list(rows[np.argsort(-quality[rows], kind="stable")][:per_grade])
    return np.asarray(picks, int)


def gradcam_grid(models: dict, state, examples: dict[str, np.ndarray], enhanced: np.ndarray, per_grade: int,
                 batch_size: int) -> dict[str, np.ndarray] | None:
    """`report.gradcam_figure`'s arrays: photograph, enhancement and Grad-CAM overlays of each for the
    `gradcam_picks`, each map explaining the grade the grader gives that image. None without examples."""
    picks = gradcam_picks(np.asarray(examples["dr_grade"]), np.asarray(examples["quality"]), per_grade)
    if picks.size == 0:
        return None
    mask = examples["mask"][picks].astype(np.float32)
    x = examples["image"][picks].astype(np.float32) / 255.0 * mask[..., None]
    grid = {"input": x, "enhanced": enhanced[picks], "grade": examples["dr_grade"][picks],
            "quality": examples["quality"][picks]}
    explain = functools.partial(gradcam.compiled(models["dr"]), factory.variables(state, "dr"))
    for kind in ("input", "enhanced"):
        out = _in_chunks(explain, len(picks), batch_size, grid[kind])
        grid[f"heat_{kind}"] = np.asarray(gradcam.overlay(grid[kind], out["heatmap"], mask))
        grid[f"pred_{kind}"] = out["grade"]
    return grid


# --------------------------------------------------------------------------- what evaluation calls
def evaluation_pictures(cfg: ml_collections.ConfigDict, stage: stages.Stage, state, models: dict,
                        nets: tuple[str, ...]) -> dict[str, Any]:
    """The downstream vessel block and the Grad-CAM grid of a state with IQE (and DR for the grid).

    Returns {'vessels': block or absent, 'vessels_skipped': reason or absent, 'vessel_panels',
    'gradcam'} for `report.write`; empty when the state has no IQE or config.eval.vessel_max_images is 0.
    """
    limit = int(cfg.eval.vessel_max_images)
    if "iqe" not in nets or limit <= 0:
        return {}
    examples = load_examples(stage.data_dir, cfg, limit)
    batch_size = max(1, min(len(examples["image"]), int(cfg.eval_batch_size)))
    out: dict[str, Any] = {}
    block, rows = vessel_evaluation(cfg, stage, state, models, examples, batch_size)
    if block is None:
        out["vessels_skipped"] = rows
    else:
        out["vessels"], out["vessel_panels"] = block, rows
    per_grade = int(cfg.eval.gradcam_per_grade)
    if "dr" in nets and per_grade > 0:
        enhanced = enhance_examples(models, state, examples, batch_size)
        out["gradcam"] = gradcam_grid(models, state, examples, enhanced, per_grade, batch_size)
    return out
