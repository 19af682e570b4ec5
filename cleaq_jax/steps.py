"""The pure functions of training: model construction from the config, state initialisation, the
learning-rate schedule, and the three stages' train steps.

Every step is ``step(state, batch) -> (state, metrics)``: the batch holds the loader's arrays (uint8
images and masks, int labels) already on device; the quality transform QT runs inside the step, so the
host only decodes. The RNG lives in the state. Stages (paper III-A, IV-B):

- stage1: IQE on (QT_op2(X^H) -> X^H, pseudo vessel masks), eq. (1), and, independently, DR on X.
- stage2: IQA on (X, QT(X), quality labels), eq. (2).
- stage3: joint: X~ = QT(X) -> IQE -> X^; IQA sees X^ through the gradient-reversal layer (IQA minimises
  L_IQA, IQE maximises it); DR grades X^; L = sum_i w_i L_i over the active tasks with loss-balanced
  task weighting (eq. 11).
- teacher_a, teacher_b: the CE-Net vessel teacher for pseudo structure masks (paper III-C), trained on
  DRIVE's manual masks (a), then fine-tuned on QT-degraded copies of the same images (b); Dice + BCE.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from cleaq_jax import losses
from cleaq_jax import train_state as ts
from cleaq_jax.data import augment, degrade
from cleaq_jax.models import cenet as cenet_lib
from cleaq_jax.models import dr as dr_lib
from cleaq_jax.models import iqa as iqa_lib
from cleaq_jax.models import iqe as iqe_lib
from cleaq_jax.models import layers

STAGES = ("stage1", "stage2", "stage3", "teacher_a", "teacher_b")
TASK_ORDER = ("dr", "iqe", "iqa")
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
Step = Callable[[ts.TrainState, Batch], tuple[ts.TrainState, Metrics]]


# --------------------------------------------------------------------------- config -> plain values
@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The loss knobs of config.loss, read once (hashable, closed over by the step)."""

    qe: str
    seg: str
    lqi: str
    lambda_seg: float
    lambda_lqi: float
    weighting: str
    alpha: float
    lbtw_reset: str
    fixed: tuple[tuple[str, float], ...]
    grl_scale: float
    usable_self_reference: bool

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> "LossSettings":
        lc = cfg.loss
        _choice(lc.qe, ("l2", "l1"), "loss.qe")
        _choice(lc.seg, ("dice", "bce"), "loss.seg")
        _choice(lc.lqi, ("l2", "l1"), "loss.lqi")
        _choice(lc.weighting, ("lbtw", "fixed"), "loss.weighting")
        _choice(lc.lbtw_reset, ("epoch", "once"), "loss.lbtw_reset")
        return cls(qe=lc.qe, seg=lc.seg, lqi=lc.lqi, lambda_seg=float(lc.lambda_seg),
                   lambda_lqi=float(lc.lambda_lqi), weighting=lc.weighting, alpha=float(lc.alpha),
                   lbtw_reset=lc.lbtw_reset, fixed=tuple((k, float(lc.fixed[k])) for k in TASK_ORDER),
                   grl_scale=float(lc.grl_scale), usable_self_reference=bool(lc.usable_self_reference))


def _choice(value: Any, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise ValueError(f"config.{key}={value!r} is not one of {allowed}")


def compute_dtype(cfg: ml_collections.ConfigDict) -> Any:
    _choice(cfg.model.dtype, ("float32", "bfloat16"), "model.dtype")
    return jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32


def build_models(cfg: ml_collections.ConfigDict) -> dict[str, nn.Module]:
    """The three subnetworks as linen modules, from config.model (the only place it is read)."""
    m = cfg.model
    forms = layers.LayerForms(upsample=m.upsample, upsample_init=m.upsample_init, stem_pool=m.stem_pool,
                              scan_blocks=bool(m.scan_blocks))
    common = dict(width=float(m.width), dtype=compute_dtype(cfg), remat=bool(m.remat), forms=forms)
    return {
        "iqe": iqe_lib.IQE(use_seg=bool(m.use_seg), encoder_stages=tuple(m.encoder_stages),
                           blocks_per_level=int(m.uiqe_blocks), uiqe_width=float(m.uiqe_width) or None,
                           residual=bool(m.uiqe_residual), **common),
        "iqa": iqa_lib.IQA(use_lqi=bool(m.use_lqi), num_classes=3, encoder_stages=tuple(m.encoder_stages),
                           classifier_stages=tuple(m.classifier_stages), **common),
        "dr": dr_lib.DRGrader(num_grades=int(cfg.data.num_grades), stage_sizes=tuple(m.classifier_stages),
                              **common),
        "cenet": cenet_lib.CENet(stage_sizes=tuple(m.encoder_stages), **common),
    }


def stage_nets(cfg: ml_collections.ConfigDict, stage: str) -> tuple[str, ...]:
    """The subnetworks a stage trains, in a fixed order, after the config's task switches."""
    _choice(stage, STAGES, "stage")
    t = cfg.tasks
    if stage.startswith("teacher"):
        return ("cenet",)
    if stage == "stage1":
        nets = tuple(n for n in ("iqe", "dr") if t[n])
    elif stage == "stage2":
        nets = ("iqa",) if t.iqa else ()
    else:
        if not t.iqe:
            raise ValueError("config.tasks.iqe=False: stage 3 trains IQE jointly with IQA and/or DR; "
                             "for a DR-only model run stage1 with tasks.iqe=False")
        nets = tuple(n for n in ("iqe", "iqa", "dr") if t[n])
    if not nets:
        raise ValueError(f"config.tasks switches off every subnetwork that {stage} trains")
    return nets


def stage_tasks(nets: tuple[str, ...]) -> tuple[str, ...]:
    """The weighted tasks of a stage (eq. 11): one per trained subnetwork, in TASK_ORDER (none for the
    vessel teacher, whose single loss needs no weighting)."""
    return tuple(t for t in TASK_ORDER if t in nets)


# --------------------------------------------------------------------------- optimisation
def lr_schedule(cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Paper IV-B: lr constant for `constant_epochs`, then times (1 - epoch/num_epochs)^power."""
    o = cfg.optim
    base, constant, total, power = float(o.learning_rate), int(o.constant_epochs), int(cfg.num_epochs), float(o.power)

    def schedule(count):
        epoch = (count // steps_per_epoch).astype(jnp.float32)
        decay = jnp.maximum(1.0 - epoch / total, 0.0) ** power
        return base * jnp.where(epoch < constant, 1.0, decay)

    return schedule


def make_optimizer(cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
    return optax.adam(lr_schedule(cfg, steps_per_epoch), b1=float(cfg.optim.b1), b2=float(cfg.optim.b2))


def init_state(cfg: ml_collections.ConfigDict, models: dict[str, nn.Module], nets: tuple[str, ...],
               tx: optax.GradientTransformation, key: jax.Array) -> ts.TrainState:
    """Initialise the named subnetworks at config.data.image_size (use under jax.eval_shape / jit)."""
    size = int(cfg.data.image_size)
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    init_key, state_key = jax.random.split(key)
    variables = {}
    for i, name in enumerate(nets):
        v = models[name].init(jax.random.fold_in(init_key, i), x, train=False)
        variables[name] = {"params": v["params"], "batch_stats": v.get("batch_stats", {})}
    # Single-loss stages (the vessel teacher) keep a one-task weighting state so every state has one shape.
    return ts.create(variables, tx, num_tasks=max(1, len(stage_tasks(nets))), rng=state_key)


# --------------------------------------------------------------------------- inputs
def inputs(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """uint8 image (B,H,W,3) and mask (B,H,W) -> float32 image in [0,1] zeroed outside the mask, mask."""
    mask = batch["mask"].astype(jnp.float32)
    return batch["image"].astype(jnp.float32) / 255.0 * mask[..., None], mask


def _apply(model: nn.Module, state: ts.TrainState, params: dict, name: str, x: jax.Array):
    out, updates = model.apply({"params": params[name], "batch_stats": state.batch_stats[name]}, x,
                               train=True, mutable=["batch_stats"])
    return out, updates["batch_stats"]


def _accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    valid = labels >= 0
    hits = (jnp.argmax(logits, -1) == labels) & valid
    return hits.sum() / jnp.maximum(valid.sum(), 1)


# --------------------------------------------------------------------------- per-subnetwork terms
def _iqe_terms(model, state, params, degraded, clean, mask, clean_weight, batch, s: LossSettings):
    out, bs = _apply(model, state, params, "iqe", degraded)
    enhanced = out["enhanced"] * mask[..., None]
    total, terms = losses.iqe_loss(
        enhanced, clean, clean_weight, out.get("vessel_logits"), batch["vessel"].astype(jnp.float32),
        batch["has_vessel"].astype(jnp.float32), mask, lambda_seg=s.lambda_seg, qe=s.qe, seg=s.seg)
    return enhanced, total, terms, bs


def _iqa_terms(model, state, params, x, degraded, mask, quality, s: LossSettings):
    out, bs = _apply(model, state, params, "iqa", x)
    total, terms = losses.iqa_loss(out["quality_logits"], quality, out.get("lqi"), degraded, mask,
                                   lambda_lqi=s.lambda_lqi, lqi=s.lqi)
    return total, {**terms, "accuracy_qa": _accuracy(out["quality_logits"], quality)}, bs


def _dr_terms(model, state, params, x, grade):
    logits, bs = _apply(model, state, params, "dr", x)
    return losses.cross_entropy(logits, grade), {"accuracy_dr": _accuracy(logits, grade)}, bs


# --------------------------------------------------------------------------- stage losses
def _qe_referenced(quality: jax.Array, s: LossSettings) -> jax.Array:
    """(B,) bool: images L_QE compares with their original (good; usable too with usable_self_reference)."""
    return (quality == 0) | ((quality == 1) & s.usable_self_reference)


def _stage1_loss(params, state, batch, key, models, nets, qt, s, *, grl_scale=None):
    """Eq. (1): IQE on op2-degraded good images; DR on X. The two share no parameters.

    With ``usable_self_reference`` IQE also learns op1(usable) -> usable, the pairs its evaluation
    scores (op2 for good, op1 for usable images, as QT does in stage 3).
    """
    del grl_scale  # no gradient reversal before stage 3
    x, mask = inputs(batch)
    quality, grade = batch["quality"], batch["dr_grade"]
    total, metrics, new_bs = 0.0, {}, {}
    if "iqe" in nets:
        keys = jax.random.split(key, x.shape[0])
        if s.usable_self_reference:
            degraded = degrade.quality_transform_batch(x, mask, quality, keys, qt)
        else:
            degraded = jax.vmap(lambda im, m, k: degrade.op2(im, m, k, qt))(x, mask, keys)
        referenced = _qe_referenced(quality, s)
        batch = {**batch, "has_vessel": batch["has_vessel"] & referenced}
        _, l_iqe, terms, new_bs["iqe"] = _iqe_terms(models["iqe"], state, params, degraded, x, mask,
                                                     referenced.astype(jnp.float32), batch, s)
        total, metrics = total + l_iqe, {**metrics, **terms, "loss_iqe": l_iqe}
    if "dr" in nets:
        l_dr, terms, new_bs["dr"] = _dr_terms(models["dr"], state, params, x, grade)
        total, metrics = total + l_dr, {**metrics, **terms, "loss_dr": l_dr}
    return total, (metrics, new_bs, state.lbtw)


def _stage2_loss(params, state, batch, key, models, nets, qt, s, *, grl_scale=None):
    """Eq. (2): IQA on X, with LQI-IQA reconstructing QT(X)."""
    del grl_scale
    x, mask = inputs(batch)
    keys = jax.random.split(key, x.shape[0])
    degraded = degrade.quality_transform_batch(x, mask, batch["quality"], keys, qt)
    l_iqa, terms, bs = _iqa_terms(models["iqa"], state, params, x, degraded, mask, batch["quality"], s)
    return l_iqa, ({**terms, "loss_iqa": l_iqa}, {"iqa": bs}, state.lbtw)


def _stage3_loss(params, state, batch, key, models, nets, qt, s, *, steps_per_epoch, grl_scale=None):
    """Eq. (3), (11): X~ = QT(X) -> IQE -> X^ -> {IQA through gradient reversal, DR}; weighted tasks."""
    x, mask = inputs(batch)
    quality = batch["quality"]
    keys = jax.random.split(key, x.shape[0])
    degraded = degrade.quality_transform_batch(x, mask, quality, keys, qt)
    new_bs = {}
    enhanced, l_iqe, terms, new_bs["iqe"] = _iqe_terms(
        models["iqe"], state, params, degraded, x, mask, _qe_referenced(quality, s).astype(jnp.float32),
        batch, s)
    task_losses, metrics = {"iqe": l_iqe}, dict(terms)
    if "iqa" in nets:
        scale = jnp.float32(s.grl_scale) if grl_scale is None else grl_scale
        reversed_enh = layers.grad_reverse(enhanced, scale)
        task_losses["iqa"], terms, new_bs["iqa"] = _iqa_terms(models["iqa"], state, params, reversed_enh,
                                                              degraded, mask, quality, s)
        metrics.update(terms)
    if "dr" in nets:
        task_losses["dr"], terms, new_bs["dr"] = _dr_terms(models["dr"], state, params, enhanced,
                                                           batch["dr_grade"])
        metrics.update(terms)
    names = stage_tasks(nets)
    vector = jnp.stack([task_losses[t] for t in names])
    if s.weighting == "lbtw":
        weights, lbtw = losses.lbtw_weights(vector, state.lbtw, epoch=state.step // steps_per_epoch,
                                            alpha=s.alpha, reset=s.lbtw_reset)
    else:
        fixed = dict(s.fixed)
        weights, lbtw = losses.fixed_weights(vector, state.lbtw, values=[fixed[t] for t in names])
    total = losses.combine(vector, weights)
    for i, t in enumerate(names):
        metrics[f"loss_{t}"], metrics[f"weight_{t}"] = vector[i], weights[i]
    return total, (metrics, new_bs, lbtw)


def _teacher_loss(params, state, batch, key, models, nets, qt, s, *, degrade_input: bool, grl_scale=None):
    """CE-Net on (image, manual vessel mask): Dice + BCE inside the field of view (CE-Net's training).

    Each image first gets CE-Net's colour and scale augmentation on device (`augment.augment_batch`;
    flips and rotations come from the loader). With ``degrade_input`` (teacher_b) it is then degraded by
    op1 or op2 at random, so the teacher learns to segment the low-quality images it will be run on.
    """
    x, mask = inputs(batch)
    k_aug, key = jax.random.split(key)
    x, mask, vessel = augment.augment_batch(x, mask, batch["vessel"].astype(jnp.float32), k_aug)
    if degrade_input:
        k_op, k_pick = jax.random.split(key)
        keys = jax.random.split(k_op, x.shape[0])
        quality = jax.random.randint(k_pick, x.shape[:1], 0, 2)  # 0 -> op2, 1 -> op1
        x = degrade.quality_transform_batch(x, mask, quality, keys, qt)
    out, bs = _apply(models["cenet"], state, params, "cenet", x)
    weight = batch["has_vessel"].astype(jnp.float32)
    dice = losses.dice_loss(out["vessel_logits"], vessel, mask, weight)
    bce = losses.bce_loss(out["vessel_logits"], vessel, mask, weight)
    return dice + bce, ({"loss_dice": dice, "loss_bce": bce}, {"cenet": bs}, state.lbtw)


# --------------------------------------------------------------------------- the step
def stage_loss(cfg: ml_collections.ConfigDict, models: dict[str, nn.Module], stage: str, steps_per_epoch: int):
    """The stage's loss ``fn(params, state, batch, key, grl_scale=None) -> (loss, (metrics, new_batch_stats,
    lbtw_state))``, differentiable w.r.t. ``params`` ({subnetwork: params}). ``grl_scale`` (stage 3) may be a
    traced value replacing config.loss.grl_scale, e.g. to schedule it."""
    nets = stage_nets(cfg, stage)
    qt = degrade.QTParams.from_config(cfg.qt, image_size=int(cfg.data.image_size))
    s = LossSettings.from_config(cfg)
    fn = {"stage1": _stage1_loss, "stage2": _stage2_loss,
          "stage3": functools.partial(_stage3_loss, steps_per_epoch=steps_per_epoch),
          "teacher_a": functools.partial(_teacher_loss, degrade_input=False),
          "teacher_b": functools.partial(_teacher_loss, degrade_input=True)}[stage]
    if stage in ("stage1", "stage2"):
        fn = (lambda f: lambda *a, grl_scale: f(*a))(fn)
    return lambda params, state, batch, key, grl_scale=None: fn(params, state, batch, key, models, nets, qt, s,
                                                                grl_scale=grl_scale)


def make_train_step(cfg: ml_collections.ConfigDict, models: dict[str, nn.Module], tx: optax.GradientTransformation,
                    stage: str, steps_per_epoch: int) -> Step:
    """The stage's pure train step ``(state, batch) -> (state, metrics)`` (jit it with parallel.py)."""
    loss_fn = stage_loss(cfg, models, stage, steps_per_epoch)
    schedule = lr_schedule(cfg, steps_per_epoch)

    def step(state: ts.TrainState, batch: Batch):
        key, state = state.next_key()
        (loss, (metrics, new_bs, lbtw)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state, batch, key)
        new_state = ts.apply_gradients(state, grads, new_bs, tx).replace(lbtw=lbtw)
        metrics = {**metrics, "loss": loss, "learning_rate": schedule(state.step)}
        return new_state, jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), metrics)

    return step
