"""Evaluation: restore a checkpoint onto whatever devices are present, run the test split, and report
the paper's tables for this run, overall and per quality level (good / usable / reject, paper Fig. 12).

- DR grading (Tables II, V): accuracy, quadratic-weighted kappa, macro precision and F1, confusion matrix.
  A stage-3 (joint) model grades IQE's enhancement of the raw image (paper III-B: inference is IQE then
  DR); a stage-1 DR network, trained on raw images, grades them raw. With ``config.eval.gate_quality``
  IQA decides per image whether to enhance (enhancing good images costs accuracy, Fig. 12).
- Enhancement (Tables III, IV): PSNR and SSIM inside the retinal mask of IQE's input and of its
  enhancement against a reference: the record's clean image wherever it has one (good images through
  op2, usable and reject ones as they are), else the original of good (op2) and usable (op1) images
  (`inference.enhancement_pair`); QT uses fixed per-example keys, so the evaluation set never changes.
- Quality assessment (Table VI): accuracy, kappa, macro precision and F1 of IQA on the raw images and,
  for a joint model, on IQE's enhancement of them (the joint pipeline's view, Table VI's CLEAQ-DR row).

The checkpoint is restored by `restore.load_checkpoint`; the forward passes are `inference`'s.
- Downstream vessel segmentation (Fig. 8) and Grad-CAM of DR grading (Fig. 9): `programs.pictures`.

Writes ``eval.json``, ``eval.md``, ``confusion_matrix.png``, ``per_quality.png``, ``enhancement_grid.png``,
``vessels.png`` and ``gradcam_grid.png``.
The per-example outputs are small (probabilities and two scores per image), so they are gathered to the
host and every table, overall or per quality level, is computed there from them (`summarise`).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from cleaq_jax import errors
from cleaq_jax.data import degrade, location, pipeline, records
from cleaq_jax.data import shards
from cleaq_jax.evaluation import inference, metrics, report, restore
from cleaq_jax.programs import pictures
from cleaq_jax.runtime import console, parallel, storage
from cleaq_jax.training import stages

QUALITY = records.QUALITY_NAMES


# --------------------------------------------------------------------------- device side
def _eval_step(models: dict, nets: tuple[str, ...], enhance_first: bool, gate: bool, qt: degrade.QTParams,
               state, batch) -> dict[str, jax.Array]:
    x, mask = inference.inputs(batch)
    out = {k: batch[k] for k in ("valid", "dr_grade", "quality", "id_hash")}
    n = x.shape[0]
    quality = inference.quality_probs(models, state, x) if "iqa" in nets else None
    enhanced = None
    if "iqe" in nets:
        # One IQE pass over the raw images and the enhancement table's inputs.
        degraded, reference, scored = inference.enhancement_pair(qt, batch, x, mask)
        both = inference.enhance(models, state, jnp.concatenate([x, degraded]),
                                 jnp.concatenate([mask, mask]))["enhanced"]
        enhanced, restored = both[:n], both[n:]
        for tag, img in (("input", degraded), ("enhanced", restored)):
            out[f"psnr_{tag}"] = jnp.where(scored, metrics.psnr(img, reference, mask), jnp.nan)
            out[f"ssim_{tag}"] = jnp.where(scored, metrics.ssim(img, reference, mask), jnp.nan)
        out["clean_reference"] = inference.has_reference(batch) & scored
        if quality is not None and enhance_first:
            quality, out["quality_probs_enhanced"] = jnp.split(
                inference.quality_probs(models, state, jnp.concatenate([x, enhanced])), 2)
    if quality is not None:
        out["quality_probs"] = quality
    if "dr" in nets:
        rows = inference.rows_to_enhance(quality, n, nets, gate)
        out["dr_probs"] = inference.grade(models, state, x, enhanced, rows, enhance_first)
    return out


@functools.lru_cache(maxsize=8)
def _jit_eval(model_items: tuple, nets: tuple[str, ...], enhance_first: bool, gate: bool, qt: degrade.QTParams):
    return jax.jit(functools.partial(_eval_step, dict(model_items), nets, enhance_first, gate, qt))


def make_eval_fn(cfg: ml_collections.ConfigDict, stage: stages.Stage, models: dict, nets: tuple[str, ...]):
    """``fn(state, batch) -> per-example outputs`` (jitted; all (B, ...) arrays; NaN where not applicable).

    batch: loader arrays (uint8 image (B,S,S,3), mask, dr_grade, quality, id_hash, valid, reference,
    has_reference). Outputs: valid, dr_grade, quality, id_hash from the batch; dr_probs (B, K);
    quality_probs (B, 3) of IQA on the raw image and, for a joint model, quality_probs_enhanced on IQE's
    output; psnr/ssim_input and psnr/ssim_enhanced of `inference.enhancement_pair`'s input and of its
    enhancement against its reference (the record's clean image, else the original of good and usable
    images; NaN where there is none), and clean_reference (B,) bool, the rows scored against a clean image.
    """
    return _jit_eval(tuple(sorted(models.items())), tuple(nets), inference.enhance_before_grading(stage.name),
                     bool(cfg.eval.gate_quality), stage.qt)


# --------------------------------------------------------------------------- host side
def progress_bar(stage: stages.Stage, split: str, global_batch_size: int, disable: bool = False):
    """The progress bar of an evaluation pass over ``split``: its total is the loader's batch count (from
    the manifest's num_records), so the bar shows how far it is and the time left."""
    total = pipeline.num_eval_batches(stage.data_dir, split, global_batch_size=global_batch_size)
    return console.bar(total, f"{stage.name} evaluation ({split})", unit="batch", disable=disable)


def collect(cfg: ml_collections.ConfigDict, stage: stages.Stage, state, models: dict, mesh, split: str | None = None,
            *, show_progress: bool = True) -> dict[str, np.ndarray]:
    """Run the eval function of ``state``'s subnetworks over the whole of ``split`` (default
    config.data.eval_split) of ``stage.data_dir``; per-example outputs (numpy) of valid rows.
    show_progress: a progress bar (off for validation during training)."""
    parallel.check_batch_divisible(int(cfg.eval_batch_size), mesh, "eval_batch_size")
    split, key = (cfg.data.eval_split, "eval_split") if split is None else (split, "val_split")
    fn = make_eval_fn(cfg, stage, models, _state_nets(state))
    loader = _loader(cfg, stage, split)
    parts: list[dict[str, np.ndarray]] = []
    with progress_bar(stage, split, int(cfg.eval_batch_size), disable=not show_progress) as progress:
        for local in loader:
            out = fn(state, parallel.global_batch(local, mesh))
            parts.append(jax.tree.map(np.asarray, multihost_utils.process_allgather(out, tiled=True)))
            progress.update(1)
    if not parts:
        raise errors.ConfigError(f"split {split!r} of {stage.data_dir} is empty (config.data.{key})")
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    valid = merged.pop("valid").astype(bool)
    return {k: v[valid] for k, v in merged.items()}


def compile_ahead(cfg: ml_collections.ConfigDict, stage: stages.Stage, state, models: dict, mesh,
                  split: str | None = None) -> None:
    """Compile what `collect` runs on ``split`` (default config.data.eval_split) for states shaped and laid
    out as ``state`` (arrays, or ShapeDtypeStructs carrying shardings and weak types), without running it:
    a later `collect` with such a state finds the program compiled. Reads the split's first batch (for its
    shapes) and nothing else; an empty split compiles nothing."""
    split = cfg.data.eval_split if split is None else split
    local = next(iter(_loader(cfg, stage, split)), None)
    if local is not None:
        make_eval_fn(cfg, stage, models, _state_nets(state)).lower(state, parallel.global_batch(local, mesh)).compile()


def _state_nets(state) -> tuple[str, ...]:
    return tuple(n for n in ("iqe", "iqa", "dr") if n in state.params)


def _loader(cfg: ml_collections.ConfigDict, stage: stages.Stage, split: str) -> pipeline.LoaderIterator:
    return pipeline.eval_loader(stage.data_dir, split, global_batch_size=int(cfg.eval_batch_size),
                                reading=pipeline.RecordReading(image_size=stage.image_size))


def _finite(value: Any) -> float | None:
    """A float for JSON, None where undefined (NaN kappa of a single-class subset, no examples)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _classification(y_true: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """accuracy, kappa, macro precision and F1, confusion matrix of argmax(probs) against known labels."""
    known = y_true >= 0
    y, pred, k = y_true[known], probs[known].argmax(-1), probs.shape[-1]
    if y.size == 0:
        return {"n": 0}
    # Counted on the host: the (K, K) matrix is the only array the metric functions then see.
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    precision, _, f1 = metrics.macro_precision_recall_f1(cm)
    # Kappa measures agreement beyond chance between raters; over one true class it is undefined.
    kappa = _finite(metrics.kappa_from_confusion(cm)) if np.unique(y).size > 1 else None
    return {"n": int(y.size), "accuracy": _finite(np.trace(cm) / y.size), "kappa": kappa,
            "precision": _finite(precision), "f1": _finite(f1), "confusion_matrix": cm.tolist()}


def _per_quality(quality: np.ndarray, table, rows: np.ndarray) -> dict[str, Any]:
    return {name: table(rows & (quality == i)) for i, name in enumerate(QUALITY) if (rows & (quality == i)).any()}


def _enhancement_table(out: dict[str, np.ndarray], rows: np.ndarray, clean: np.ndarray) -> dict[str, Any]:
    # n_clean_reference: rows scored against the record's clean image; the rest against the original.
    table: dict[str, Any] = {"n": int(rows.sum()), "n_clean_reference": int((rows & clean).sum())}
    for metric in ("psnr", "ssim"):
        for tag in ("input", "enhanced"):
            values = out[f"{metric}_{tag}"][rows]
            values = values[np.isfinite(values)]  # +inf PSNR (identical images) has no place in a mean
            table[f"{metric}_{tag}"] = _finite(values.mean()) if values.size else None
    return table


def summarise(out: dict[str, np.ndarray]) -> dict[str, Any]:
    """The paper's tables from per-example outputs, overall and per quality level of the original image.

    out: numpy arrays over N examples: quality (N,) int (0 good, 1 usable, 2 reject, -1 unknown),
    dr_grade (N,) int (-1 unknown), optional dr_probs (N, K), quality_probs (N, 3),
    quality_probs_enhanced (N, 3), psnr_input / psnr_enhanced / ssim_input / ssim_enhanced (N,)
    (NaN where the image has no reference), clean_reference (N,) bool (scored against the record's clean
    image; absent: none was). Returns {'num_examples', 'dr', 'iqa', 'iqa_enhanced',
    'enhancement'} (the ones the outputs allow), each {'overall': {...}, 'per_quality': {level: {...}}};
    undefined values are None.
    """
    quality = np.asarray(out["quality"])
    result: dict[str, Any] = {"num_examples": int(quality.shape[0])}
    every = np.ones(quality.shape, bool)
    for task, label, prob in (("dr", "dr_grade", "dr_probs"), ("iqa", "quality", "quality_probs"),
                              ("iqa_enhanced", "quality", "quality_probs_enhanced")):
        if prob in out:
            y, p = np.asarray(out[label]), np.asarray(out[prob])
            table = lambda rows, y=y, p=p: _classification(y[rows], p[rows])  # noqa: E731
            result[task] = {"overall": table(every), "per_quality": _per_quality(quality, table, every)}
    if "psnr_input" in out:
        ref = np.isfinite(np.asarray(out["psnr_input"])) | np.isfinite(np.asarray(out["ssim_input"]))
        clean = np.asarray(out.get("clean_reference", np.zeros(quality.shape, bool)), bool)
        table = lambda rows: _enhancement_table(out, rows, clean)  # noqa: E731
        result["enhancement"] = {"overall": table(ref), "per_quality": _per_quality(quality, table, ref)}
    return result


def validation_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of a `summarise` result that validation during training reports and ranks
    checkpoints by (names in checkpoint.VALIDATION_METRICS): overall DR and IQA kappa and accuracy, PSNR
    and SSIM of the enhancement; those a stage has, and defined."""
    values: dict[str, float] = {}
    for task in ("dr", "iqa"):
        overall = summary.get(task, {}).get("overall", {})
        for name in ("kappa", "accuracy"):
            if overall.get(name) is not None:
                values[f"val_{task}_{name}"] = float(overall[name])
    enhancement = summary.get("enhancement", {}).get("overall", {})
    for name in ("psnr_enhanced", "ssim_enhanced"):
        if enhancement.get(name) is not None:
            values[f"val_{name}"] = float(enhancement[name])
    return values


def evaluate_state(cfg: ml_collections.ConfigDict, stage: stages.Stage, state, models: dict, mesh) -> dict[str, Any]:
    """Evaluate a state of any stage on config.data.eval_split and write the report into
    ``<stage.directory>/eval``.

    state: a TrainState or InferenceState on ``mesh``; its subnetworks decide what is evaluated.
    Returns the `summarise` dict with stage, split, data_dir and the inference settings added.
    """
    nets = tuple(n for n in ("iqe", "iqa", "dr") if n in state.params)
    out = collect(cfg, stage, state, models, mesh)
    dr_input = ("raw" if not (inference.enhance_before_grading(stage.name) and "iqe" in nets) else
                "gated" if cfg.eval.gate_quality else "enhanced")
    result = {"stage": stage.name, "split": cfg.data.eval_split, "data_dir": stage.data_dir, "nets": list(nets),
              "dr_input": dr_input if "dr" in nets else None, **summarise(out)}
    panels = None
    if "iqe" in nets and int(cfg.eval.num_examples_grid) > 0:
        # Every process runs it: the state may span devices of all of them.
        examples = first_examples(cfg, stage.data_dir, int(cfg.eval.num_examples_grid))
        panels = inference.enhancement_panels(stage.qt, state, models, examples)
    extra = pictures.evaluation_pictures(cfg, stage, state, models, nets)
    result.update({k: extra[k] for k in ("vessels", "vessels_skipped") if k in extra})
    out_dir = os.path.join(stage.directory, "eval")
    if jax.process_index() == 0:
        report.write(result, out_dir, panels=panels, vessel_panels=extra.get("vessel_panels"),
                     gradcam=extra.get("gradcam"))
        console.say("%s evaluation (%s):\n%s", stage.name, result["split"], report.console_summary(result, out_dir))
    return result


def first_examples(cfg: ml_collections.ConfigDict, data_dir: str, n: int) -> dict[str, np.ndarray]:
    """The first n valid examples of the eval split, for the figure (host arrays, this process)."""
    loader = pipeline.eval_loader(data_dir, cfg.data.eval_split, global_batch_size=max(n, 1),
                                  reading=pipeline.RecordReading(image_size=int(cfg.data.image_size),
                                                                 process_index=0, process_count=1))
    batch = next(iter(loader))
    return {k: v[batch["valid"]] for k, v in batch.items()}


# --------------------------------------------------------------------------- configs/eval.py
def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Restore config.checkpoint_dir onto the present devices and evaluate it into <workdir>/eval."""
    if not cfg.checkpoint_dir:
        raise errors.ConfigError("config.checkpoint_dir is empty: pass --config.checkpoint_dir=<workdir>/stage3 "
                                 "(a stage directory or its checkpoints/ folder)")
    mesh = parallel.make_mesh(-1, 1)
    restored = restore.load_checkpoint(cfg.checkpoint_dir, mesh, cfg.checkpoint_step)
    merged = merge_for_eval(restored.config, cfg, restored.directory)
    console.say("evaluating %s step %d (%s; %s: %s) on split %r", restored.directory, restored.step,
                restored.chosen, restored.stage, "+".join(restored.nets), merged.data.eval_split)
    # The restored stage as trained, reading this run's data and writing into <workdir>/eval.
    stage = stages.Stage.from_config(merged, restored.stage, steps_per_epoch=0, directory=workdir,
                                     data_dir=location.ensure_data(merged.data, workdir))
    return evaluate_state(merged, stage, restored.state, restored.models, mesh)


def merge_for_eval(trained: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict,
                   directory: str = "") -> ml_collections.ConfigDict:
    """The trained model's settings (model, tasks, qt, data.num_grades / image_size) with this run's data
    location, split, batch size and eval options.

    The data: config.data.dir if set, else the trained run's data.dir, else (synthetic data built into
    the training workdir) <training workdir>/data next to the checkpoint's stage directory when it is
    there; failing that the synthetic set is rebuilt, identically, into this run's workdir.
    """
    merged = ml_collections.ConfigDict(trained.to_dict())
    merged.data.eval_split = cfg.data.eval_split
    merged.eval_batch_size = cfg.eval_batch_size
    merged.eval = ml_collections.ConfigDict(cfg.eval.to_dict())
    merged.checkpoint_dir = cfg.checkpoint_dir
    if cfg.data.dir:
        merged.data.dir = cfg.data.dir
    elif not trained.data.dir and trained.data.synthetic.num > 0 and directory:
        train_data = os.path.join(os.path.dirname(os.path.dirname(directory)), "data")  # <workdir>/<stage>/checkpoints
        if not storage.is_remote(train_data) and os.path.exists(os.path.join(train_data, shards.MANIFEST)):
            merged.data.dir = train_data
    return merged
