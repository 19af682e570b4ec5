"""Evaluation: restore a checkpoint onto whatever devices are present, run the test split, and report
the paper's tables for this run, overall and per quality level (good / usable / reject, paper Fig. 12).

- DR grading (Tables II, V): accuracy, quadratic-weighted kappa, macro precision and F1, confusion matrix.
  A stage-3 (joint) model grades IQE's enhancement of the raw image (paper III-B: inference is IQE then
  DR); a stage-1 DR network, trained on raw images, grades them raw. With ``config.eval.gate_quality``
  IQA decides per image whether to enhance (enhancing good images costs accuracy, Fig. 12).
- Enhancement (Tables III, IV): PSNR and SSIM inside the retinal mask of the QT-degraded input and of the
  enhanced image against the original, for good (op2) and usable (op1) images; QT uses fixed per-example
  keys, so the evaluation set never changes.
- Quality assessment (Table VI): accuracy, kappa, macro precision and F1 of IQA on the raw images and,
  for a joint model, on IQE's enhancement of them (the joint pipeline's view, Table VI's CLEAQ-DR row).

Writes ``eval.json``, ``eval.md``, ``confusion_matrix.png``, ``per_quality.png`` and ``enhancement_grid.png``.
The per-example outputs are small (probabilities and two scores per image), so they are gathered to the
host and every table, overall or per quality level, is computed there from them (`summarise`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from cleaq_jax import checkpoint, metrics, parallel, steps
from cleaq_jax.data import degrade, pipeline, records

QUALITY = records.QUALITY_NAMES
GOOD = 0
EVAL_KEY_SEED = 20_220_901  # fixed: the degraded evaluation images never change between runs


class InferenceState(flax.struct.PyTreeNode):
    """What inference needs of a train state: {subnetwork: params} and {subnetwork: batch_stats}."""

    params: dict[str, Any]
    batch_stats: dict[str, Any]


def _variables(state, name: str) -> dict:
    return {"params": state.params[name], "batch_stats": state.batch_stats[name]}


# --------------------------------------------------------------------------- restoring a checkpoint
@dataclasses.dataclass
class Restored:
    """A checkpoint ready for inference: the trained config, the stage that trained it, its subnetworks
    (a tuple of "iqe", "iqa", "dr"), the linen modules, and their variables on the given mesh."""

    config: ml_collections.ConfigDict
    stage: str
    nets: tuple[str, ...]
    models: dict
    state: InferenceState
    directory: str
    step: int


def checkpoint_directory(path: str) -> str:
    """The orbax directory of a stage: ``path`` itself or its ``checkpoints/`` folder.

    Raises FileNotFoundError naming ``path`` when neither holds a checkpoint.
    """
    path = os.path.abspath(os.fspath(path))
    for candidate in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(candidate) and any(n.isdigit() for n in os.listdir(candidate)):
            return candidate
    raise FileNotFoundError(
        f"no checkpoint in {path}: pass a stage directory written by training (e.g. <workdir>/stage3) "
        "or its checkpoints/ folder")


def _manager(directory: str):
    import orbax.checkpoint as ocp

    # Read-only, and a PyTree handler (not Standard) so the state can be restored in part.
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _tuples(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _tuples(v) for k, v in tree.items()}
    return tuple(_tuples(v) for v in tree) if isinstance(tree, list) else tree


def read_trained_config(directory: str, step: int | None = None) -> ml_collections.ConfigDict:
    """The config a checkpoint was saved with (read-only; JSON lists back to tuples).

    directory: a checkpoints/ folder (see `checkpoint_directory`); step: default the latest.
    """
    import orbax.checkpoint as ocp

    with _manager(directory) as manager:
        step = manager.latest_step() if step is None else step
        if step is None or not os.path.isdir(os.path.join(directory, str(step), "config")):
            raise FileNotFoundError(f"checkpoint {directory} (step {step}) holds no config item; it was not "
                                    "written by cleaq_jax training")
        restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(_tuples(restored.config))


def _stage_of(cfg: ml_collections.ConfigDict, directory: str, nets: tuple[str, ...]) -> str:
    """The stage that wrote the checkpoint: its config's stage, else its stage directory's name."""
    if cfg.get("stage") in steps.STAGES:
        return cfg.stage
    name = os.path.basename(os.path.dirname(directory.rstrip(os.sep)))
    if name in steps.STAGES:
        return name
    # Neither names it: IQA alone is stage 2, DR without IQE stage 1, IQE with others the joint stage.
    return "stage2" if nets == ("iqa",) else "stage1" if "iqe" not in nets else "stage3"


def _abstract_variables(cfg: ml_collections.ConfigDict, models: dict, nets: tuple[str, ...]) -> InferenceState:
    size = int(cfg.data.image_size)
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    shapes = {n: jax.eval_shape(lambda k, x, m=models[n]: m.init(k, x, train=False), jax.random.key(0), x)
              for n in nets}
    return InferenceState(params={n: v["params"] for n, v in shapes.items()},
                          batch_stats={n: v.get("batch_stats", {}) for n, v in shapes.items()})


def load_checkpoint(path: str, mesh: jax.sharding.Mesh | None = None, step: int | None = None) -> Restored:
    """Restore the parameters and BatchNorm statistics of a stage checkpoint for inference.

    path: a stage directory (<workdir>/stage3) or its checkpoints/ folder, saved on any number of
        devices; mesh: where to put the variables (default: every present device, replicated);
    step: default the latest. Optimizer state is not read. Raises FileNotFoundError / ValueError
    naming the directory when it holds no cleaq_jax checkpoint.
    """
    import orbax.checkpoint as ocp

    directory = checkpoint_directory(path)
    cfg = read_trained_config(directory, step)
    mesh = parallel.make_mesh(-1, 1) if mesh is None else mesh
    models = steps.build_models(cfg)
    with _manager(directory) as manager:
        step = manager.latest_step() if step is None else step
        saved = manager.item_metadata(step)["state"]
        nets = tuple(n for n in ("iqe", "iqa", "dr") if n in saved["params"])
        if not nets:
            raise ValueError(f"checkpoint {directory}/{step} holds none of the subnetworks iqe, iqa, dr")
        abstract = _abstract_variables(cfg, models, nets)
        target = checkpoint.abstract_with_shardings(abstract, parallel.state_shardings(abstract, mesh))
        item = {"params": target.params, "batch_stats": target.batch_stats}
        args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                      partial_restore=True)
        restored = manager.restore(step, args=ocp.args.Composite(state=args)).state
    state = InferenceState(params=restored["params"], batch_stats=restored["batch_stats"])
    return Restored(cfg, _stage_of(cfg, directory, nets), nets, models, state, directory, int(step))


# --------------------------------------------------------------------------- device side
def enhance_before_grading(stage: str) -> bool:
    """Stage 3 trains DR on IQE's output (inference is IQE then DR); stage 1 trains DR on raw images."""
    return stage == "stage3"


def _quality_probs(models: dict, state, x: jax.Array) -> jax.Array:
    logits = models["iqa"].apply(_variables(state, "iqa"), x, train=False)["quality_logits"]
    return jax.nn.softmax(logits.astype(jnp.float32))


def _enhance(models: dict, state, x: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    out = models["iqe"].apply(_variables(state, "iqe"), x, train=False)
    return {k: v.astype(jnp.float32) * mask[..., None] for k, v in out.items()}


def _grade(models: dict, state, x, enhanced, enhance, enhance_first: bool) -> jax.Array:
    dr_input = x if enhanced is None or not enhance_first else jnp.where(enhance[:, None, None, None], enhanced, x)
    logits = models["dr"].apply(_variables(state, "dr"), dr_input, train=False)
    return jax.nn.softmax(logits.astype(jnp.float32))


def _enhance_mask(quality_probs: jax.Array | None, batch: int, nets: tuple[str, ...], gate: bool) -> jax.Array:
    """(B,) bool: images IQE enhances; with gating only those IQA does not rate good."""
    if not gate:
        return jnp.full((batch,), "iqe" in nets)
    if quality_probs is None:
        raise ValueError("quality gating needs an IQA network, but this model has only " + "+".join(nets))
    return (jnp.argmax(quality_probs, -1) != GOOD) & ("iqe" in nets)


def inference_outputs(models: dict, state, x: jax.Array, mask: jax.Array, *, nets: tuple[str, ...],
                      enhance_first: bool, gate_quality: bool) -> dict[str, jax.Array]:
    """The model's answers for raw images (pure; see `compiled_inference` for a cached jit).

    x: (B, H, W, 3) float32 in [0, 1], zero outside the mask; mask: (B, H, W) float32 {0, 1}.
    Returns, for the subnetworks present: ``quality_probs`` (B, 3) IQA on x; ``enhanced`` (B, H, W, 3)
    IQE of x, masked; ``enhance`` (B,) bool: whether the image counts as enhanced (with
    ``gate_quality`` only those IQA does not rate good); ``dr_probs`` (B, K) DR on the enhanced image
    where ``enhance_first`` and ``enhance``, else on x.
    """
    out: dict[str, jax.Array] = {}
    if "iqa" in nets:
        out["quality_probs"] = _quality_probs(models, state, x)
    out["enhance"] = _enhance_mask(out.get("quality_probs"), x.shape[0], nets, gate_quality)
    if "iqe" in nets:
        out["enhanced"] = _enhance(models, state, x, mask)["enhanced"]
    if "dr" in nets:
        out["dr_probs"] = _grade(models, state, x, out.get("enhanced"), out["enhance"], enhance_first)
    return out


@functools.lru_cache(maxsize=8)
def _jit_inference(model_items: tuple, nets: tuple[str, ...], enhance_first: bool, gate_quality: bool):
    models = dict(model_items)
    return jax.jit(lambda state, x, mask: inference_outputs(models, state, x, mask, nets=nets,
                                                            enhance_first=enhance_first, gate_quality=gate_quality))


def compiled_inference(models: dict, nets: tuple[str, ...], *, enhance_first: bool, gate_quality: bool):
    """``fn(state, x, mask) -> inference_outputs(...)`` under jit, one compilation per model settings
    (linen modules compare by their fields, so a rebuilt model reuses it)."""
    return _jit_inference(tuple(sorted(models.items())), tuple(nets), bool(enhance_first), bool(gate_quality))


def _degraded_eval(qt: degrade.QTParams, batch, x, mask):
    keys = degrade.eval_keys(jax.random.key(EVAL_KEY_SEED), batch["id_hash"])
    return degrade.quality_transform_batch(x, mask, batch["quality"], keys, qt)


def _eval_step(models: dict, nets: tuple[str, ...], enhance_first: bool, gate: bool, qt: degrade.QTParams,
               state, batch) -> dict[str, jax.Array]:
    x, mask = steps.inputs(batch)
    out = {k: batch[k] for k in ("valid", "dr_grade", "quality", "id_hash")}
    n = x.shape[0]
    quality = _quality_probs(models, state, x) if "iqa" in nets else None
    enhanced = None
    if "iqe" in nets:
        # One IQE pass over the raw images and their QT-degraded copies (the enhancement table's input).
        degraded = _degraded_eval(qt, batch, x, mask)
        both = _enhance(models, state, jnp.concatenate([x, degraded]), jnp.concatenate([mask, mask]))["enhanced"]
        enhanced, restored = both[:n], both[n:]
        has_ref = (batch["quality"] == 0) | (batch["quality"] == 1)
        for tag, img in (("input", degraded), ("enhanced", restored)):
            out[f"psnr_{tag}"] = jnp.where(has_ref, metrics.psnr(img, x, mask), jnp.nan)
            out[f"ssim_{tag}"] = jnp.where(has_ref, metrics.ssim(img, x, mask), jnp.nan)
        if quality is not None and enhance_first:
            quality, out["quality_probs_enhanced"] = jnp.split(
                _quality_probs(models, state, jnp.concatenate([x, enhanced])), 2)
    if quality is not None:
        out["quality_probs"] = quality
    if "dr" in nets:
        out["dr_probs"] = _grade(models, state, x, enhanced, _enhance_mask(quality, n, nets, gate), enhance_first)
    return out


@functools.lru_cache(maxsize=8)
def _jit_eval(model_items: tuple, nets: tuple[str, ...], enhance_first: bool, gate: bool, qt: degrade.QTParams):
    return jax.jit(functools.partial(_eval_step, dict(model_items), nets, enhance_first, gate, qt))


def make_eval_fn(cfg: ml_collections.ConfigDict, models: dict, nets: tuple[str, ...], stage: str):
    """``fn(state, batch) -> per-example outputs`` (jitted; all (B, ...) arrays; NaN where not applicable).

    batch: loader arrays (uint8 image (B,S,S,3), mask, dr_grade, quality, id_hash, valid). Outputs:
    valid, dr_grade, quality, id_hash from the batch; dr_probs (B, K); quality_probs (B, 3) of IQA on the
    raw image and, for a joint model, quality_probs_enhanced on IQE's output; psnr/ssim_input (QT-degraded
    original) and psnr/ssim_enhanced (its enhancement) against the original, for good and usable images.
    """
    qt = degrade.QTParams.from_config(cfg.qt, image_size=int(cfg.data.image_size))
    return _jit_eval(tuple(sorted(models.items())), tuple(nets), enhance_before_grading(stage),
                     bool(cfg.eval.gate_quality), qt)


def _panels(iqe, qt: degrade.QTParams, state, batch) -> jax.Array:
    x, mask = steps.inputs(batch)
    degraded = _degraded_eval(qt, batch, x, mask)
    out = _enhance({"iqe": iqe}, state, degraded, mask)
    if "vessel_logits" in out:
        vessel = jnp.repeat(jax.nn.sigmoid(out["vessel_logits"]), 3, axis=-1) * mask[..., None]
    else:
        vessel = jnp.repeat(batch["vessel"][..., None].astype(jnp.float32), 3, axis=-1)
    return jnp.clip(jnp.concatenate([degraded, out["enhanced"], x, vessel], axis=2), 0.0, 1.0)


_jit_panels = jax.jit(_panels, static_argnums=(0, 1))


def enhancement_panels(cfg: ml_collections.ConfigDict, state, models: dict, batch) -> np.ndarray:
    """(n, H, 4W, 3) float32 images in [0,1]: QT-degraded input | enhanced | reference | predicted vessels.

    state: a TrainState or InferenceState holding "iqe"; batch: loader arrays (uint8 image, mask,
    vessel, quality, id_hash) with n rows, host or device.
    """
    qt = degrade.QTParams.from_config(cfg.qt, image_size=int(cfg.data.image_size))
    keys = ("image", "mask", "vessel", "quality", "id_hash")
    return np.asarray(jax.device_get(_jit_panels(models["iqe"], qt, state, {k: batch[k] for k in keys})))


# --------------------------------------------------------------------------- host side
def _check_eval_batch(cfg: ml_collections.ConfigDict, mesh) -> None:
    size = parallel.data_parallel_size(mesh)
    if int(cfg.eval_batch_size) % size:
        raise ValueError(f"config.eval_batch_size={cfg.eval_batch_size} does not split over the {size} devices "
                         f"present; set --config.eval_batch_size to a multiple of {size}")


def collect(cfg, state, models, nets, mesh, data_dir: str, stage: str = "stage3") -> dict[str, np.ndarray]:
    """Run the eval function over the whole eval split; per-example outputs (numpy) of valid rows."""
    from jax.experimental import multihost_utils

    _check_eval_batch(cfg, mesh)
    fn = make_eval_fn(cfg, models, nets, stage)
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
    return {"n": int(y.size), "accuracy": _finite(np.trace(cm) / y.size),
            "kappa": _finite(metrics.kappa_from_confusion(cm)),
            "precision": _finite(precision), "f1": _finite(f1), "confusion_matrix": cm.tolist()}


def _per_quality(quality: np.ndarray, table, rows: np.ndarray) -> dict[str, Any]:
    return {name: table(rows & (quality == i)) for i, name in enumerate(QUALITY) if (rows & (quality == i)).any()}


def _enhancement_table(out: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, Any]:
    table: dict[str, Any] = {"n": int(rows.sum())}
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
    (NaN where the image has no reference). Returns {'num_examples', 'dr', 'iqa', 'iqa_enhanced',
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
        table = lambda rows: _enhancement_table(out, rows)  # noqa: E731
        result["enhancement"] = {"overall": table(ref), "per_quality": _per_quality(quality, table, ref)}
    return result


def evaluate_state(cfg: ml_collections.ConfigDict, workdir: str, stage: str, state, models: dict, mesh,
                   out_dir: str) -> dict[str, Any]:
    """Evaluate a train state of any stage on config.data.eval_split and write the report into out_dir.

    state: a TrainState or InferenceState on ``mesh``; its subnetworks decide what is evaluated.
    Returns the `summarise` dict with stage, split, data_dir and the inference settings added.
    """
    from cleaq_jax import report
    from cleaq_jax.train import ensure_data  # data location and synthetic build live with the trainer

    data = ensure_data(cfg, workdir)
    nets = tuple(n for n in ("iqe", "iqa", "dr") if n in state.params)
    out = collect(cfg, state, models, nets, mesh, data, stage)
    dr_input = ("raw" if not (enhance_before_grading(stage) and "iqe" in nets) else
                "gated" if cfg.eval.gate_quality else "enhanced")
    result = {"stage": stage, "split": cfg.data.eval_split, "data_dir": data, "nets": list(nets),
              "dr_input": dr_input if "dr" in nets else None, **summarise(out)}
    panels = None
    if "iqe" in nets and int(cfg.eval.num_examples_grid) > 0:
        # Every process runs it: the state may span devices of all of them.
        panels = enhancement_panels(cfg, state, models, _first_examples(data, cfg, int(cfg.eval.num_examples_grid)))
    if jax.process_index() == 0:
        report.write(result, out_dir, panels=panels)
        logging.info("%s evaluation written to %s:\n%s", stage, out_dir, report.markdown(result))
    return result


def _first_examples(data_dir: str, cfg: ml_collections.ConfigDict, n: int) -> dict[str, np.ndarray]:
    """The first n valid examples of the eval split, for the figure (host arrays, this process)."""
    loader = pipeline.eval_loader(data_dir, cfg.data.eval_split, global_batch_size=max(n, 1), process_index=0,
                                  process_count=1, image_size=int(cfg.data.image_size))
    batch = next(iter(loader))
    return {k: v[batch["valid"]] for k, v in batch.items()}


# --------------------------------------------------------------------------- configs/eval.py
def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Restore config.checkpoint_dir onto the present devices and evaluate it into <workdir>/eval."""
    if not cfg.checkpoint_dir:
        raise ValueError("config.checkpoint_dir is empty: pass --config.checkpoint_dir=<workdir>/stage3 "
                         "(a stage directory or its checkpoints/ folder)")
    mesh = parallel.make_mesh(-1, 1)
    restored = load_checkpoint(cfg.checkpoint_dir, mesh)
    merged = merge_for_eval(restored.config, cfg, restored.directory)
    logging.info("evaluating %s (%s, step %d: %s) on split %r", restored.directory, restored.stage, restored.step,
                 "+".join(restored.nets), merged.data.eval_split)
    return evaluate_state(merged, workdir, restored.stage, restored.state, restored.models, mesh,
                          out_dir=os.path.join(workdir, "eval"))


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
        if os.path.exists(os.path.join(train_data, records.MANIFEST)):
            merged.data.dir = train_data
    return merged
