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
  with loss-balanced task weighting.
- teacher_a, teacher_b: the CE-Net vessel teacher for pseudo structure masks (paper III-C), trained on
  DRIVE's manual masks (a), then fine-tuned on QT-degraded copies of the same images (b); Dice + BCE.

A stage's losses take ``(params, state, batch, key)`` with the models and the `stages.Stage` bound once
(`stage_loss`); the models come from `models.factory`, the optimiser from `optim`, the state from `state`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cleaq_jax.data import augment, degrade
from cleaq_jax.evaluation import inference
from cleaq_jax.evaluation import metrics as metrics_lib
from cleaq_jax.models import layers
from cleaq_jax.training import losses, optim, stages
from cleaq_jax.training import state as ts

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
Step = Callable[[ts.TrainState, Batch], tuple[ts.TrainState, Metrics]]
LossOut = tuple[jax.Array, tuple[Metrics, dict, losses.LBTWState]]  # (loss, (metrics, batch stats, LBTW state))


@dataclasses.dataclass(frozen=True)
class _Bound:
    """What every loss of a stage closes over: the linen modules and the stage's description."""

    models: dict[str, nn.Module]
    stage: stages.Stage

    @property
    def s(self) -> stages.LossSettings:
        return self.stage.loss


class _IQAInput(NamedTuple):
    """What IQA is trained on: images x (B,H,W,3), LQI's target ``degraded``, the mask, quality labels."""

    x: jax.Array
    degraded: jax.Array
    mask: jax.Array
    quality: jax.Array


# --------------------------------------------------------------------------- per-subnetwork terms
def _apply(b: _Bound, params: dict, state: ts.TrainState, name: str, x: jax.Array):
    out, updates = b.models[name].apply({"params": params[name], "batch_stats": state.batch_stats[name]}, x,
                                        train=True, mutable=["batch_stats"])
    return out, updates["batch_stats"]


def _accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Training accuracy over the known labels (>= 0); 0, not NaN, for a batch with none, so the
    logged mean over an interval stays finite."""
    return jnp.nan_to_num(metrics_lib.accuracy(labels, jnp.argmax(logits, -1), valid=labels >= 0))


def _iqe_terms(b: _Bound, params, state, batch: Batch, degraded: jax.Array, target: tuple[jax.Array, jax.Array]):
    """IQE on ``degraded``; L_IQE (eq. 4) against ``target`` = (clean images, per-example weights).
    Returns (masked enhancement, L_IQE, its terms, new batch stats). An IQE the stage holds fixed
    (`stages.Stage.frozen`) runs as in inference: BatchNorm statistics kept, no gradient to its parameters."""
    _, mask = inference.inputs(batch)
    if "iqe" in b.stage.frozen:
        fixed = {"params": jax.lax.stop_gradient(params["iqe"]), "batch_stats": state.batch_stats["iqe"]}
        out, bs = b.models["iqe"].apply(fixed, degraded, train=False), state.batch_stats["iqe"]
    else:
        out, bs = _apply(b, params, state, "iqe", degraded)
    enhanced = out["enhanced"] * mask[..., None]
    total, terms = losses.iqe_loss(
        enhanced, target[0], target[1], out.get("vessel_logits"), batch["vessel"].astype(jnp.float32),
        batch["has_vessel"].astype(jnp.float32), mask, lambda_seg=b.s.lambda_seg, qe=b.s.qe, seg=b.s.seg)
    return enhanced, total, terms, bs


def _iqa_terms(b: _Bound, params, state, seen: _IQAInput):
    out, bs = _apply(b, params, state, "iqa", seen.x)
    total, terms = losses.iqa_loss(out["quality_logits"], seen.quality, out.get("lqi"), seen.degraded, seen.mask,
                                   lambda_lqi=b.s.lambda_lqi, lqi=b.s.lqi)
    return total, {**terms, "accuracy_qa": _accuracy(out["quality_logits"], seen.quality)}, bs


def _dr_terms(b: _Bound, params, state, x: jax.Array, grade: jax.Array):
    logits, bs = _apply(b, params, state, "dr", x)
    return losses.cross_entropy(logits, grade), {"accuracy_dr": _accuracy(logits, grade)}, bs


# --------------------------------------------------------------------------- stage losses
def _qe_target(s: stages.LossSettings, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """L_QE's target images (B,H,W,3) and per-example weights (B,) float32.

    With qe_targets "paper" the target is the original and only good images count (eq. 1: QT-degraded good
    images against themselves; usable ones too with ``usable_self_reference``, op1(usable) -> usable).
    With "all" a record's stored clean ``reference`` (synthetic data, Messidor's QT thirds) is also the
    target wherever the batch carries one, so IQE is told the clean image of usable and reject images.
    """
    x, mask = inference.inputs(batch)
    quality = batch["quality"]
    counted = (quality == 0) | ((quality == 1) & s.usable_self_reference)
    if s.qe_targets == "paper":
        return x, counted.astype(jnp.float32)
    target, has_reference = inference.reference_or_original(batch, x, mask)
    return target, (counted | has_reference).astype(jnp.float32)


def _stage1_loss(b: _Bound, params, state, batch: Batch, key: jax.Array) -> LossOut:
    """Eq. (1): IQE on op2-degraded good images; DR on X. The two share no parameters.

    Images with a clean reference are enhanced as they are towards it (they are already degraded);
    with ``usable_self_reference`` IQE also learns op1(usable) -> usable, the pairs its evaluation
    scores when the data has no references.
    """
    x, mask = inference.inputs(batch)
    quality, grade = batch["quality"], batch["dr_grade"]
    total, metrics, new_bs = 0.0, {}, {}
    if "iqe" in b.stage.nets:
        keys = jax.random.split(key, x.shape[0])
        # QT's rule (good -> op2, usable -> op1, others as they are), op1 only for self-referenced usable.
        qt_quality = jnp.where(quality == 0, 0, jnp.where((quality == 1) & b.s.usable_self_reference, 1, 2))
        degraded = degrade.quality_transform_batch(x, mask, qt_quality, keys, b.stage.qt)
        target = _qe_target(b.s, batch)
        batch = {**batch, "has_vessel": batch["has_vessel"] & (target[1] > 0)}
        _, l_iqe, terms, new_bs["iqe"] = _iqe_terms(b, params, state, batch, degraded, target)
        total, metrics = total + l_iqe, {**metrics, **terms, "loss_iqe": l_iqe}
    if "dr" in b.stage.nets:
        l_dr, terms, new_bs["dr"] = _dr_terms(b, params, state, x, grade)
        total, metrics = total + l_dr, {**metrics, **terms, "loss_dr": l_dr}
    return total, (metrics, new_bs, state.lbtw)


def _stage2_loss(b: _Bound, params, state, batch: Batch, key: jax.Array) -> LossOut:
    """Eq. (2): IQA on X, with LQI-IQA reconstructing QT(X)."""
    x, mask = inference.inputs(batch)
    keys = jax.random.split(key, x.shape[0])
    degraded = degrade.quality_transform_batch(x, mask, batch["quality"], keys, b.stage.qt)
    l_iqa, terms, bs = _iqa_terms(b, params, state, _IQAInput(x, degraded, mask, batch["quality"]))
    return l_iqa, ({**terms, "loss_iqa": l_iqa}, {"iqa": bs}, state.lbtw)


def grl_scale_at(s: stages.LossSettings, progress: jax.Array) -> jax.Array:
    """The reversal scale at ``progress`` in [0, 1] of stage 3: constant, or Ganin & Lempitsky's ramp
    scale * (2 / (1 + exp(-10 p)) - 1), which starts at 0 and reaches 0.9999 * scale at p = 1."""
    scale = jnp.float32(s.grl_scale)
    if s.grl_schedule == "constant":
        return scale
    return scale * (2.0 / (1.0 + jnp.exp(-10.0 * jnp.asarray(progress, jnp.float32))) - 1.0)


def _reverse_guidance(b: _Bound, params, state, enhanced: jax.Array, seen: _IQAInput):
    """The paper's form: IQA on X^ through the gradient-reversal layer (IQE ascends L_IQA); the scale
    follows the stage's progress (config.loss.grl_schedule)."""
    progress = jnp.minimum(state.step.astype(jnp.float32) / max(1, b.stage.total_steps), 1.0)
    scale = grl_scale_at(b.s, progress)
    l_iqa, terms, bs = _iqa_terms(b, params, state, seen._replace(x=layers.grad_reverse(enhanced, scale)))
    return l_iqa, jnp.float32(0.0), {**terms, "grl_scale": scale}, bs


def _to_good_guidance(b: _Bound, params, state, enhanced: jax.Array, seen: _IQAInput):
    """IQE as generator, IQA as discriminator (paper III-D, IV-C), in a bounded form.

    IQA trains on the detached enhancement (labelled with its original's quality) and on the raw image
    ``seen.x``, so it stays a quality assessor. IQE minimises CE(IQA(X^), good) over images whose original
    is not good, through IQA with its parameters held fixed and BatchNorm in inference mode; that term
    is returned apart, outside the dynamic weighting. Returns (L_IQA, guidance, metrics, IQA batch stats).
    """
    twice = lambda a: jnp.concatenate([a, a])  # noqa: E731
    both = _IQAInput(jnp.concatenate([jax.lax.stop_gradient(enhanced), seen.x]), twice(seen.degraded),
                     twice(seen.mask), twice(seen.quality))
    l_iqa, terms, bs = _iqa_terms(b, params, state, both)
    frozen = {"params": jax.lax.stop_gradient(params["iqa"]), "batch_stats": state.batch_stats["iqa"]}
    logits = b.models["iqa"].apply(frozen, enhanced, train=False)["quality_logits"]
    to_good = jnp.where(seen.quality > 0, 0, -1)  # good (0) is the target; good or unknown originals are left out
    guidance = losses.cross_entropy(logits, to_good)
    return l_iqa, guidance, {**terms, "loss_guidance": guidance}, bs


def _task_weights(b: _Bound, vector: jax.Array, state: ts.TrainState):
    """Eq. (11)'s weights over ``b.stage.tasks``: with LBTW dynamic on L_IQE and L_IQA, L_DR at 1;
    else config.loss.fixed."""
    s, names = b.s, b.stage.tasks
    if s.weighting != "lbtw":
        fixed = dict(s.fixed)
        return losses.fixed_weights(vector, state.lbtw, values=[fixed[t] for t in names])
    weights, lbtw = losses.lbtw_weights(vector, state.lbtw, epoch=state.step // b.stage.steps_per_epoch,
                                        alpha=s.alpha, reset=s.lbtw_reset)
    if "dr" in names and len(names) > 1:
        dynamic = jnp.asarray([t != "dr" for t in names])
        share = jnp.sum(jnp.where(dynamic, weights, 0.0))
        rescaled = weights * (dynamic.sum() / jnp.where(share > 0, share, 1.0))
        weights = jnp.where(dynamic, rescaled, 1.0)
        lbtw = lbtw.replace(weights=weights)
    return weights, lbtw


def _stage3_input(stage: stages.Stage, batch: Batch, key: jax.Array) -> jax.Array:
    """X~, what IQE enhances in stage 3: QT(X) by quality (good -> op2, usable -> op1, reject as it is).

    With qe_targets "all" a usable record with a clean reference is already its degraded image and enters as
    it is, as in evaluation (`inference.enhancement_pair`); with "paper" every usable image goes through op1,
    as eq. (4) has it (the stored reference is not looked at). With ``qt_good_fraction`` < 1 only that fraction
    of good images (drawn per step) is degraded; the others enter as they are, the path DR(IQE(X)) of inference.
    """
    x, mask = inference.inputs(batch)
    quality = batch["quality"]
    as_stored = inference.has_reference(batch) & (stage.loss.qe_targets == "all")
    level = jnp.where((quality == 1) & as_stored, 2, quality)  # QT: 0 op2, 1 op1, 2 none
    if stage.loss.qt_good_fraction < 1.0:
        key, k_pick = jax.random.split(key)
        spared = jax.random.uniform(k_pick, quality.shape) >= stage.loss.qt_good_fraction
        level = jnp.where((quality == 0) & spared, 2, level)
    keys = jax.random.split(key, x.shape[0])
    return degrade.quality_transform_batch(x, mask, level, keys, stage.qt)


# The terms of stage 3's loss that reach IQE's parameters, as `gradient_shares` names them.
SHARE_TERMS = ("enhancement", "dr", "guidance")


def _stage3_terms(b: _Bound, params, state, batch: Batch, key: jax.Array):
    """Stage 3's loss, eq. (11), and its weighted terms: (total, {"enhancement": w_IQE L_IQE, "dr": w_DR L_DR,
    "guidance": w_IQA L_IQA + guidance_weight * to_good} for the tasks present, metrics, new batch stats,
    LBTW state). The terms sum to the total; apart, they tell what each pulls IQE towards (`gradient_shares`)."""
    x, mask = inference.inputs(batch)
    quality, nets = batch["quality"], b.stage.nets
    degraded = _stage3_input(b.stage, batch, key)
    new_bs, task_losses, metrics, guidance = {}, {}, {}, jnp.float32(0.0)
    if "iqe" in nets:
        enhanced, task_losses["iqe"], terms, new_bs["iqe"] = _iqe_terms(b, params, state, batch, degraded,
                                                                      _qe_target(b.s, batch))
        metrics.update(terms)
    else:  # the control tasks.joint_iqe="off": DR alone on QT(X)
        enhanced = degraded * mask[..., None]
    if "iqa" in nets:
        guide = _reverse_guidance if b.s.iqe_guidance == "reverse" else _to_good_guidance
        task_losses["iqa"], guidance, terms, new_bs["iqa"] = guide(b, params, state, enhanced,
                                                                    _IQAInput(x, degraded, mask, quality))
        metrics.update(terms)
    if "dr" in nets:
        task_losses["dr"], terms, new_bs["dr"] = _dr_terms(b, params, state, enhanced, batch["dr_grade"])
        metrics.update(terms)
    names = b.stage.tasks
    vector = jnp.stack([task_losses[t] for t in names])
    weights, lbtw = _task_weights(b, vector, state)
    weighted = dict(zip(names, jax.lax.stop_gradient(weights) * vector))
    parts = {"enhancement": weighted.get("iqe"), "dr": weighted.get("dr"),
             "guidance": weighted["iqa"] + b.s.guidance_weight * guidance if "iqa" in names else None}
    for i, t in enumerate(names):
        metrics[f"loss_{t}"], metrics[f"weight_{t}"] = vector[i], weights[i]
    total = losses.combine(vector, weights) + b.s.guidance_weight * guidance
    return total, {k: v for k, v in parts.items() if v is not None}, metrics, new_bs, lbtw


def _stage3_loss(b: _Bound, params, state, batch: Batch, key: jax.Array) -> LossOut:
    """Eq. (3), (11): X~ = QT(X) -> IQE -> X^ -> {IQA guidance (config.loss.iqe_guidance), DR}."""
    total, _, metrics, new_bs, lbtw = _stage3_terms(b, params, state, batch, key)
    return total, (metrics, new_bs, lbtw)


def _teacher_loss(b: _Bound, params, state, batch: Batch, key: jax.Array, *, degrade_input: bool) -> LossOut:
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
        x = degrade.quality_transform_batch(x, mask, quality, keys, b.stage.qt)
    out, bs = _apply(b, params, state, "cenet", x)
    weight = batch["has_vessel"].astype(jnp.float32)
    dice = losses.dice_loss(out["vessel_logits"], vessel, mask, weight)
    bce = losses.bce_loss(out["vessel_logits"], vessel, mask, weight)
    return dice + bce, ({"loss_dice": dice, "loss_bce": bce}, {"cenet": bs}, state.lbtw)


_STAGE_LOSSES = {"stage1": _stage1_loss, "stage2": _stage2_loss, "stage3": _stage3_loss,
                 "teacher_a": functools.partial(_teacher_loss, degrade_input=False),
                 "teacher_b": functools.partial(_teacher_loss, degrade_input=True)}


# --------------------------------------------------------------------------- the step
def stage_loss(stage: stages.Stage, models: dict[str, nn.Module]) -> Callable[..., LossOut]:
    """The stage's loss ``fn(params, state, batch, key) -> (loss, (metrics, new_batch_stats, lbtw_state))``,
    differentiable w.r.t. ``params`` ({subnetwork: params}); ``state`` gives the BatchNorm statistics,
    the weighting state and the step."""
    return functools.partial(_STAGE_LOSSES[stage.name], _Bound(models, stage))


def gradient_shares(stage: stages.Stage, models: dict[str, nn.Module]) -> Callable[[ts.TrainState, Batch], Metrics]:
    """Stage 3's diagnostic ``fn(state, batch) -> metrics``: for each term of `_stage3_terms` that reaches
    IQE (enhancement, DR through X^, IQA's guidance), the global L2 norm of its gradient with respect to IQE's
    parameters, ``grad_norm_<term>``, and its share of their sum, ``grad_share_<term>``.

    Computed at the state's next key, so on the same QT draw the step would use: one forward pass and one
    backward pass per term (``jax.jacrev`` over the terms), about what two to three train steps cost.
    """
    bound = _Bound(models, stage)

    def shares(state: ts.TrainState, batch: Batch) -> Metrics:
        key, _ = state.next_key()

        def terms(iqe_params):
            params = {**state.params, "iqe": iqe_params}
            parts = _stage3_terms(bound, params, state, batch, key)[1]
            return jnp.stack([parts[t] for t in SHARE_TERMS if t in parts])

        names = [t for t, task in zip(SHARE_TERMS, ("iqe", "dr", "iqa")) if task in stage.tasks]
        jacobian = jax.jacrev(terms)(state.params["iqe"])
        norms = jax.vmap(optax.tree.norm)(jacobian)
        total = jnp.sum(norms)
        share = norms / jnp.where(total > 0, total, 1.0)
        return {**{f"grad_norm_{t}": norms[i] for i, t in enumerate(names)},
                **{f"grad_share_{t}": share[i] for i, t in enumerate(names)}}

    return shares


def make_train_step(stage: stages.Stage, models: dict[str, nn.Module], tx: optim.Optimizer) -> Step:
    """The stage's pure train step ``(state, batch) -> (state, metrics)`` (jit it with runtime.parallel)."""
    loss_fn = stage_loss(stage, models)
    schedule = optim.lr_schedule(stage.optim, stage.steps_per_epoch, stage.nets[0])

    def step(state: ts.TrainState, batch: Batch):
        key, state = state.next_key()
        (loss, (metrics, new_bs, lbtw)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state, batch, key)
        new_state = ts.apply_gradients(state, grads, new_bs, tx).replace(lbtw=lbtw)
        metrics = {**metrics, "loss": loss, "learning_rate": schedule(state.step)}
        return new_state, jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), metrics)

    return step
