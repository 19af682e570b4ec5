"""Grad-CAM (Selvaraju et al., ICCV 2017) of the DR grader: where grading looks (paper Fig. 9).

For the grade c, with A the last ResNet stage's feature map (B, h, w, K) and y_c the grade's logit,

    alpha_k = mean_ij d y_c / d A_ij^k,      cam = ReLU(sum_k alpha_k A^k)    (B, h, w),

upsampled bilinearly to the input size and divided by its per-image maximum (an all-zero map stays
zero), so every heatmap lies in [0, 1].

The feature map and its gradient come from the grader itself: a flax method interceptor adds a zero
offset to the output of the trunk's last stage (``backbone/layer{n}``, n = len(stage_sizes)) and
``jax.grad`` with respect to that offset is the gradient with respect to the map. The model's code,
outputs and parameter tree stay as they are, and the gradient runs through the real head (pooling and
``fc``), whatever it becomes. Everything is a pure function of (variables, images): jittable with the
module static, batched (BatchNorm in inference mode, so examples do not interact).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cleaq_jax.models import dr as dr_model
from cleaq_jax.models import resnet


def last_stage_name(model: dr_model.DRGrader) -> str:
    """Name of the trunk's last stage inside ``model.backbone`` (``layer4`` for ResNet-50)."""
    return f"layer{len(tuple(model.stage_sizes))}"


def cam_from_gradients(features: jax.Array, grads: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Grad-CAM heatmaps from a feature map and the gradient of the explained score with respect to it.

    Args:
      features: (B, h, w, K) float feature map A.
      grads: (B, h, w, K) float d y_c / d A (same shape).
      size: (H, W) output size, usually the input image's.
    Returns:
      (B, H, W) float32 in [0, 1]: ReLU(sum_k mean_ij(grads) A^k), bilinearly resized, over its maximum.
    """
    if features.shape != grads.shape or features.ndim != 4:
        raise ValueError(f"features {features.shape} and gradients {grads.shape} must be the same (B, h, w, K)")
    features = features.astype(jnp.float32)
    alpha = jnp.mean(grads.astype(jnp.float32), axis=(1, 2), keepdims=True)  # (B, 1, 1, K)
    cam = nn.relu(jnp.sum(alpha * features, axis=-1))  # (B, h, w)
    cam = jax.image.resize(cam, (cam.shape[0], *size), method="bilinear")
    cam = jnp.maximum(cam, 0.0)  # bilinear weights are convex, but keep the sign exact after round-off
    peak = jnp.max(cam, axis=(1, 2), keepdims=True)
    return jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0)


def _offset_last_stage(stage_name: str, offset: jax.Array, captured: list):
    """Interceptor adding ``offset`` to the output of the backbone's ``stage_name`` and recording it."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if (context.method_name == "__call__" and isinstance(module, resnet.Stage)
                and module.name == stage_name and module.parent is not None
                and getattr(module.parent, "name", None) == "backbone"):
            captured.append(out)
            return out + offset.astype(out.dtype)
        return out

    return interceptor


def feature_map_shape(model: dr_model.DRGrader, variables: dict[str, Any], x: jax.Array) -> jax.ShapeDtypeStruct:
    """Abstract shape of the last stage's output for images ``x`` (B, H, W, 3), without computing it."""

    def run(v, images):
        captured: list = []
        with nn.intercept_methods(_offset_last_stage(last_stage_name(model), jnp.zeros(()), captured)):
            model.apply(v, images, train=False)
        if len(captured) != 1:
            raise ValueError(f"expected one backbone/{last_stage_name(model)} call in {type(model).__name__}, "
                             f"saw {len(captured)}")
        return captured[0]

    return jax.eval_shape(run, variables, x)


def grad_cam(model: dr_model.DRGrader, variables: dict[str, Any], x: jax.Array,
             target: jax.Array | None = None) -> dict[str, jax.Array]:
    """Grad-CAM of a DR grader over a batch of images.

    Args:
      model: the DRGrader module (static under jit, e.g. ``jax.jit(grad_cam, static_argnums=0)``).
      variables: {'params': ..., 'batch_stats': ...} of the grader.
      x: (B, H, W, 3) float images in [0, 1], as the grader takes them.
      target: optional (B,) int grade to explain per image; default the predicted grade.
    Returns:
      dict with 'heatmap' (B, H, W) float32 in [0, 1], 'grade' (B,) int32 (the explained grade),
      'probs' (B, num_grades) float32 softmax of the logits.
    """
    shape = feature_map_shape(model, variables, x)
    stage = last_stage_name(model)

    def explained_score(offset):
        captured: list = []
        with nn.intercept_methods(_offset_last_stage(stage, offset, captured)):
            logits = model.apply(variables, x, train=False)
        grade = jnp.argmax(logits, axis=-1).astype(jnp.int32) if target is None else jnp.asarray(target, jnp.int32)
        # Examples are independent in inference mode, so the gradient of the sum is each one's own.
        score = jnp.sum(jnp.take_along_axis(logits, grade[:, None], axis=-1))
        return score, (captured[0], logits, grade)

    zero = jnp.zeros(shape.shape, shape.dtype)
    grads, (features, logits, grade) = jax.grad(explained_score, has_aux=True)(zero)
    heat = cam_from_gradients(features, grads, x.shape[1:3])
    return {"heatmap": heat, "grade": grade, "probs": jax.nn.softmax(logits.astype(jnp.float32), axis=-1)}


@functools.lru_cache(maxsize=8)
def compiled(model: dr_model.DRGrader):
    """``fn(variables, x, target=None)``: `grad_cam` of ``model`` under jit, one compilation per model
    settings and input shape (linen modules compare by their fields)."""
    return jax.jit(functools.partial(grad_cam, model))


def _jet(t: jax.Array) -> jax.Array:
    """Matplotlib-like 'jet' colours of t in [0, 1]: (...,) -> (..., 3) float32 in [0, 1]."""
    t = jnp.clip(t, 0.0, 1.0)[..., None]
    centres = jnp.asarray([0.75, 0.5, 0.25], jnp.float32)  # red, green, blue peaks
    return jnp.clip(1.5 - jnp.abs(4.0 * (t - centres)), 0.0, 1.0)


def overlay(image: jax.Array, heat: jax.Array, mask: jax.Array | None = None, alpha: float = 0.6) -> jax.Array:
    """A heatmap blended over its image for display.

    Args:
      image: (..., H, W, 3) float in [0, 1]; heat: (..., H, W) in [0, 1].
      mask: optional (..., H, W) retinal mask; outside it the image shows unblended.
      alpha: weight of the heat colours where heat is 1 (it falls linearly to 0 with the heat, so cold
        regions show the photograph untinted).
    Returns:
      (..., H, W, 3) float32 in [0, 1].
    """
    image = jnp.asarray(image, jnp.float32)
    heat = jnp.asarray(heat, jnp.float32)
    weight = alpha * jnp.clip(heat, 0.0, 1.0)[..., None]
    if mask is not None:
        weight = weight * (jnp.asarray(mask) != 0)[..., None]
    return jnp.clip((1.0 - weight) * image + weight * _jet(heat), 0.0, 1.0)
