"""Evaluation metrics: accuracy, confusion matrix, quadratic-weighted kappa, macro precision/recall/F1
(DR grading and IQA, paper Sec. IV-B) and PSNR/SSIM (IQE).

Every function takes numpy or jax arrays and is written in `jax.numpy`, so it runs under `jax.jit`
(pass `num_classes` as a static argument). Conventions, fixed here once:

- Confusion matrices are ``cm[true, predicted]`` (scikit-learn's layout). Pairs whose label or
  prediction falls outside ``[0, num_classes)`` are dropped, so unknown labels (-1) need no mask.
- Quadratic-weighted kappa weighs a disagreement between classes i and j by (i - j)^2 over the full
  class range ``0..num_classes-1``: a grade absent from a batch keeps its place on the scale. This is
  scikit-learn's ``cohen_kappa_score(weights='quadratic', labels=range(num_classes))``. Undefined kappa
  (no pairs, or truth and prediction both one single class) is NaN, as in scikit-learn.
- Macro precision/recall/F1 average over the classes present in truth or prediction (a row or
  column of the confusion matrix is non-zero); a class with no predictions has precision 0, one with
  no true examples recall 0 (scikit-learn's ``average='macro', zero_division=0``).
- SSIM (Wang et al. 2004): Gaussian window 11 taps, sigma 1.5, K1 0.01, K2 0.03, population
  covariance, per channel then averaged. Only pixels whose whole 11x11 window lies inside the image
  are averaged (scikit-image crops the same 5-pixel border). With a mask, only pixels whose whole
  window lies inside the mask count (the mask eroded by the window), so pixels outside the mask never
  change the value, and an all-ones mask gives the unmasked value.
- PSNR: ``10 log10(data_range^2 / MSE)``, MSE over pixels and channels (over mask pixels with a mask);
  identical images give +inf.
- Vessel segmentation (the downstream test of paper Fig. 8), per image over the pixels of a field-of-view
  mask: Dice ``2|P & T| / (|P| + |T|)`` of the binarised prediction (NaN when both are empty); ROC AUC of
  the scores, the probability that a vessel pixel outscores a background one, ties counting half (the
  Mann-Whitney statistic; NaN without both classes); accuracy is `accuracy` over the same pixels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


# --------------------------------------------------------------------------- classification
def _valid_pairs(y_true, y_pred, num_classes: int | None, valid) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Flattened int labels and predictions and a bool mask of the pairs that count."""
    y_true = jnp.asarray(y_true).reshape(-1).astype(jnp.int32)
    y_pred = jnp.asarray(y_pred).reshape(-1).astype(jnp.int32)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"labels have {y_true.shape[0]} elements but predictions {y_pred.shape[0]}")
    keep = jnp.ones(y_true.shape, bool)
    if valid is not None:
        keep = jnp.asarray(valid).reshape(-1).astype(bool)
        if keep.shape != y_true.shape:
            raise ValueError(f"valid has {keep.shape[0]} elements but labels {y_true.shape[0]}")
    if num_classes is not None:
        in_range = (y_true >= 0) & (y_true < num_classes) & (y_pred >= 0) & (y_pred < num_classes)
        keep = keep & in_range
    return y_true, y_pred, keep


def accuracy(y_true, y_pred, valid=None) -> jax.Array:
    """Fraction of predictions equal to the labels.

    Args:
      y_true, y_pred: int arrays of the same size (any shape, flattened).
      valid: optional bool array of the same size; only True entries count.
    Returns:
      float32 scalar; NaN when nothing counts.
    """
    y_true, y_pred, keep = _valid_pairs(y_true, y_pred, None, valid)
    hits = jnp.sum((y_true == y_pred) & keep)
    return hits.astype(jnp.float32) / jnp.sum(keep).astype(jnp.float32)


def confusion_matrix(y_true, y_pred, num_classes: int, valid=None) -> jax.Array:
    """Counts ``cm[i, j]`` of examples with label i predicted as j.

    Args:
      y_true, y_pred: int arrays of the same size (any shape, flattened). Pairs with either value
        outside ``[0, num_classes)`` are dropped (e.g. -1 for an unknown grade).
      num_classes: number of classes (static under jit).
      valid: optional bool array of the same size; only True entries count.
    Returns:
      int32 array (num_classes, num_classes).
    """
    y_true, y_pred, keep = _valid_pairs(y_true, y_pred, num_classes, valid)
    true_1h = jax.nn.one_hot(y_true, num_classes, dtype=jnp.int32) * keep[:, None].astype(jnp.int32)
    pred_1h = jax.nn.one_hot(y_pred, num_classes, dtype=jnp.int32)
    return true_1h.T @ pred_1h


def kappa_from_confusion(cm) -> jax.Array:
    """Quadratic-weighted Cohen's kappa of a confusion matrix ``cm[true, predicted]``.

    Args:
      cm: (K, K) counts (int or float).
    Returns:
      float32 scalar in [-1, 1]; NaN when undefined (no counts, or no expected disagreement).
    """
    cm = jnp.asarray(cm, jnp.float32)
    k = cm.shape[0]
    grades = jnp.arange(k, dtype=jnp.float32)
    weights = (grades[:, None] - grades[None, :]) ** 2
    n = jnp.sum(cm)
    expected = jnp.outer(jnp.sum(cm, axis=1), jnp.sum(cm, axis=0)) / n
    observed_cost = jnp.sum(weights * cm)
    expected_cost = jnp.sum(weights * expected)
    # 0/0 and x/0 both become NaN, the value scikit-learn reports for an undefined kappa.
    undefined = (n == 0) | (expected_cost == 0)
    return jnp.where(undefined, jnp.nan, 1.0 - observed_cost / jnp.where(undefined, 1.0, expected_cost))


def quadratic_weighted_kappa(y_true, y_pred, num_classes: int, valid=None) -> jax.Array:
    """Quadratic-weighted kappa of integer grades (the paper's Kappa, Sec. IV-B).

    Args:
      y_true, y_pred: int arrays of the same size; values outside ``[0, num_classes)`` are dropped.
      num_classes: number of grades (static under jit); weights use the full range 0..num_classes-1.
      valid: optional bool array of the same size.
    Returns:
      float32 scalar; NaN when undefined.
    """
    return kappa_from_confusion(confusion_matrix(y_true, y_pred, num_classes, valid))


def macro_precision_recall_f1(cm) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Macro-averaged precision, recall and F1 of a confusion matrix ``cm[true, predicted]``.

    The mean runs over classes present in truth or prediction; a zero denominator gives 0 for that
    class (scikit-learn's ``average='macro', zero_division=0`` with its default labels).

    Args:
      cm: (K, K) counts.
    Returns:
      (precision, recall, f1), float32 scalars; NaN when the matrix is empty.
    """
    cm = jnp.asarray(cm, jnp.float32)
    tp = jnp.diag(cm)
    predicted = jnp.sum(cm, axis=0)
    actual = jnp.sum(cm, axis=1)
    present = ((predicted + actual) > 0).astype(jnp.float32)

    def ratio(num, den):
        return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)

    precision = ratio(tp, predicted)
    recall = ratio(tp, actual)
    # 2tp / (2tp + fp + fn) equals the harmonic mean where defined and is 0 where tp is 0.
    f1 = ratio(2.0 * tp, predicted + actual)
    n_present = jnp.sum(present)
    return tuple(jnp.sum(v * present) / n_present for v in (precision, recall, f1))


# --------------------------------------------------------------------------- images
def _as_batch(x, y, mask) -> tuple[jax.Array, jax.Array, jax.Array | None, bool]:
    """Images as float32 (B, H, W, C), mask as float32 0/1 (B, H, W) or None, and whether x was batched."""
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    if x.ndim not in (3, 4):
        raise ValueError(f"images must be HxWxC or BxHxWxC, got shape {x.shape}")
    batched = x.ndim == 4
    if not batched:
        x, y = x[None], y[None]
    if mask is None:
        return x, y, None, batched
    m = jnp.asarray(mask)
    batch, height, width = x.shape[:3]
    if m.ndim in (3, 4) and m.shape[-1] == 1 and m.shape[-3:-1] == (height, width):
        m = m[..., 0]  # a trailing singleton channel
    if m.shape not in ((height, width), (batch, height, width)):
        raise ValueError(f"mask shape {jnp.shape(mask)} does not fit images of shape {jnp.shape(x)}: "
                         "expected HxW or BxHxW (a trailing 1 is allowed)")
    return x, y, jnp.broadcast_to((m != 0).astype(jnp.float32), (batch, height, width)), batched


def psnr(x, y, mask=None, data_range: float = 1.0) -> jax.Array:
    """Peak signal-to-noise ratio in dB.

    Args:
      x, y: float images HxWxC or BxHxWxC with values in [0, data_range].
      mask: optional HxW (or BxHxW, trailing 1 allowed); non-zero pixels count, MSE is over them and
        all channels.
      data_range: peak value.
    Returns:
      float32 scalar, or (B,) per image for a batch; +inf for identical images.
    """
    x, y, m, batched = _as_batch(x, y, mask)
    sq = jnp.mean((x - y) ** 2, axis=-1)
    if m is None:
        mse = jnp.mean(sq, axis=(1, 2))
    else:
        mse = jnp.sum(sq * m, axis=(1, 2)) / jnp.sum(m, axis=(1, 2))
    value = 10.0 * jnp.log10(data_range**2 / mse)
    return value if batched else value[0]


def _gaussian_taps(size: int, sigma: float) -> np.ndarray:
    r = size // 2
    taps = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def _filter_valid(img: jax.Array, taps: np.ndarray) -> jax.Array:
    """Separable Gaussian filter of (B, H, W, C) per channel, 'VALID' (no border pixels produced)."""
    c = img.shape[-1]
    k = len(taps)
    dims = ("NHWC", "HWIO", "NHWC")
    # HIGHEST keeps float32 on accelerators whose default conv precision is bfloat16.
    kw = dict(padding="VALID", dimension_numbers=dims, feature_group_count=c, precision=lax.Precision.HIGHEST)
    col = jnp.broadcast_to(jnp.asarray(taps).reshape(k, 1, 1, 1), (k, 1, 1, c))
    row = jnp.broadcast_to(jnp.asarray(taps).reshape(1, k, 1, 1), (1, k, 1, c))
    out = lax.conv_general_dilated(img, col, (1, 1), **kw)
    return lax.conv_general_dilated(out, row, (1, 1), **kw)


def ssim_map(x, y, data_range: float = 1.0) -> jax.Array:
    """Local SSIM at every pixel whose 11x11 window lies inside the image.

    Args:
      x, y: float (B, H, W, C) in [0, data_range], H and W >= 11.
    Returns:
      float32 (B, H - 10, W - 10, C); entry (i, j) belongs to image pixel (i + 5, j + 5).
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    if min(x.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {x.shape[1:3]}")
    taps = _gaussian_taps(SSIM_WINDOW, SSIM_SIGMA)
    mu_x, mu_y = _filter_valid(x, taps), _filter_valid(y, taps)
    var_x = _filter_valid(x * x, taps) - mu_x**2
    var_y = _filter_valid(y * y, taps) - mu_y**2
    cov = _filter_valid(x * y, taps) - mu_x * mu_y
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    return num / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


def ssim(x, y, mask=None, data_range: float = 1.0) -> jax.Array:
    """Mean structural similarity (Wang et al. 2004), matching scikit-image's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.

    Args:
      x, y: float images HxWxC or BxHxWxC in [0, data_range], H and W >= 11.
      mask: optional HxW (or BxHxW, trailing 1 allowed); the SSIM map is averaged over pixels whose
        whole 11x11 window is inside the mask, so pixels outside it never matter.
      data_range: peak value.
    Returns:
      float32 scalar, or (B,) per image for a batch; NaN where the mask has no such pixel.
    """
    x, y, m, batched = _as_batch(x, y, mask)
    per_pixel = jnp.mean(ssim_map(x, y, data_range), axis=-1)
    if m is None:
        value = jnp.mean(per_pixel, axis=(1, 2))
    else:
        win = (1, SSIM_WINDOW, SSIM_WINDOW)
        inside = lax.reduce_window(m, jnp.inf, lax.min, win, (1, 1, 1), "VALID")  # mask eroded by the window
        value = jnp.sum(per_pixel * inside, axis=(1, 2)) / jnp.sum(inside, axis=(1, 2))
    return value if batched else value[0]


# --------------------------------------------------------------------------- vessel segmentation
def _pixels(x, batch_shape: tuple[int, ...], what: str) -> jax.Array:
    """(B, H, W) or (B, H, W, 1) -> (B, H*W); the shape must be ``batch_shape`` = (B, H, W)."""
    x = jnp.asarray(x)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.shape != batch_shape:
        raise ValueError(f"{what} has shape {jnp.shape(x)}; expected {batch_shape} (a trailing 1 is allowed)")
    return x.reshape(batch_shape[0], -1)


def _segmentation_inputs(scores, truth, fov):
    truth = jnp.asarray(truth)
    if truth.ndim == 4 and truth.shape[-1] == 1:
        truth = truth[..., 0]
    if truth.ndim != 3:
        raise ValueError(f"vessel masks must be BxHxW (a trailing 1 is allowed), got shape {truth.shape}")
    shape = truth.shape
    fov = jnp.ones(shape, bool) if fov is None else _pixels(fov, shape, "field-of-view mask") != 0
    return (_pixels(scores, shape, "scores").astype(jnp.float32), truth.reshape(shape[0], -1) != 0,
            fov.reshape(shape[0], -1))


def dice_score(pred, truth, fov=None) -> jax.Array:
    """Dice coefficient of binary vessel masks per image.

    Args:
      pred, truth: (B, H, W) (trailing 1 allowed); non-zero is vessel.
      fov: optional (B, H, W) field-of-view mask; only its non-zero pixels count.
    Returns:
      float32 (B,); NaN where prediction and truth are both empty.
    """
    pred, truth, fov = _segmentation_inputs(pred, truth, fov)
    return _dice_one_per_row(pred != 0, truth, fov)


def _dice_one_per_row(pred: jax.Array, truth: jax.Array, fov: jax.Array) -> jax.Array:
    """Dice of bool (B, N) masks over the pixels where fov is True: (B,) float32, NaN when both empty."""
    both = jnp.sum(pred & truth & fov, axis=1).astype(jnp.float32)
    total = (jnp.sum(pred & fov, axis=1) + jnp.sum(truth & fov, axis=1)).astype(jnp.float32)
    return jnp.where(total > 0, 2.0 * both / jnp.where(total > 0, total, 1.0), jnp.nan)


def _auc_one(scores: jax.Array, positive: jax.Array, negative: jax.Array) -> jax.Array:
    # Background scores sorted, the others pushed past every finite score so no vessel pixel beats them.
    background = jnp.sort(jnp.where(negative, scores, jnp.inf))
    below = jnp.searchsorted(background, scores, side="left")
    tied = jnp.searchsorted(background, scores, side="right") - below
    n_neg = jnp.sum(negative).astype(jnp.float32)
    n_pos = jnp.sum(positive).astype(jnp.float32)
    # Sum each vessel pixel's share of beaten background pixels (in [0, 1]), not pair counts: at 512x512
    # the counts reach 1e10 and float32 would round them coarsely.
    share = (below.astype(jnp.float32) + 0.5 * tied.astype(jnp.float32)) / jnp.maximum(n_neg, 1.0)
    auc = jnp.sum(jnp.where(positive, share, 0.0)) / jnp.maximum(n_pos, 1.0)
    return jnp.where((n_pos > 0) & (n_neg > 0), auc, jnp.nan)


def roc_auc(scores, truth, fov=None) -> jax.Array:
    """Area under the ROC curve of per-pixel vessel scores, per image.

    Args:
      scores: (B, H, W) float, larger = more likely vessel (probabilities, logits or a vesselness
        response; any monotone transform gives the same AUC). Finite values.
      truth: (B, H, W) vessel mask, non-zero is vessel; fov: optional (B, H, W) field-of-view mask.
    Returns:
      float32 (B,): P(score of a vessel pixel > score of a background pixel) + 0.5 P(tie); NaN where the
      field of view lacks vessel or background pixels.
    """
    scores, truth, fov = _segmentation_inputs(scores, truth, fov)
    return jax.vmap(_auc_one)(scores, truth & fov, ~truth & fov)


def fov_accuracy(pred, truth, fov=None) -> jax.Array:
    """Pixel accuracy of binary vessel masks inside the field of view, per image (`accuracy` per row).

    Args: pred, truth (B, H, W), non-zero is vessel; fov optional (B, H, W). Returns float32 (B,).
    """
    pred, truth, fov = _segmentation_inputs(pred, truth, fov)
    return jax.vmap(accuracy)(truth, pred != 0, fov)


def segmentation_scores(scores, truth, fov=None, threshold: float = 0.5, pred=None) -> dict[str, jax.Array]:
    """Dice, AUC and accuracy inside the field of view of a vessel segmentation, per image.

    Args:
      scores: (B, H, W) float vessel scores (AUC ranks them).
      truth: (B, H, W) true vessel mask; fov: optional (B, H, W) field-of-view (retinal) mask.
      threshold: ``scores > threshold`` is the binary prediction for Dice and accuracy (0.5 for
        probabilities), unless ``pred`` (B, H, W), a binary mask made otherwise, is given.
    Returns:
      {'dice', 'auc', 'accuracy'}: float32 (B,) each (NaN where undefined, see the module docstring).
    """
    pred = jnp.asarray(scores) > threshold if pred is None else pred
    return {"dice": dice_score(pred, truth, fov), "auc": roc_auc(scores, truth, fov),
            "accuracy": fov_accuracy(pred, truth, fov)}

