"""Metrics agree with scikit-learn / scikit-image (vessel Dice, AUC and accuracy included), masked variants
ignore outside pixels, and the functions give the same values under jit."""

import jax
import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from sklearn.metrics import (
    cohen_kappa_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from cleaq_jax.evaluation import metrics

TOL = 1e-3


def _labels(rng, n, num_classes):
    """Random label pairs with one or two classes removed from truth, prediction or both."""
    y_true = rng.integers(0, num_classes, n)
    y_pred = np.clip(y_true + rng.integers(-2, 3, n), 0, num_classes - 1)
    for _ in range(rng.integers(1, 3)):
        gone = rng.integers(0, num_classes)
        target = rng.integers(0, 3)  # 0: truth, 1: prediction, 2: both
        if target in (0, 2):
            y_true[y_true == gone] = (gone + 1) % num_classes
        if target in (1, 2):
            y_pred[y_pred == gone] = (gone + 2) % num_classes
    return y_true, y_pred


def _padded(labels, length=80):
    """Labels padded with -1 (an unknown label, dropped by the metrics) so one jit compile serves all seeds."""
    return np.concatenate([labels, np.full(length - len(labels), -1)])


_kappa = jax.jit(metrics.quadratic_weighted_kappa, static_argnums=2)
_confusion = jax.jit(metrics.confusion_matrix, static_argnums=2)
_prf = jax.jit(metrics.macro_precision_recall_f1)


def _images(rng, shape):
    """Smooth random images in [0, 1] and a noisy, shifted copy (SSIM well away from 0 and 1)."""
    sigma = [0.0] * len(shape)
    sigma[-3] = sigma[-2] = 1.5  # smooth spatially, never across channels or images
    x = ndimage.gaussian_filter(rng.random(shape), sigma=sigma)
    x = (x - x.min()) / (x.max() - x.min())
    y = np.clip(0.9 * x + 0.05 + 0.08 * rng.standard_normal(shape), 0, 1)
    return x.astype(np.float32), y.astype(np.float32)


def _sk_ssim(x, y):
    return structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=1.0, channel_axis=-1)


# --------------------------------------------------------------------------- classification
def test_kappa_equals_sklearn_quadratic_kappa_on_random_labels_with_absent_classes():
    for seed in range(40):
        rng = np.random.default_rng(seed)
        num_classes = int(rng.integers(3, 6))
        y_true, y_pred = _labels(rng, int(rng.integers(5, 80)), num_classes)
        expected = cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=np.arange(num_classes))
        got = float(_kappa(_padded(y_true), _padded(y_pred), num_classes))
        assert got == pytest.approx(expected, abs=1e-5), (seed, num_classes)


def test_kappa_weighs_disagreements_by_grade_distance_even_when_middle_grade_is_absent():
    # Grade 1 never occurs: a 0<->2 confusion still costs (0-2)^2, not the (0-1)^2 of a compacted scale.
    y_true = np.array([0, 0, 2, 2, 3, 3])
    y_pred = np.array([0, 2, 2, 0, 3, 3])
    full_scale = cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=np.arange(4))
    compacted = cohen_kappa_score(y_true, y_pred, weights="quadratic")
    got = float(metrics.quadratic_weighted_kappa(y_true, y_pred, 4))
    assert got == pytest.approx(full_scale, abs=1e-6)
    assert abs(full_scale - compacted) > 1e-3


def test_kappa_is_nan_when_truth_and_prediction_are_one_single_class():
    assert np.isnan(float(metrics.quadratic_weighted_kappa(np.full(6, 2), np.full(6, 2), 5)))
    assert np.isnan(float(metrics.kappa_from_confusion(np.zeros((3, 3), np.int32))))


def test_confusion_matrix_matches_sklearn_and_drops_unknown_labels():
    rng = np.random.default_rng(0)
    y_true, y_pred = _labels(rng, 60, 5)
    y_true[:7] = -1  # unknown grades
    known = y_true >= 0
    expected = sk_confusion_matrix(y_true[known], y_pred[known], labels=np.arange(5))
    np.testing.assert_array_equal(np.asarray(metrics.confusion_matrix(y_true, y_pred, 5)), expected)


def test_confusion_matrix_counts_only_valid_entries():
    y_true = np.array([0, 1, 2, 2])
    y_pred = np.array([0, 2, 2, 1])
    valid = np.array([True, False, True, True])
    expected = sk_confusion_matrix(y_true[valid], y_pred[valid], labels=np.arange(3))
    np.testing.assert_array_equal(np.asarray(metrics.confusion_matrix(y_true, y_pred, 3, valid)), expected)


def test_accuracy_counts_only_valid_entries():
    y_true = np.array([0, 1, 2, 2, 1])
    y_pred = np.array([0, 2, 2, 1, 1])
    assert float(metrics.accuracy(y_true, y_pred)) == pytest.approx(3 / 5)
    valid = np.array([True, True, True, False, False])
    assert float(metrics.accuracy(y_true, y_pred, valid)) == pytest.approx(2 / 3)


def test_macro_precision_recall_f1_match_sklearn_over_present_classes():
    for seed in range(30):
        rng = np.random.default_rng(100 + seed)
        num_classes = int(rng.integers(3, 6))
        y_true, y_pred = _labels(rng, int(rng.integers(5, 60)), num_classes)
        present = np.union1d(y_true, y_pred)
        kw = dict(labels=present, average="macro", zero_division=0)
        cm = _confusion(_padded(y_true), _padded(y_pred), num_classes)
        precision, recall, f1 = (float(v) for v in _prf(cm))
        assert precision == pytest.approx(precision_score(y_true, y_pred, **kw), abs=1e-6), seed
        assert recall == pytest.approx(recall_score(y_true, y_pred, **kw), abs=1e-6), seed
        assert f1 == pytest.approx(f1_score(y_true, y_pred, **kw), abs=1e-6), seed


# --------------------------------------------------------------------------- images
@pytest.mark.parametrize("shape", [(32, 32, 3), (40, 27, 3), (16, 64, 1)])
def test_ssim_equals_skimage_gaussian_ssim(shape):
    x, y = _images(np.random.default_rng(sum(shape)), shape)
    assert float(metrics.ssim(x, y)) == pytest.approx(_sk_ssim(x, y), abs=TOL)


@pytest.mark.parametrize("shape", [(32, 32, 3), (40, 27, 1)])
def test_psnr_equals_skimage_psnr(shape):
    x, y = _images(np.random.default_rng(sum(shape)), shape)
    assert float(metrics.psnr(x, y)) == pytest.approx(peak_signal_noise_ratio(x, y, data_range=1.0), abs=TOL)


def test_batched_ssim_and_psnr_give_one_value_per_image():
    rng = np.random.default_rng(1)
    pairs = [_images(rng, (24, 24, 3)) for _ in range(3)]
    x = np.stack([p[0] for p in pairs])
    y = np.stack([p[1] for p in pairs])
    np.testing.assert_allclose(np.asarray(metrics.ssim(x, y)), [_sk_ssim(a, b) for a, b in pairs], atol=TOL)
    np.testing.assert_allclose(np.asarray(metrics.psnr(x, y)),
                               [peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in pairs], atol=TOL)


def _disc_mask(size, radius):
    yy, xx = np.mgrid[:size, :size]
    return ((yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 <= radius**2).astype(np.uint8)


def test_masked_ssim_is_skimage_ssim_map_averaged_over_mask_pixels_whose_window_is_inside():
    x, y = _images(np.random.default_rng(2), (48, 48, 3))
    mask = _disc_mask(48, 20)
    _, ssim_full = structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                         data_range=1.0, channel_axis=-1, full=True)
    inside = ndimage.binary_erosion(mask, np.ones((11, 11)), border_value=0)
    expected = ssim_full.mean(axis=-1)[inside].mean()
    assert float(metrics.ssim(x, y, mask)) == pytest.approx(expected, abs=TOL)


def test_masked_ssim_with_all_ones_mask_equals_unmasked_ssim():
    x, y = _images(np.random.default_rng(3), (32, 32, 3))
    assert float(metrics.ssim(x, y, np.ones((32, 32, 1)))) == pytest.approx(float(metrics.ssim(x, y)), abs=1e-6)


def test_masked_ssim_ignores_pixels_outside_the_mask():
    x, y = _images(np.random.default_rng(4), (48, 48, 3))
    mask = _disc_mask(48, 20)
    y_changed = np.where(mask[..., None] == 1, y, np.random.default_rng(5).random(y.shape)).astype(np.float32)
    assert float(metrics.ssim(x, y_changed)) != pytest.approx(float(metrics.ssim(x, y)), abs=TOL)
    assert float(metrics.ssim(x, y_changed, mask)) == pytest.approx(float(metrics.ssim(x, y, mask)), abs=1e-6)


def test_masked_psnr_is_psnr_of_mask_pixels_and_ignores_the_rest():
    x, y = _images(np.random.default_rng(6), (32, 32, 3))
    mask = _disc_mask(32, 12)
    on = mask == 1
    expected = peak_signal_noise_ratio(x[on], y[on], data_range=1.0)
    y_changed = np.where(on[..., None], y, 1.0 - y).astype(np.float32)
    assert float(metrics.psnr(x, y, mask)) == pytest.approx(expected, abs=TOL)
    assert float(metrics.psnr(x, y_changed, mask)) == pytest.approx(expected, abs=TOL)


def test_image_metrics_reject_mismatched_shapes_and_too_small_images():
    x = np.zeros((8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(x, x)
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.psnr(x, np.zeros((8, 9, 3), np.float32))
    with pytest.raises(ValueError, match="mask shape"):
        metrics.psnr(x, x, np.ones((9, 8)))


def test_metric_functions_give_the_same_values_under_jit():
    rng = np.random.default_rng(7)
    y_true, y_pred = _labels(rng, 40, 5)
    x, y = _images(rng, (2, 24, 24, 3))
    mask = np.stack([_disc_mask(24, 10), _disc_mask(24, 11)])
    cm = metrics.confusion_matrix(y_true, y_pred, 5)
    eager = (metrics.quadratic_weighted_kappa(y_true, y_pred, 5), metrics.macro_precision_recall_f1(cm),
             metrics.accuracy(y_true, y_pred), metrics.ssim(x, y, mask), metrics.psnr(x, y, mask))

    @jax.jit
    def all_metrics(y_true, y_pred, x, y, mask):
        cm = metrics.confusion_matrix(y_true, y_pred, 5)
        return (metrics.quadratic_weighted_kappa(y_true, y_pred, 5), metrics.macro_precision_recall_f1(cm),
                metrics.accuracy(y_true, y_pred), metrics.ssim(x, y, mask), metrics.psnr(x, y, mask))

    jitted = all_metrics(y_true, y_pred, x, y, mask)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


# --------------------------------------------------------------------------- vessel segmentation
def _vessel_case(seed, shape=(3, 12, 10)):
    """Random vessel masks, scores that half-know them (with ties: rounded to 0.1) and a disc FOV."""
    rng = np.random.default_rng(seed)
    truth = rng.random(shape) < 0.2
    scores = np.round(np.clip(0.35 * truth + rng.random(shape) * 0.7, 0, 1), 1).astype(np.float32)
    yy, xx = np.mgrid[:shape[1], :shape[2]]
    fov = np.broadcast_to(((yy - shape[1] / 2) ** 2 + (xx - shape[2] / 2) ** 2) < (0.45 * shape[1]) ** 2, shape)
    return scores, truth, fov


def test_roc_auc_equals_sklearn_inside_the_field_of_view_with_ties():
    scores, truth, fov = _vessel_case(0)
    auc = np.asarray(metrics.roc_auc(scores, truth, fov))
    for i in range(scores.shape[0]):
        expected = roc_auc_score(truth[i][fov[i]], scores[i][fov[i]])
        assert auc[i] == pytest.approx(expected, abs=1e-6)  # shares of at most 10^2 pairs: exact in float32


def test_roc_auc_is_nan_without_both_classes_and_ignores_pixels_outside_the_fov():
    scores, truth, fov = _vessel_case(1)
    wild = np.where(fov, scores, 100.0 * (1 - truth))  # outside: vessels score low, background high
    np.testing.assert_allclose(np.asarray(metrics.roc_auc(wild, truth, fov)),
                               np.asarray(metrics.roc_auc(scores, truth, fov)), atol=1e-6)
    no_vessel = np.asarray(metrics.roc_auc(scores, np.zeros_like(truth), fov))
    assert np.isnan(no_vessel).all()


def test_dice_counts_overlap_inside_the_field_of_view_and_is_nan_when_both_are_empty():
    pred = np.zeros((2, 4, 4), bool)
    truth = np.zeros((2, 4, 4), bool)
    pred[0, 0, :3] = True  # 3 predicted
    truth[0, 0, 1:] = True  # 3 true, 2 shared -> 2*2 / (3+3)
    fov = np.ones((2, 4, 4), bool)
    dice = np.asarray(metrics.dice_score(pred, truth, fov))
    assert dice[0] == pytest.approx(4 / 6) and np.isnan(dice[1])
    fov[0, 0, 0] = False  # drops one false positive: 2*2 / (2+3)
    assert float(metrics.dice_score(pred, truth, fov)[0]) == pytest.approx(4 / 5)


def test_segmentation_scores_threshold_the_scores_and_use_accuracy_over_fov_pixels():
    scores, truth, fov = _vessel_case(2)
    out = metrics.segmentation_scores(scores, truth, fov, threshold=0.5)
    pred = scores > 0.5
    for i in range(scores.shape[0]):
        inside = fov[i]
        assert float(out["accuracy"][i]) == pytest.approx(np.mean(pred[i][inside] == truth[i][inside]))
        tp = np.sum(pred[i] & truth[i] & inside)
        assert float(out["dice"][i]) == pytest.approx(2 * tp / (np.sum(pred[i] & inside) + np.sum(truth[i] & inside)))
    np.testing.assert_allclose(np.asarray(out["auc"]), np.asarray(metrics.roc_auc(scores, truth, fov)))
    jitted = jax.jit(metrics.segmentation_scores, static_argnames="threshold")(scores, truth, fov, threshold=0.5)
    for key in out:
        np.testing.assert_allclose(np.asarray(jitted[key]), np.asarray(out[key]), atol=1e-6)
    given = metrics.segmentation_scores(scores, truth, fov, pred=scores > 0.75)
    np.testing.assert_allclose(np.asarray(given["dice"]), np.asarray(metrics.dice_score(scores > 0.75, truth, fov)))


def test_segmentation_metrics_name_a_mask_of_the_wrong_shape():
    scores, truth, fov = _vessel_case(3)
    with pytest.raises(ValueError, match="field-of-view mask"):
        metrics.segmentation_scores(scores, truth, fov[:, :5])
