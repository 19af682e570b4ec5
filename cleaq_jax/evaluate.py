"""Evaluation: restore a checkpoint onto whatever devices are present, run the test split, and report
the paper's tables for this run, overall and per quality level (good / usable / reject, paper Fig. 12).

- DR grading (Tables II, V): accuracy, quadratic-weighted kappa, macro precision and F1, confusion matrix.
  Inference is IQE then DR on the raw image (paper III-B) when the model has an IQE; with
  ``config.eval.gate_quality`` IQA decides per image whether to enhance (enhancing good images costs
  accuracy, Fig. 12).
- Enhancement (Tables III, IV): PSNR and SSIM inside the retinal mask of the QT-degraded input and of the
  enhanced image against the original, for good (op2) and usable (op1) images; QT uses fixed per-example
  keys, so the evaluation set never changes.
- Quality assessment (Table VI): accuracy, kappa, macro precision and F1 of IQA on the raw images.

Writes ``eval.json``, ``eval.md``, ``confusion_matrix.png``, ``per_quality.png`` and ``enhancement_grid.png``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from cleaq_jax import checkpoint, metrics, parallel, steps
from cleaq_jax import train_state as ts
from cleaq_jax.data import degrade, pipeline, records

QUALITY = records.QUALITY_NAMES
EVAL_KEY_SEED = 20_220_901  # fixed: the degraded evaluation images never change between runs


# --------------------------------------------------------------------------- device side
def _variables(state: ts.TrainState, name: str) -> dict:
    return {"params": state.params[name], "batch_stats": state.batch_stats[name]}


def _degraded_eval(cfg, batch, x, mask):
    qt = degrade.QTParams.from_config(cfg.qt, image_size=int(cfg.data.image_size))
    keys = degrade.eval_keys(jax.random.key(EVAL_KEY_SEED), batch["id_hash"])
    return degrade.quality_transform_batch(x, mask, batch["quality"], keys, qt)


def make_eval_fn(cfg: ml_collections.ConfigDict, models: dict, nets: tuple[str, ...]):
    """``fn(state, batch) -> per-example outputs`` (all (B,...) arrays; NaN where not applicable)."""
    gate = bool(cfg.eval.gate_quality)

    def fn(state: ts.TrainState, batch):
        x, mask = steps.inputs(batch)
        out = {k: batch[k] for k in ("valid", "dr_grade", "quality", "id_hash")}
        has_ref = (batch["quality"] == 0) | (batch["quality"] == 1)
        q_probs = None
        if "iqa" in nets:
            q = models["iqa"].apply(_variables(state, "iqa"), x, train=False)["quality_logits"]
            q_probs = out["quality_probs"] = jax.nn.softmax(q)
        dr_input = x
        if "iqe" in nets:
            enhance = lambda im: models["iqe"].apply(_variables(state, "iqe"), im, train=False)["enhanced"]  # noqa: E731
            degraded = _degraded_eval(cfg, batch, x, mask)
            enhanced = enhance(degraded) * mask[..., None]
            nan = jnp.full(x.shape[:1], jnp.nan)
            for tag, img in (("input", degraded), ("enhanced", enhanced)):
                out[f"psnr_{tag}"] = jnp.where(has_ref, metrics.psnr(img, x, mask), nan)
                out[f"ssim_{tag}"] = jnp.where(has_ref, metrics.ssim(img, x, mask), nan)
            dr_input = enhance(x) * mask[..., None]
            if gate and q_probs is not None:
                keep = (jnp.argmax(q_probs, -1) == 0)[:, None, None, None]
                dr_input = jnp.where(keep, x, dr_input)
        if "dr" in nets:
            logits = models["dr"].apply(_variables(state, "dr"), dr_input, train=False)
            out["dr_probs"] = jax.nn.softmax(logits)
        return out

    return fn


def enhancement_panels(cfg: ml_collections.ConfigDict, state: ts.TrainState, models: dict, batch) -> np.ndarray:
    """(n, H, 4W, 3) float images in [0,1]: QT-degraded input | enhanced | reference | predicted vessels."""
    x, mask = steps.inputs(batch)
    degraded = _degraded_eval(cfg, batch, x, mask)
    out = models["iqe"].apply(_variables(state, "iqe"), degraded, train=False)
    enhanced = out["enhanced"] * mask[..., None]
    if "vessel_logits" in out:
        vessel = jnp.repeat(jax.nn.sigmoid(out["vessel_logits"]), 3, axis=-1) * mask[..., None]
    else:
        vessel = jnp.repeat(batch["vessel"][..., None].astype(jnp.float32), 3, axis=-1)
    panels = jnp.concatenate([degraded, enhanced, x, vessel], axis=2)
    return np.asarray(jax.device_get(jnp.clip(panels, 0.0, 1.0)))


# --------------------------------------------------------------------------- host side
def collect(cfg, state, models, nets, mesh, data_dir: str) -> dict[str, np.ndarray]:
    """Run the eval function over the whole eval split; per-example outputs of valid rows."""
    from jax.experimental import multihost_utils

    fn = jax.jit(make_eval_fn(cfg, models, nets))
    loader = pipeline.eval_loader(data_dir, cfg.data.eval_split, global_batch_size=int(cfg.eval_batch_size),
                                  image_size=int(cfg.data.image_size))
    parts: list[dict[str, np.ndarray]] = []
    for local in loader:
        out = fn(state, parallel.global_batch(local, mesh))
        parts.append(jax.tree.map(np.asarray, multihost_utils.process_allgather(out, tiled=True)))
    if not parts:
        raise ValueError(f"split {cfg.data.eval_split!r} of {data_dir} is empty (config.data.eval_split)")
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    valid = merged.pop("valid").astype(bool)
    return {k: v[valid] for k, v in merged.items()}


def _classification(y_true: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    known = y_true >= 0
    y, pred, k = y_true[known], probs[known].argmax(-1), probs.shape[-1]
    if y.size == 0:
        return {"n": 0}
    cm = np.asarray(metrics.confusion_matrix(y, pred, k))
    precision, _, f1 = metrics.macro_precision_recall_f1(cm)
    return {"n": int(y.size), "accuracy": float(metrics.accuracy(y, pred)),
            "kappa": float(metrics.quadratic_weighted_kappa(y, pred, k)),
            "precision": float(precision), "f1": float(f1), "confusion_matrix": cm.tolist()}


def summarise(out: dict[str, np.ndarray]) -> dict[str, Any]:
    """Tables from per-example outputs: {'dr', 'iqa', 'enhancement'}, each overall and per quality."""
    result: dict[str, Any] = {"num_examples": int(out["quality"].shape[0])}
    levels = {name: out["quality"] == i for i, name in enumerate(QUALITY)}
    for task, label, prob in (("dr", "dr_grade", "dr_probs"), ("iqa", "quality", "quality_probs")):
        if prob in out:
            result[task] = {"overall": _classification(out[label], out[prob]),
                            "per_quality": {n: _classification(out[label][m], out[prob][m])
                                            for n, m in levels.items() if m.any()}}
    if "psnr_input" in out:
        def table(m):
            return {f"{metric}_{tag}": float(np.nanmean(out[f"{metric}_{tag}"][m])) if np.isfinite(
                out[f"{metric}_{tag}"][m]).any() else None
                    for metric in ("psnr", "ssim") for tag in ("input", "enhanced")} | {"n": int(m.sum())}
        ref = np.isfinite(out["psnr_input"])
        result["enhancement"] = {"overall": table(ref),
                                 "per_quality": {n: table(m & ref) for n, m in levels.items() if (m & ref).any()}}
    return result


def evaluate_state(cfg: ml_collections.ConfigDict, workdir: str, stage: str, state: ts.TrainState,
                   models: dict, mesh, out_dir: str) -> dict[str, Any]:
    """Evaluate a train state (any stage) on config.data.eval_split and write the report into out_dir."""
    from cleaq_jax import report
    from cleaq_jax.train import ensure_data

    data = ensure_data(cfg, workdir)
    nets = tuple(state.params)
    out = collect(cfg, state, models, nets, mesh, data)
    result = {"stage": stage, "split": cfg.data.eval_split, "data_dir": data, **summarise(out)}
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        grid_batch = _first_examples(data, cfg, mesh, int(cfg.eval.num_examples_grid))
        panels = enhancement_panels(cfg, state, models, grid_batch) if "iqe" in nets else None
        report.write(result, out_dir, panels=panels)
        logging.info("%s evaluation written to %s:\n%s", stage, out_dir, report.markdown(result))
    return result


def _first_examples(data_dir, cfg, mesh, n):
    loader = pipeline.eval_loader(data_dir, cfg.data.eval_split, global_batch_size=int(cfg.eval_batch_size),
                                  image_size=int(cfg.data.image_size))
    batch = next(iter(loader))
    return jax.tree.map(lambda a: jnp.asarray(a[:n]), batch)


# --------------------------------------------------------------------------- configs/eval.py
def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Restore config.checkpoint_dir onto the present devices and evaluate it into <workdir>/eval."""
    if not cfg.checkpoint_dir:
        raise ValueError("config.checkpoint_dir is empty: pass --config.checkpoint_dir=<workdir>/stage3 "
                         "(a stage directory or its checkpoints/ folder)")
    directory = cfg.checkpoint_dir
    if os.path.isdir(os.path.join(directory, "checkpoints")):
        directory = os.path.join(directory, "checkpoints")
    trained = checkpoint.read_config(directory)
    merged = merge_for_eval(trained, cfg)
    models = steps.build_models(merged)
    nets = steps.stage_nets(merged, trained.stage)
    mesh = parallel.make_mesh(-1, 1)
    tx = steps.make_optimizer(merged, 1)
    init = lambda k: steps.init_state(merged, models, nets, tx, k)  # noqa: E731
    abstract = jax.eval_shape(init, jax.random.key(0))
    target = checkpoint.abstract_with_shardings(abstract, parallel.state_shardings(abstract, mesh))
    state = checkpoint.restore_state(directory, target)
    return evaluate_state(merged, workdir, trained.stage, state, models, mesh, out_dir=os.path.join(workdir, "eval"))


def merge_for_eval(trained: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The trained model's settings (model, tasks, qt, data.num_grades/image_size) with this run's data
    location, split, batch size and eval options."""
    merged = ml_collections.ConfigDict(trained.to_dict())
    merged.data.dir = cfg.data.dir or trained.data.dir
    merged.data.eval_split = cfg.data.eval_split
    merged.data.synthetic = cfg.data.synthetic if not cfg.data.dir else merged.data.synthetic
    merged.eval_batch_size = cfg.eval_batch_size
    merged.eval = cfg.eval
    return merged


def load_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)
