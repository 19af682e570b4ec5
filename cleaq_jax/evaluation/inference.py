"""The trained networks' forward passes, shared by training (image summaries), evaluation, predict
and the vessel teacher: loader batches to model inputs, IQA's quality probabilities, IQE's
enhancement, DR's grade (of the raw or the enhanced image), the image panels, and the teacher's vessel
probabilities. Pure functions of a state's variables (a TrainState or an InferenceState), jitted here
once per model settings.

The quality transform of evaluation uses fixed per-example keys (`EVAL_KEY_SEED` and the example's id
hash), so the degraded evaluation images never change between runs.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cleaq_jax.data import degrade
from cleaq_jax.models import factory
from cleaq_jax.runtime import parallel

GOOD = 0  # quality level of a good image
EVAL_KEY_SEED = 20_220_901  # fixed: the degraded evaluation images never change between runs
Batch = dict[str, jax.Array]


def inputs(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """uint8 image (B,H,W,3) and mask (B,H,W) -> float32 image in [0,1] zeroed outside the mask, mask."""
    mask = batch["mask"].astype(jnp.float32)
    return batch["image"].astype(jnp.float32) / 255.0 * mask[..., None], mask


def enhance_before_grading(stage: str) -> bool:
    """Stage 3 trains DR on IQE's output (inference is IQE then DR); stage 1 trains DR on raw images."""
    return stage == "stage3"


# --------------------------------------------------------------------------- the subnetworks
def quality_probs(models: dict, state, x: jax.Array) -> jax.Array:
    """(B, 3) float32 IQA probabilities of good / usable / reject for x (B, H, W, 3) in [0, 1]."""
    logits = models["iqa"].apply(factory.variables(state, "iqa"), x, train=False)["quality_logits"]
    return jax.nn.softmax(logits.astype(jnp.float32))


def enhance(models: dict, state, x: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """IQE's outputs for x (B, H, W, 3): "enhanced" (B, H, W, 3) and, with Seg-IQE, "vessel_logits"
    (B, H, W, 1), float32, zeroed outside mask (B, H, W)."""
    out = models["iqe"].apply(factory.variables(state, "iqe"), x, train=False)
    return {k: v.astype(jnp.float32) * mask[..., None] for k, v in out.items()}


def grade(models: dict, state, x, enhanced, rows, enhance_first: bool) -> jax.Array:
    """(B, K) float32 DR probabilities: of ``enhanced`` where ``enhance_first`` and ``rows``
    (B,) bool, else of the raw x."""
    dr_input = x if enhanced is None or not enhance_first else jnp.where(rows[:, None, None, None],
                                                                        enhanced, x)
    logits = models["dr"].apply(factory.variables(state, "dr"), dr_input, train=False)
    return jax.nn.softmax(logits.astype(jnp.float32))


def rows_to_enhance(probs: jax.Array | None, batch: int, nets: tuple[str, ...], gate: bool | jax.Array
                    ) -> jax.Array:
    """(B,) bool: images IQE enhances; with gating only those IQA does not rate good.

    gate: a Python bool, fixed when the function is traced, or a () bool array, an input of the traced
    function (an exported model's, `cleaq_jax.programs.export`), which then serves both settings.
    """
    if not isinstance(gate, jax.Array) and not gate:
        return jnp.full((batch,), "iqe" in nets)
    if probs is None:
        raise ValueError("quality gating needs an IQA network, but this model has only " + "+".join(nets))
    return ((jnp.argmax(probs, -1) != GOOD) | ~jnp.asarray(gate, bool)) & ("iqe" in nets)


def has_reference(batch: Batch) -> jax.Array:
    """(B,) bool: rows whose record carries a clean ``reference`` (False for loaders' batches without one)."""
    if "has_reference" not in batch:
        return jnp.zeros(batch["quality"].shape, bool)
    return batch["has_reference"].astype(bool)


def reference_or_original(batch: Batch, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B,H,W,3) float32: each row's stored clean ``reference`` (zero outside the mask) where its record
    has one, else the original ``x``; and the (B,) bool `has_reference` saying which."""
    clean = has_reference(batch)
    if "reference" not in batch:
        return x, clean
    stored = batch["reference"].astype(jnp.float32) / 255.0 * mask[..., None]
    return jnp.where(clean[:, None, None, None], stored, x), clean


def enhancement_pair(qt: degrade.QTParams, batch: Batch, x: jax.Array, mask: jax.Array
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What evaluation asks IQE to enhance, and against what: (input, reference, scored).

    A record with a clean reference is scored against it: a good image is first degraded by op2 (it is
    its own clean image), a usable or reject image is enhanced as it is (it is already the degraded
    one). Without one the original is the reference, of op2(good) and op1(usable); reject images are
    not scored. x: (B,H,W,3) float32 from `inputs`; returns input and reference (B,H,W,3) float32
    (zero outside mask) and scored (B,) bool. QT uses evaluation's fixed per-example keys.
    """
    quality = batch["quality"]
    reference, clean = reference_or_original(batch, x, mask)
    # QT's levels: 0 -> op2, 1 -> op1, 2 -> unchanged; a referenced usable image is already degraded.
    level = jnp.where(quality == 0, 0, jnp.where((quality == 1) & ~clean, 1, 2))
    keys = degrade.eval_keys(jax.random.key(EVAL_KEY_SEED), batch["id_hash"])
    degraded = degrade.quality_transform_batch(x, mask, level, keys, qt)
    scored = clean | (quality == 0) | (quality == 1)
    return degraded, reference, scored


# --------------------------------------------------------------------------- raw photographs
def inference_outputs(models: dict, state, x: jax.Array, mask: jax.Array, *, nets: tuple[str, ...],
                      enhance_first: bool, gate_quality: bool | jax.Array) -> dict[str, jax.Array]:
    """The model's answers for raw images (pure; see `compiled_inference` for a cached jit).

    x: (B, H, W, 3) float32 in [0, 1], zero outside the mask; mask: (B, H, W) float32 {0, 1}.
    Returns, for the subnetworks present: ``quality_probs`` (B, 3) IQA on x; ``enhanced`` (B, H, W, 3)
    IQE of x, masked; ``enhance`` (B,) bool: whether the image counts as enhanced (with
    ``gate_quality``, a bool or a traced () bool as `rows_to_enhance` takes it, only those IQA does not
    rate good); ``dr_probs`` (B, K) DR on the enhanced image
    where ``enhance_first`` and ``enhance``, else on x.
    """
    out: dict[str, jax.Array] = {}
    if "iqa" in nets:
        out["quality_probs"] = quality_probs(models, state, x)
    out["enhance"] = rows_to_enhance(out.get("quality_probs"), x.shape[0], nets, gate_quality)
    if "iqe" in nets:
        out["enhanced"] = enhance(models, state, x, mask)["enhanced"]
    if "dr" in nets:
        out["dr_probs"] = grade(models, state, x, out.get("enhanced"), out["enhance"], enhance_first)
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


# --------------------------------------------------------------------------- image panels
def _panels(iqe, qt: degrade.QTParams, state, batch) -> jax.Array:
    x, mask = inputs(batch)
    degraded, reference, _ = enhancement_pair(qt, batch, x, mask)
    out = enhance({"iqe": iqe}, state, degraded, mask)
    if "vessel_logits" in out:
        vessel = jnp.repeat(jax.nn.sigmoid(out["vessel_logits"]), 3, axis=-1) * mask[..., None]
    else:
        vessel = jnp.repeat(batch["vessel"][..., None].astype(jnp.float32), 3, axis=-1)
    return jnp.clip(jnp.concatenate([degraded, out["enhanced"], reference, vessel], axis=2), 0.0, 1.0)


_jit_panels = jax.jit(_panels, static_argnums=(0, 1))


def enhancement_panels(qt: degrade.QTParams, state, models: dict, batch) -> np.ndarray:
    """(n, H, 4W, 3) float32 images in [0,1]: input | enhanced | reference | predicted vessels, the
    input and reference of `enhancement_pair` (the record's clean image where it has one).

    qt: the quality transform of the run; state: a TrainState or InferenceState holding "iqe"; batch: loader arrays (uint8 image, mask,
    vessel, quality, id_hash, optionally reference and has_reference) with n rows, host or device.
    """
    return np.asarray(jax.device_get(_jit_panels(models["iqe"], qt, state, _panel_inputs(batch))))


def compile_enhancement_panels(qt: degrade.QTParams, state, models: dict, batch) -> None:
    """Compile `enhancement_panels` for these arguments without running it (``state`` may be
    ShapeDtypeStructs carrying shardings and weak types): a later call with such arguments finds it compiled."""
    _jit_panels.lower(models["iqe"], qt, state, _panel_inputs(batch)).compile()


def _panel_inputs(batch) -> dict:
    keys = ("image", "mask", "vessel", "quality", "id_hash", "reference", "has_reference")
    return {k: batch[k] for k in keys if k in batch}


# --------------------------------------------------------------------------- the vessel teacher
def _vessel_probs(model: nn.Module, teacher_variables: dict, batch: dict) -> jax.Array:
    x, mask = inputs(batch)
    logits = model.apply(teacher_variables, x, train=False)["vessel_logits"][..., 0]
    return jax.nn.sigmoid(logits) * mask


@functools.lru_cache(maxsize=4)
def _jit_vessel_probs(model: nn.Module):
    return jax.jit(functools.partial(_vessel_probs, model))


def predict_vessels(teacher: Any, images: np.ndarray, masks: np.ndarray, batch_size: int | None = None
                    ) -> np.ndarray:
    """Vessel probabilities of a batch at the teacher's image size, batch split over its mesh.

    teacher: a `restore.Teacher` (model, variables, mesh); images: (B, S, S, 3) uint8 RGB;
    masks: (B, S, S) uint8 {0, 1}; S = teacher.image_size. The batch is padded to ``batch_size`` rows
    (default B), rounded up to a multiple of the device count, so that batches of any B up to it share
    one compiled program. Returns (B, S, S) float32 in [0, 1], 0 outside the mask.
    """
    n = images.shape[0]
    devices = parallel.data_parallel_size(teacher.mesh)
    pad = -(-max(n, batch_size or n) // devices) * devices - n
    batch = {"image": np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.uint8)]),
             "mask": np.concatenate([masks, np.zeros((pad, *masks.shape[1:]), np.uint8)])}
    probs = _jit_vessel_probs(teacher.model)(teacher.variables, parallel.global_batch(batch, teacher.mesh))
    return np.asarray(jax.device_get(probs))[:n]
