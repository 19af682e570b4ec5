"""The losses of CLEAQ-DR, eq. (5)-(11), and loss-balanced task weighting.

Every function is a pure jnp function of batch-first arrays, computes in float32 whatever the input
dtype (bfloat16 compute stays out of the reductions) and is jittable. Examples that lack a target
(no clean reference, no vessel mask, unknown label) are excluded through per-example weights, and a
loss with nothing to count is 0, never NaN, so a batch without such examples trains on.

Shapes: images are (B, H, W, C); segmentation logits and targets are (B, H, W) or (B, H, W, 1);
retinal masks are (B, H, W), (B, H, W, 1) or the image's shape; class logits are (B, K) with int
labels (B,), -1 meaning unknown.

Task weighting (paper IV-B, after Liu, Liang & Gitter, AAAI 2019): per batch
w_i = (L_i(t) / L_i(0)) ** alpha, detached, rescaled to sum to the number of tasks T; the baseline
L_i(0) lives in an `LBTWState` inside the train state, so the step stays pure and resumes exactly.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax


# --------------------------------------------------------------------------- helpers
def _safe_div(num: jnp.ndarray, den: jnp.ndarray) -> jnp.ndarray:
    """num / den where den > 0, else 0; the inner where keeps the gradient finite too."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _example_weight(weight, batch: int) -> jnp.ndarray:
    """Per-example weight as float32 (B,); ones when None."""
    if weight is None:
        return jnp.ones((batch,), jnp.float32)
    weight = jnp.asarray(weight, jnp.float32)
    if weight.shape != (batch,):
        raise ValueError(f"per-example weight has shape {weight.shape}; expected ({batch},), one per example")
    return weight


def _pixel_mask(mask, shape: tuple[int, ...], what: str) -> jnp.ndarray:
    """The mask broadcast to `shape` (a (B,H,W) mask gains the channel axis), as float32."""
    if mask is None:
        return jnp.ones(shape, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    if mask.ndim == len(shape) - 1:
        mask = mask[..., None]
    try:
        return jnp.broadcast_to(mask, shape)
    except ValueError:
        raise ValueError(
            f"{what}: mask of shape {mask.shape} does not fit prediction shape {shape}; "
            "pass a (B, H, W) or (B, H, W, 1) retinal mask of the image size"
        ) from None


def _check_same_shape(pred, target, what: str) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"{what}: prediction shape {pred.shape} differs from target shape {target.shape}")


def _masked_mean(err: jnp.ndarray, mask, weight, what: str) -> jnp.ndarray:
    """sum(w_b * m * err) / sum(w_b * m) over every element: a mean over the counted pixels x channels."""
    m = _pixel_mask(mask, err.shape, what)
    w = _example_weight(weight, err.shape[0]).reshape((-1,) + (1,) * (err.ndim - 1))
    counted = w * m
    return _safe_div(jnp.sum(counted * err), jnp.sum(counted))


def _seg_pair(logits, target) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Segmentation logits and target as float32 (B, H, W, 1)."""
    logits = jnp.asarray(logits, jnp.float32)
    target = jnp.asarray(target, jnp.float32)
    if logits.ndim == 3:
        logits = logits[..., None]
    if target.ndim == 3:
        target = target[..., None]
    _check_same_shape(logits, target, "segmentation loss")
    return logits, target


# --------------------------------------------------------------------------- pixel losses
def masked_l2(pred, target, mask=None, weight=None) -> jnp.ndarray:
    """L_QE, eq. (6), and L_LQI, eq. (9): squared error inside the retinal mask.

    Normalisation: the squared error summed over the pixels where mask=1 (x every channel) divided
    by (number of such pixels x channels), i.e. a mean over counted elements; examples are pooled,
    each scaled by its `weight`. 0 when nothing is counted (empty mask or all weights 0).

    Args:
      pred, target: (B, H, W, C) float images.
      mask: (B, H, W), (B, H, W, 1) or (B, H, W, C) {0, 1}; None counts every pixel.
      weight: optional (B,) float; 0 drops an example (e.g. no clean reference).
    Returns:
      float32 scalar.
    """
    pred = jnp.asarray(pred, jnp.float32)
    target = jnp.asarray(target, jnp.float32)
    _check_same_shape(pred, target, "masked_l2")
    return _masked_mean(jnp.square(pred - target), mask, weight, "masked_l2")


def masked_l1(pred, target, mask=None, weight=None) -> jnp.ndarray:
    """The L1 alternative to eq. (6)/(9) used by the authors' code; same inputs and normalisation
    as `masked_l2` (mean absolute error over counted pixels x channels), float32 scalar."""
    pred = jnp.asarray(pred, jnp.float32)
    target = jnp.asarray(target, jnp.float32)
    _check_same_shape(pred, target, "masked_l1")
    return _masked_mean(jnp.abs(pred - target), mask, weight, "masked_l1")


def dice_loss(logits, target, mask=None, weight=None, eps: float = 1.0) -> jnp.ndarray:
    """L_Seg, eq. (5): 1 - (2|P o X_P|_1 + eps) / (|P|_1 + |X_P|_1 + eps) with P = sigmoid(logits).

    Computed per example over the pixels where mask=1, then averaged over examples with `weight`
    (an example without a vessel mask gets weight 0). `eps` smooths the ratio so an example whose
    mask and prediction are both empty scores 0 and gradients stay finite.

    Args:
      logits: (B, H, W) or (B, H, W, 1) float vessel logits.
      target: same shape, {0, 1} (pseudo) vessel mask.
      mask: optional (B, H, W) / (B, H, W, 1) retinal mask; None counts every pixel.
      weight: optional (B,) float per-example weight.
      eps: smoothing added to numerator and denominator.
    Returns:
      float32 scalar; 0 when every weight is 0.
    """
    logits, target = _seg_pair(logits, target)
    m = _pixel_mask(mask, logits.shape, "dice_loss")
    prob = jax.nn.sigmoid(logits) * m
    target = target * m
    axes = tuple(range(1, logits.ndim))
    overlap = jnp.sum(prob * target, axis=axes)
    per_example = 1.0 - (2.0 * overlap + eps) / (jnp.sum(prob, axis=axes) + jnp.sum(target, axis=axes) + eps)
    w = _example_weight(weight, logits.shape[0])
    return _safe_div(jnp.sum(w * per_example), jnp.sum(w))


def bce_loss(logits, target, mask=None, weight=None) -> jnp.ndarray:
    """Binary cross-entropy on vessel logits, the authors' code's choice for L_Seg (eq. (5)'s switch).

    Mean over the pixels where mask=1, examples pooled with `weight`; same shapes as `dice_loss`.
    Returns a float32 scalar, 0 when nothing is counted.
    """
    logits, target = _seg_pair(logits, target)
    return _masked_mean(optax.sigmoid_binary_cross_entropy(logits, target), mask, weight, "bce_loss")


# --------------------------------------------------------------------------- classification
def cross_entropy(logits, labels, valid=None) -> jnp.ndarray:
    """L_QA, eq. (7), and L_DR, eq. (10): softmax cross-entropy averaged over the counted examples.

    Args:
      logits: (B, K) float class logits.
      labels: (B,) int in [0, K); negative (-1) means unknown and is excluded.
      valid: optional (B,) bool/float that further excludes examples (0) or weights them.
    Returns:
      float32 scalar; 0 when no example is counted.
    """
    logits = jnp.asarray(logits, jnp.float32)
    labels = jnp.asarray(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: logits {logits.shape} and labels {labels.shape}; "
                         "expected (B, K) logits and (B,) int labels")
    known = (labels >= 0).astype(jnp.float32)
    if valid is not None:
        known = known * _example_weight(valid, logits.shape[0])
    log_p = jax.nn.log_softmax(logits, axis=-1)
    # Unknown labels index class 0 harmlessly; their weight is 0.
    picked = jnp.take_along_axis(log_p, jnp.maximum(labels, 0)[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return _safe_div(-jnp.sum(known * picked), jnp.sum(known))


# --------------------------------------------------------------------------- subnetwork losses
def iqe_loss(enhanced, clean, clean_weight, vessel_logits, vessel, vessel_weight, mask, *,
             lambda_seg: float, qe: str = "l2", seg: str = "dice") -> tuple[jnp.ndarray, dict]:
    """L_IQE = L_QE + lambda_seg * L_Seg, eq. (11) first line.

    Args:
      enhanced: (B, H, W, C) U-IQE output X^.
      clean: (B, H, W, C) high-quality reference X^H.
      clean_weight: (B,) float, 0 where no clean reference exists (L_QE skips the example).
      vessel_logits: (B, H, W[, 1]) Seg-IQE logits, or None for no segmentation term.
      vessel: (B, H, W[, 1]) pseudo vessel mask X_P (ignored when vessel_logits is None).
      vessel_weight: (B,) float, 0 where no vessel mask exists.
      mask: (B, H, W[, 1]) retinal mask X_Mask.
      lambda_seg: weight of L_Seg.
      qe: "l2" (paper, eq. 6) or "l1" (authors' code).
      seg: "dice" (paper, eq. 5) or "bce" (authors' code).
    Returns:
      (total float32 scalar, {'loss_qe', 'loss_seg'}); 'loss_seg' is absent without vessel_logits.
    """
    qe_fn = {"l2": masked_l2, "l1": masked_l1}[qe]
    seg_fn = {"dice": dice_loss, "bce": bce_loss}[seg]
    terms = {"loss_qe": qe_fn(enhanced, clean, mask, clean_weight)}
    total = terms["loss_qe"]
    if vessel_logits is not None:
        terms["loss_seg"] = seg_fn(vessel_logits, vessel, mask, vessel_weight)
        total = total + lambda_seg * terms["loss_seg"]
    return total, terms


def iqa_loss(quality_logits, quality, lqi_out, degraded, mask, *,
             lambda_lqi: float, lqi: str = "l2") -> tuple[jnp.ndarray, dict]:
    """L_IQA = L_QA + lambda_lqi * L_LQI, eq. (11) second line.

    Args:
      quality_logits: (B, 3) C-IQA logits.
      quality: (B,) int quality labels (0 good, 1 usable, 2 reject, -1 unknown and excluded).
      lqi_out: (B, H, W, C) LQI-IQA reconstruction, or None for no L_LQI term.
      degraded: (B, H, W, C) low-quality image X~ the reconstruction aims at, eq. (9).
      mask: (B, H, W[, 1]) retinal mask X_Mask.
      lambda_lqi: weight of L_LQI.
      lqi: "l2" (paper's MSE, eq. 9) or "l1" (authors' code).
    Returns:
      (total float32 scalar, {'loss_qa', 'loss_lqi'}); 'loss_lqi' is absent when lqi_out is None.
    """
    lqi_fn = {"l2": masked_l2, "l1": masked_l1}[lqi]
    terms = {"loss_qa": cross_entropy(quality_logits, quality)}
    total = terms["loss_qa"]
    if lqi_out is not None:
        terms["loss_lqi"] = lqi_fn(lqi_out, degraded, mask)
        total = total + lambda_lqi * terms["loss_lqi"]
    return total, terms


# --------------------------------------------------------------------------- task weighting
class LBTWState(flax.struct.PyTreeNode):
    """Loss-balanced task weighting state, a leaf of the train state.

    initial: (T,) float32 baseline losses L_i(0).
    weights: (T,) float32 weights of the last batch (for logging).
    epoch: int32 scalar, the epoch in which `initial` was taken (-1 before the first batch).
    has_initial: bool scalar, whether `initial` holds real losses yet.
    """

    initial: jnp.ndarray
    weights: jnp.ndarray
    epoch: jnp.ndarray
    has_initial: jnp.ndarray


def lbtw_init(num_tasks: int) -> LBTWState:
    """An LBTWState for `num_tasks` tasks with no baseline yet (weights all 1)."""
    if num_tasks < 1:
        raise ValueError(f"loss-balanced task weighting needs at least one task, got num_tasks={num_tasks}")
    ones = jnp.ones((num_tasks,), jnp.float32)
    return LBTWState(initial=ones, weights=ones, epoch=jnp.asarray(-1, jnp.int32),
                     has_initial=jnp.asarray(False))


def lbtw_weights(losses, state: LBTWState, *, epoch, alpha=0.5,
                 reset: str = "epoch") -> tuple[jnp.ndarray, LBTWState]:
    """Loss-balanced task weights (paper IV-B; Liu et al. 2019): w_i = (L_i(t) / L_i(0)) ** alpha.

    The baseline L(0) is taken from `losses` at the first call and, with reset="epoch", at the first
    batch of every new epoch (whenever `epoch` differs from the baseline's); with reset="once" it is
    kept for the whole run. Weights are detached (no gradient) and rescaled to sum to T; alpha=0
    gives all ones. Jittable with a traced `epoch` and `alpha`.

    Args:
      losses: (T,) float task losses of this batch.
      state: the LBTWState carried in the train state.
      epoch: int scalar, the current epoch (may be traced).
      alpha: float exponent (0.5 in Liu et al.).
      reset: "epoch" or "once" (static).
    Returns:
      (weights (T,) float32, new LBTWState).
    """
    losses = jax.lax.stop_gradient(jnp.asarray(losses, jnp.float32))
    if losses.shape != state.initial.shape:
        raise ValueError(f"lbtw_weights: {losses.shape[0] if losses.ndim else 'scalar'} task losses given, "
                         f"but the state was made for {state.initial.shape[0]} tasks (lbtw_init(num_tasks))")
    epoch = jnp.asarray(epoch, jnp.int32)
    take = jnp.logical_not(state.has_initial)
    if reset == "epoch":
        take = take | (epoch != state.epoch)
    initial = jnp.where(take, losses, state.initial)
    # A zero baseline (a task already solved) leaves that task's ratio at 1.
    ratio = jnp.where(initial > 0, losses / jnp.where(initial > 0, initial, 1.0), 1.0)
    raw = ratio ** jnp.asarray(alpha, jnp.float32)
    weights = raw.shape[0] * _safe_div(raw, jnp.sum(raw))
    # All losses 0 with alpha > 0 leaves nothing to balance: fall back to equal weights.
    weights = jnp.where(jnp.sum(raw) > 0, weights, 1.0)
    new_state = state.replace(initial=initial, weights=weights,
                              epoch=jnp.where(take, epoch, state.epoch),
                              has_initial=jnp.asarray(True))
    return weights, new_state


def fixed_weights(losses, state: LBTWState, *, values) -> tuple[jnp.ndarray, LBTWState]:
    """Constant task weights from the config (the authors' code's choice), with the same call shape
    as `lbtw_weights` so the train step can switch policies. `values`: T floats; returns
    (weights (T,) float32, state with `weights` recorded for logging)."""
    weights = jnp.asarray(values, jnp.float32)
    if weights.shape != jnp.shape(losses):
        raise ValueError(f"fixed task weights {tuple(values)} give {weights.size} values for "
                         f"{jnp.size(losses)} task losses; list one weight per task")
    return weights, state.replace(weights=weights)


def combine(task_losses, weights) -> jnp.ndarray:
    """The weighted sum of eq. (11) third line, sum_i w_i L_i; weights are treated as constants.

    task_losses, weights: (T,) float. Returns a float32 scalar whose gradient w.r.t. task_losses
    is exactly `weights`.
    """
    task_losses = jnp.asarray(task_losses, jnp.float32)
    return jnp.sum(jax.lax.stop_gradient(jnp.asarray(weights, jnp.float32)) * task_losses)
