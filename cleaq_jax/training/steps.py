"""The three stages' losses and the train step built from them (the vessel teacher's too).

Every step is ``step(state, batch) -> (state, metrics)``: the batch holds the loader's arrays (uint8
images and masks, int labels) already on device; the quality transform QT runs inside the step, so the
host only decodes. The RNG lives in the state. Stages (paper III-A, IV-B):

- stage1: IQE on (QT_op2(X^H) -> X^H, pseudo vessel masks), eq. (1), and, independently, DR on X.
- stage2: IQA on (X, QT(X), quality labels), eq. (2).
- stage3: joint: X~ = QT(X) -> IQE -> X^; DR grades X^; IQA guides IQE (config.loss.iqe_guidance):
  "reverse", the paper's literal form, IQA sees X^ through the gradient-reversal layer (IQA minimises
  L_IQA, IQE maximises it); "to_good", IQE minimises CE(IQA(X^), good) over non-good images through a
  frozen IQA while IQA trains on the detached X^ and on X. Eq. (11): L = L_DR + w_IQE L_IQE + w_IQA L_IQA
  with loss-balanced task weighting (config.loss.weighted_tasks="all" weighs L_DR too).
- teacher_a, teacher_b: the CE-Net vessel teacher for pseudo structure masks (paper III-C), trained on
  DRIVE's manual masks (a), then fine-tuned on QT-degraded copies of the same images (b); Dice + BCE.

The models come from `factory`, the optimiser from `optim`, the state from `train_state`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cleaq_jax.data import augment, degrade
from cleaq_jax.evaluation import inference
from cleaq_jax.evaluation import metrics as metrics_lib
from cleaq_jax.models import factory, layers
from cleaq_jax.training import losses, optim, stages
from cleaq_jax.training import state as ts

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
Step = Callable[[ts.TrainState, Batch], tuple[ts.TrainState, Metrics]]

GUIDANCES = ("reverse", "to_good")  # how IQA's judgement reaches IQE in stage 3 (config.loss.iqe_guidance)
GRL_SCHEDULES = ("constant", "ganin")  # the reversal scale over stage 3 (config.loss.grl_schedule)
WEIGHTED_TASKS = ("eq11", "all")  # which task losses the dynamic weights scale (config.loss.weighted_tasks)


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
    grl_schedule: str
    usable_self_reference: bool
    iqe_guidance: str
    guidance_weight: float
    weighted_tasks: str
    qt_good_fraction: float = 1.0

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> "LossSettings":
        lc = cfg.loss
        return cls(qe=lc.qe, seg=lc.seg, lqi=lc.lqi, lambda_seg=float(lc.lambda_seg),
                   lambda_lqi=float(lc.lambda_lqi), weighting=lc.weighting, alpha=float(lc.alpha),
                   lbtw_reset=lc.lbtw_reset, fixed=tuple((k, float(lc.fixed[k])) for k in stages.TASK_ORDER),
                   grl_scale=float(lc.grl_scale), grl_schedule=lc.grl_schedule,
                   usable_self_reference=bool(lc.usable_self_reference), iqe_guidance=lc.iqe_guidance,
                   guidance_weight=float(lc.guidance_weight), weighted_tasks=lc.weighted_tasks,
                   qt_good_fraction=float(lc.get("qt_good_fraction", 1.0)))


# --------------------------------------------------------------------------- per-subnetwork terms
def _apply(model: nn.Module, state: ts.TrainState, params: dict, name: str, x: jax.Array):
    out, updates = model.apply({"params": params[name], "batch_stats": state.batch_stats[name]}, x,
                               train=True, mutable=["batch_stats"])
    return out, updates["batch_stats"]


def _accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Training accuracy over the known labels (>= 0); 0, not NaN, for a batch with none, so the
    logged mean over an interval stays finite."""
    return jnp.nan_to_num(metrics_lib.accuracy(labels, jnp.argmax(logits, -1), valid=labels >= 0))


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
def _qe_target(x: jax.Array, mask: jax.Array, batch: Batch, s: LossSettings) -> tuple[jax.Array, jax.Array]:
    """L_QE's target images (B,H,W,3) and per-example weights (B,) float32.

    A record's clean ``reference`` (synthetic data, Messidor's QT thirds) is the target wherever the
    batch carries one; otherwise the original itself, counted for good images (and usable ones with
    ``usable_self_reference``, the fallback for data without references such as EyeQ).
    """
    quality = batch["quality"]
    counted = (quality == 0) | ((quality == 1) & s.usable_self_reference)
    target, clean = inference.reference_or_original(batch, x, mask)
    return target, (counted | clean).astype(jnp.float32)


def _stage1_loss(params, state, batch, key, models, nets, qt, s, *, progress=None):
    """Eq. (1): IQE on op2-degraded good images; DR on X. The two share no parameters.

    Images with a clean reference are enhanced as they are towards it (they are already degraded);
    with ``usable_self_reference`` IQE also learns op1(usable) -> usable, the pairs its evaluation
    scores when the data has no references.
    """
    del progress  # no schedule before stage 3
    x, mask = inference.inputs(batch)
    quality, grade = batch["quality"], batch["dr_grade"]
    total, metrics, new_bs = 0.0, {}, {}
    if "iqe" in nets:
        keys = jax.random.split(key, x.shape[0])
        # QT's rule (good -> op2, usable -> op1, others as they are), op1 only for self-referenced usable.
        qt_quality = jnp.where(quality == 0, 0, jnp.where((quality == 1) & s.usable_self_reference, 1, 2))
        degraded = degrade.quality_transform_batch(x, mask, qt_quality, keys, qt)
        target, weight = _qe_target(x, mask, batch, s)
        batch = {**batch, "has_vessel": batch["has_vessel"] & (weight > 0)}
        _, l_iqe, terms, new_bs["iqe"] = _iqe_terms(models["iqe"], state, params, degraded, target, mask,
                                                     weight, batch, s)
        total, metrics = total + l_iqe, {**metrics, **terms, "loss_iqe": l_iqe}
    if "dr" in nets:
        l_dr, terms, new_bs["dr"] = _dr_terms(models["dr"], state, params, x, grade)
        total, metrics = total + l_dr, {**metrics, **terms, "loss_dr": l_dr}
    return total, (metrics, new_bs, state.lbtw)


def _stage2_loss(params, state, batch, key, models, nets, qt, s, *, progress=None):
    """Eq. (2): IQA on X, with LQI-IQA reconstructing QT(X)."""
    del progress
    x, mask = inference.inputs(batch)
    keys = jax.random.split(key, x.shape[0])
    degraded = degrade.quality_transform_batch(x, mask, batch["quality"], keys, qt)
    l_iqa, terms, bs = _iqa_terms(models["iqa"], state, params, x, degraded, mask, batch["quality"], s)
    return l_iqa, ({**terms, "loss_iqa": l_iqa}, {"iqa": bs}, state.lbtw)


def grl_scale_at(s: LossSettings, progress: jax.Array) -> jax.Array:
    """The reversal scale at ``progress`` in [0, 1] of stage 3: constant, or Ganin & Lempitsky's ramp
    scale * (2 / (1 + exp(-10 p)) - 1), which starts at 0 and reaches 0.9999 * scale at p = 1."""
    scale = jnp.float32(s.grl_scale)
    if s.grl_schedule == "constant":
        return scale
    return scale * (2.0 / (1.0 + jnp.exp(-10.0 * jnp.asarray(progress, jnp.float32))) - 1.0)


def _reverse_guidance(models, state, params, enhanced, degraded, mask, quality, s, progress):
    """The paper's form: IQA on X^ through the gradient-reversal layer (IQE ascends L_IQA)."""
    scale = grl_scale_at(s, progress)
    reversed_enh = layers.grad_reverse(enhanced, scale)
    l_iqa, terms, bs = _iqa_terms(models["iqa"], state, params, reversed_enh, degraded, mask, quality, s)
    return l_iqa, jnp.float32(0.0), {**terms, "grl_scale": scale}, bs


def _to_good_guidance(models, state, params, enhanced, x, degraded, mask, quality, s):
    """IQE as generator, IQA as discriminator (paper III-D, IV-C), in a bounded form.

    IQA trains on the detached enhancement (labelled with its original's quality) and on the raw image,
    so it stays a quality assessor. IQE minimises CE(IQA(X^), good) over images whose original is not
    good, through IQA with its parameters held fixed and BatchNorm in inference mode; that term is
    returned apart, outside the dynamic weighting. Returns (L_IQA, guidance, metrics, IQA batch stats).
    """
    both = jnp.concatenate([jax.lax.stop_gradient(enhanced), x])
    l_iqa, terms, bs = _iqa_terms(models["iqa"], state, params, both, jnp.concatenate([degraded, degraded]),
                                  jnp.concatenate([mask, mask]), jnp.concatenate([quality, quality]), s)
    frozen = {"params": jax.lax.stop_gradient(params["iqa"]), "batch_stats": state.batch_stats["iqa"]}
    logits = models["iqa"].apply(frozen, enhanced, train=False)["quality_logits"]
    to_good = jnp.where(quality > 0, 0, -1)  # good (0) is the target; good or unknown originals are left out
    guidance = losses.cross_entropy(logits, to_good)
    return l_iqa, guidance, {**terms, "loss_guidance": guidance}, bs


def _task_weights(vector, names, state, steps_per_epoch, s):
    """Eq. (11)'s weights: dynamic on L_IQE and L_IQA with L_DR at 1 ("eq11"), or dynamic on every task
    ("all"). The weighting state tracks every task either way, so checkpoints keep one shape."""
    if s.weighting == "lbtw":
        weights, lbtw = losses.lbtw_weights(vector, state.lbtw, epoch=state.step // steps_per_epoch,
                                            alpha=s.alpha, reset=s.lbtw_reset)
    else:
        fixed = dict(s.fixed)
        weights, lbtw = losses.fixed_weights(vector, state.lbtw, values=[fixed[t] for t in names])
    if s.weighted_tasks == "eq11" and s.weighting == "lbtw" and "dr" in names and len(names) > 1:
        dynamic = jnp.asarray([t != "dr" for t in names])
        share = jnp.sum(jnp.where(dynamic, weights, 0.0))
        rescaled = weights * (dynamic.sum() / jnp.where(share > 0, share, 1.0))
        weights = jnp.where(dynamic, rescaled, 1.0)
        lbtw = lbtw.replace(weights=weights)
    return weights, lbtw


def _stage3_input(x, mask, batch, key, qt, s: LossSettings) -> jax.Array:
    """X~, what IQE enhances in stage 3: QT(X) by quality (good -> op2, usable -> op1, reject as it is).

    A usable record with a clean reference is already its degraded image and enters as it is, as in
    evaluation (`inference.enhancement_pair`). With ``qt_good_fraction`` < 1 only that fraction of good
    images (drawn per step) is degraded; the others enter as they are, the path DR(IQE(X)) of inference.
    """
    quality = batch["quality"]
    clean = inference.clean_reference(batch)
    level = jnp.where((quality == 1) & clean, 2, quality)  # QT's levels: 0 op2, 1 op1, 2 unchanged
    if s.qt_good_fraction < 1.0:
        key, k_pick = jax.random.split(key)
        spared = jax.random.uniform(k_pick, quality.shape) >= s.qt_good_fraction
        level = jnp.where((quality == 0) & spared, 2, level)
    keys = jax.random.split(key, x.shape[0])
    return degrade.quality_transform_batch(x, mask, level, keys, qt)


def _stage3_loss(params, state, batch, key, models, nets, qt, s, *, steps_per_epoch, progress=None):
    """Eq. (3), (11): X~ = QT(X) -> IQE -> X^ -> {IQA guidance (config.loss.iqe_guidance), DR};
    ``progress`` in [0, 1] of the stage drives the reversal-scale schedule."""
    x, mask = inference.inputs(batch)
    quality = batch["quality"]
    target, weight = _qe_target(x, mask, batch, s)
    degraded = _stage3_input(x, mask, batch, key, qt, s)
    progress = jnp.float32(1.0) if progress is None else progress
    new_bs = {}
    enhanced, l_iqe, terms, new_bs["iqe"] = _iqe_terms(models["iqe"], state, params, degraded, target, mask,
                                                        weight, batch, s)
    task_losses, metrics, guidance = {"iqe": l_iqe}, dict(terms), jnp.float32(0.0)
    if "iqa" in nets:
        if s.iqe_guidance == "reverse":
            task_losses["iqa"], guidance, terms, new_bs["iqa"] = _reverse_guidance(
                models, state, params, enhanced, degraded, mask, quality, s, progress)
        else:
            task_losses["iqa"], guidance, terms, new_bs["iqa"] = _to_good_guidance(
                models, state, params, enhanced, x, degraded, mask, quality, s)
        metrics.update(terms)
    if "dr" in nets:
        task_losses["dr"], terms, new_bs["dr"] = _dr_terms(models["dr"], state, params, enhanced,
                                                           batch["dr_grade"])
        metrics.update(terms)
    names = stages.stage_tasks(nets)
    vector = jnp.stack([task_losses[t] for t in names])
    weights, lbtw = _task_weights(vector, names, state, steps_per_epoch, s)
    total = losses.combine(vector, weights) + s.guidance_weight * guidance
    for i, t in enumerate(names):
        metrics[f"loss_{t}"], metrics[f"weight_{t}"] = vector[i], weights[i]
    return total, (metrics, new_bs, lbtw)


def _teacher_loss(params, state, batch, key, models, nets, qt, s, *, degrade_input: bool, progress=None):
    """CE-Net on (image, manual vessel mask): Dice + BCE inside the field of view (CE-Net's training).

    Each image first gets CE-Net's colour and scale augmentation on device (`augment.augment_batch`;
    flips and rotations come from the loader). With ``degrade_input`` (teacher_b) it is then degraded by
    op1 or op2 at random, so the teacher learns to segment the low-quality images it will be run on.
    """
    x, mask = inference.inputs(batch)
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
    """The stage's loss ``fn(params, state, batch, key, progress=None) -> (loss, (metrics, new_batch_stats,
    lbtw_state))``, differentiable w.r.t. ``params`` ({subnetwork: params}). ``progress`` (stage 3), the
    fraction of the stage done, may be traced; it drives config.loss.grl_schedule (None: the end, 1)."""
    nets = stages.stage_nets(cfg, stage)
    qt = stages.qt_params(cfg)
    s = LossSettings.from_config(cfg)
    fn = {"stage1": _stage1_loss, "stage2": _stage2_loss,
          "stage3": functools.partial(_stage3_loss, steps_per_epoch=steps_per_epoch),
          "teacher_a": functools.partial(_teacher_loss, degrade_input=False),
          "teacher_b": functools.partial(_teacher_loss, degrade_input=True)}[stage]
    return lambda params, state, batch, key, progress=None: fn(params, state, batch, key, models, nets, qt, s,
                                                               progress=progress)


def make_train_step(cfg: ml_collections.ConfigDict, models: dict[str, nn.Module], tx: optim.Optimizer,
                    stage: str, steps_per_epoch: int) -> Step:
    """The stage's pure train step ``(state, batch) -> (state, metrics)`` (jit it with parallel.py)."""
    loss_fn = stage_loss(cfg, models, stage, steps_per_epoch)
    schedule = optim.lr_schedule(cfg, steps_per_epoch)
    total_steps = max(1, int(cfg.num_epochs) * steps_per_epoch)

    def step(state: ts.TrainState, batch: Batch):
        key, state = state.next_key()
        progress = jnp.minimum(state.step.astype(jnp.float32) / total_steps, 1.0)
        (loss, (metrics, new_bs, lbtw)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state, batch, key, progress)
        new_state = ts.apply_gradients(state, grads, new_bs, tx).replace(lbtw=lbtw)
        metrics = {**metrics, "loss": loss, "learning_rate": schedule(state.step)}
        return new_state, jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), metrics)

    return step
