"""Losses of eq. (5)-(11) and loss-balanced task weighting, checked against hand arithmetic under jit."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cleaq_jax.training import losses as L


def _logit(p):
    return math.log(p / (1.0 - p))


# --------------------------------------------------------------------------- masked_l2 / masked_l1
def _pair():
    """One 1x2x2 image with 2 channels; pred - target = [[1, 2], [3, 4]] in channel 0, 0 in channel 1."""
    target = np.zeros((1, 2, 2, 2), np.float32)
    pred = target.copy()
    pred[0, :, :, 0] = [[1.0, 2.0], [3.0, 4.0]]
    return pred, target


def test_masked_l2_is_mean_squared_error_over_masked_pixels_times_channels():
    pred, target = _pair()
    mask = np.array([[[1, 1], [0, 1]]], np.float32)
    # Counted pixels (0,0), (0,1), (1,1): squared errors 1, 4, 16 in channel 0 and 0 in channel 1.
    # 21 / (3 pixels * 2 channels) = 3.5
    got = jax.jit(L.masked_l2)(pred, target, mask)
    assert float(got) == pytest.approx(3.5)


def test_masked_l1_is_mean_absolute_error_over_masked_pixels_times_channels():
    pred, target = _pair()
    mask = np.array([[[1, 1], [0, 1]]], np.float32)
    # |1| + |2| + |4| = 7 over 3 pixels * 2 channels = 7/6
    got = jax.jit(L.masked_l1)(pred, target, mask)
    assert float(got) == pytest.approx(7.0 / 6.0)


def test_masked_l2_ignores_pixels_outside_the_mask():
    pred, target = _pair()
    mask = np.array([[[1, 1], [0, 1]]], np.float32)
    changed = pred.copy()
    changed[0, 1, 0, :] = 100.0  # the masked-out pixel
    f = jax.jit(L.masked_l2)
    assert float(f(changed, target, mask)) == pytest.approx(float(f(pred, target, mask)))


def test_masked_l2_example_with_zero_weight_contributes_nothing():
    # Example 0 has error 1 everywhere, example 1 error 10 everywhere (1x1 image, 1 channel).
    pred = np.array([1.0, 10.0], np.float32).reshape(2, 1, 1, 1)
    target = np.zeros_like(pred)
    mask = np.ones((2, 1, 1), np.float32)
    f = jax.jit(L.masked_l2)
    # Both counted: (1 + 100) / 2 = 50.5; example 1 weighted 0: 1 / 1 = 1.
    assert float(f(pred, target, mask, None)) == pytest.approx(50.5)
    assert float(f(pred, target, mask, np.array([1.0, 0.0], np.float32))) == pytest.approx(1.0)


def test_masked_l2_empty_mask_gives_zero_loss_and_zero_gradient():
    pred, target = _pair()
    mask = np.zeros((1, 2, 2), np.float32)
    value, grad = jax.jit(jax.value_and_grad(L.masked_l2))(pred, target, mask)
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def test_masked_l2_all_weights_zero_gives_zero_not_nan():
    pred, target = _pair()
    got = jax.jit(L.masked_l2)(pred, target, None, np.zeros((1,), np.float32))
    assert float(got) == 0.0


def test_masked_l2_rejects_a_mask_of_another_size():
    pred, target = _pair()
    with pytest.raises(ValueError, match="mask of shape"):
        L.masked_l2(pred, target, np.ones((1, 3, 3), np.float32))


def test_masked_l2_computes_in_float32_for_bfloat16_inputs():
    pred, target = _pair()
    got = L.masked_l2(jnp.asarray(pred, jnp.bfloat16), jnp.asarray(target, jnp.bfloat16), None)
    # No mask: 1 + 4 + 9 + 16 = 30 over 4 pixels * 2 channels = 3.75
    assert got.dtype == jnp.float32
    assert float(got) == pytest.approx(3.75)


# --------------------------------------------------------------------------- dice / bce
def test_dice_loss_matches_eq5_per_example_then_mean():
    # Example 0: probabilities [0.8, 0.2, 0.5, 0.5], target [1, 0, 1, 0]
    #   overlap 0.8 + 0.5 = 1.3; |P| = 2.0; |X_P| = 2 -> 1 - 2.6 / 4 = 0.35
    # Example 1: probabilities [0.5, 0.5, 0.5, 0.5], target [1, 1, 1, 1]
    #   overlap 2.0; |P| = 2.0; |X_P| = 4 -> 1 - 4 / 6 = 1/3
    # mean = (0.35 + 1/3) / 2
    probs = np.array([[0.8, 0.2, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]])
    logits = np.vectorize(_logit)(probs).astype(np.float32).reshape(2, 2, 2)
    target = np.array([[1, 0, 1, 0], [1, 1, 1, 1]], np.float32).reshape(2, 2, 2)
    got = jax.jit(lambda a, b: L.dice_loss(a, b, eps=0.0))(logits, target)
    assert float(got) == pytest.approx((0.35 + 1.0 / 3.0) / 2.0, rel=1e-5)


def test_dice_loss_example_without_vessel_mask_is_excluded_by_weight():
    probs = np.array([[0.8, 0.2, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]])
    logits = np.vectorize(_logit)(probs).astype(np.float32).reshape(2, 2, 2, 1)
    target = np.array([[1, 0, 1, 0], [1, 1, 1, 1]], np.float32).reshape(2, 2, 2, 1)
    weight = np.array([1.0, 0.0], np.float32)
    got = jax.jit(lambda a, b, w: L.dice_loss(a, b, weight=w, eps=0.0))(logits, target, weight)
    assert float(got) == pytest.approx(0.35, rel=1e-5)


def test_dice_loss_retinal_mask_excludes_pixels():
    # Example 0 of the test above with its last two pixels masked out:
    # overlap 0.8; |P| = 1.0; |X_P| = 1 -> 1 - 1.6 / 2 = 0.2
    logits = np.vectorize(_logit)(np.array([0.8, 0.2, 0.5, 0.5])).astype(np.float32).reshape(1, 2, 2)
    target = np.array([1, 0, 1, 0], np.float32).reshape(1, 2, 2)
    mask = np.array([1, 1, 0, 0], np.float32).reshape(1, 2, 2)
    got = jax.jit(lambda a, b, m: L.dice_loss(a, b, m, eps=0.0))(logits, target, mask)
    assert float(got) == pytest.approx(0.2, rel=1e-5)


def test_dice_loss_smoothing_enters_numerator_and_denominator():
    # probabilities all 0.5, target [1, 0, 0, 0], eps 1: 1 - (2 * 0.5 + 1) / (2 + 1 + 1) = 0.5
    logits = np.zeros((1, 2, 2), np.float32)
    target = np.array([1, 0, 0, 0], np.float32).reshape(1, 2, 2)
    got = jax.jit(lambda a, b: L.dice_loss(a, b, eps=1.0))(logits, target)
    assert float(got) == pytest.approx(0.5, rel=1e-6)


def test_dice_loss_empty_target_and_empty_mask_give_zero_not_nan():
    logits = np.full((1, 2, 2), -1e4, np.float32)  # sigmoid == 0 in float32
    target = np.zeros((1, 2, 2), np.float32)
    value, grad = jax.jit(jax.value_and_grad(L.dice_loss))(logits, target, np.zeros((1, 2, 2), np.float32))
    assert float(value) == 0.0
    assert np.all(np.isfinite(np.asarray(grad)))


def test_dice_loss_all_weights_zero_gives_zero():
    logits = np.zeros((2, 2, 2), np.float32)
    target = np.ones((2, 2, 2), np.float32)
    got = jax.jit(L.dice_loss)(logits, target, None, np.zeros((2,), np.float32))
    assert float(got) == 0.0


def test_bce_loss_is_masked_mean_of_binary_cross_entropy():
    # p = 0.8 with target 1 -> -log 0.8; p = 0.2 with target 1 -> -log 0.2 (pixel masked out);
    # p = 0.5 with target 0 -> -log 0.5. Mean over the two counted pixels.
    logits = np.array([_logit(0.8), _logit(0.2), 0.0], np.float32).reshape(1, 1, 3)
    target = np.array([1, 1, 0], np.float32).reshape(1, 1, 3)
    mask = np.array([1, 0, 1], np.float32).reshape(1, 1, 3)
    got = jax.jit(L.bce_loss)(logits, target, mask)
    assert float(got) == pytest.approx((-math.log(0.8) - math.log(0.5)) / 2.0, rel=1e-5)


# --------------------------------------------------------------------------- cross_entropy
def _ce_batch():
    # logits [0, ln 2, ln 3] -> softmax [1, 2, 3] / 6; label 2 -> -log(1/2) = ln 2
    # logits [0, 0, 0] -> softmax 1/3 each; label 0 -> ln 3
    logits = np.array([[0.0, math.log(2), math.log(3)], [0.0, 0.0, 0.0]], np.float32)
    return logits


def test_cross_entropy_is_mean_negative_log_softmax_of_the_label():
    got = jax.jit(L.cross_entropy)(_ce_batch(), np.array([2, 0], np.int32))
    assert float(got) == pytest.approx((math.log(2) + math.log(3)) / 2.0, rel=1e-6)


def test_cross_entropy_excludes_unknown_labels():
    got = jax.jit(L.cross_entropy)(_ce_batch(), np.array([-1, 0], np.int32))
    assert float(got) == pytest.approx(math.log(3), rel=1e-6)


def test_cross_entropy_valid_mask_excludes_examples():
    got = jax.jit(L.cross_entropy)(_ce_batch(), np.array([2, 0], np.int32), np.array([True, False]))
    assert float(got) == pytest.approx(math.log(2), rel=1e-6)


def test_cross_entropy_all_unknown_gives_zero_and_zero_gradient():
    value, grad = jax.jit(jax.value_and_grad(L.cross_entropy))(_ce_batch(), np.array([-1, -1], np.int32))
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


# --------------------------------------------------------------------------- iqe_loss / iqa_loss
def _iqe_inputs():
    enhanced = np.zeros((2, 2, 2, 1), np.float32)
    clean = np.full((2, 2, 2, 1), 2.0, np.float32)  # squared error 4, absolute error 2 everywhere
    clean_weight = np.array([1.0, 0.0], np.float32)
    vessel_logits = np.zeros((2, 2, 2, 1), np.float32)  # p = 0.5
    vessel = np.ones((2, 2, 2, 1), np.float32)
    vessel_weight = np.array([1.0, 1.0], np.float32)
    mask = np.ones((2, 2, 2), np.float32)
    return enhanced, clean, clean_weight, vessel_logits, vessel, vessel_weight, mask


def test_iqe_loss_is_qe_plus_lambda_seg_times_seg():
    # L_QE (l2) = 4; L_Seg (dice, eps 1) per example = 1 - (2 * 2 + 1) / (2 + 4 + 1) = 2/7
    f = jax.jit(lambda *a: L.iqe_loss(*a, lambda_seg=0.5))
    total, terms = f(*_iqe_inputs())
    assert float(terms["loss_qe"]) == pytest.approx(4.0)
    assert float(terms["loss_seg"]) == pytest.approx(2.0 / 7.0, rel=1e-6)
    assert float(total) == pytest.approx(4.0 + 0.5 * 2.0 / 7.0, rel=1e-6)


def test_iqe_loss_switches_to_l1_and_bce():
    # L_QE (l1) = 2; L_Seg (bce at p = 0.5, target 1) = ln 2
    f = jax.jit(lambda *a: L.iqe_loss(*a, lambda_seg=0.1, qe="l1", seg="bce"))
    total, terms = f(*_iqe_inputs())
    assert float(terms["loss_qe"]) == pytest.approx(2.0)
    assert float(terms["loss_seg"]) == pytest.approx(math.log(2), rel=1e-6)
    assert float(total) == pytest.approx(2.0 + 0.1 * math.log(2), rel=1e-6)


def test_iqe_loss_without_vessel_logits_has_no_seg_term():
    enhanced, clean, clean_weight, _, vessel, vessel_weight, mask = _iqe_inputs()
    f = jax.jit(lambda *a: L.iqe_loss(*a, lambda_seg=0.5))
    total, terms = f(enhanced, clean, clean_weight, None, vessel, vessel_weight, mask)
    assert set(terms) == {"loss_qe"}
    assert float(total) == pytest.approx(4.0)


def _iqa_inputs():
    logits = _ce_batch()
    quality = np.array([2, -1], np.int32)
    lqi_out = np.full((2, 2, 2, 3), 2.0, np.float32)
    degraded = np.zeros((2, 2, 2, 3), np.float32)  # squared error 4, absolute error 2 everywhere
    mask = np.ones((2, 2, 2, 1), np.float32)
    return logits, quality, lqi_out, degraded, mask


def test_iqa_loss_is_qa_plus_lambda_lqi_times_lqi():
    # L_QA: only example 0 is labelled -> ln 2; L_LQI (l2) = 4
    f = jax.jit(lambda *a: L.iqa_loss(*a, lambda_lqi=0.25))
    total, terms = f(*_iqa_inputs())
    assert float(terms["loss_qa"]) == pytest.approx(math.log(2), rel=1e-6)
    assert float(terms["loss_lqi"]) == pytest.approx(4.0)
    assert float(total) == pytest.approx(math.log(2) + 0.25 * 4.0, rel=1e-6)


def test_iqa_loss_switches_lqi_to_l1():
    # L_LQI (l1) = 2
    f = jax.jit(lambda *a: L.iqa_loss(*a, lambda_lqi=0.25, lqi="l1"))
    total, terms = f(*_iqa_inputs())
    assert float(terms["loss_lqi"]) == pytest.approx(2.0)
    assert float(total) == pytest.approx(math.log(2) + 0.25 * 2.0, rel=1e-6)


def test_iqa_loss_without_lqi_has_no_lqi_term():
    logits, quality, _, degraded, mask = _iqa_inputs()
    f = jax.jit(lambda *a: L.iqa_loss(*a, lambda_lqi=0.25))
    total, terms = f(logits, quality, None, degraded, mask)
    assert set(terms) == {"loss_qa"}
    assert float(total) == pytest.approx(math.log(2), rel=1e-6)


# --------------------------------------------------------------------------- task weighting
def _lbtw(reset="epoch", alpha=0.5):
    return jax.jit(lambda losses, state, epoch: L.lbtw_weights(losses, state, epoch=epoch, alpha=alpha,
                                                               reset=reset))


def test_lbtw_first_batch_takes_the_baseline_and_gives_equal_weights():
    weights, state = _lbtw()(jnp.array([2.0, 4.0, 8.0]), L.lbtw_init(3), jnp.int32(0))
    np.testing.assert_allclose(np.asarray(weights), [1.0, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.initial), [2.0, 4.0, 8.0])


def test_lbtw_weights_follow_sqrt_of_loss_ratio_and_sum_to_task_count():
    step = _lbtw()
    _, state = step(jnp.array([2.0, 4.0]), L.lbtw_init(2), jnp.int32(0))
    # Task 0 halved (ratio 1/2), task 1 unchanged (ratio 1): raw weights sqrt(1/2), 1.
    weights, _ = step(jnp.array([1.0, 4.0]), state, jnp.int32(0))
    w = np.asarray(weights)
    assert w.sum() == pytest.approx(2.0, rel=1e-6)
    assert w[0] / w[1] == pytest.approx(math.sqrt(0.5), rel=1e-6)
    np.testing.assert_allclose(w, 2.0 * np.array([math.sqrt(0.5), 1.0]) / (math.sqrt(0.5) + 1.0), rtol=1e-6)


def test_lbtw_baseline_resets_at_a_new_epoch_with_reset_epoch():
    step = _lbtw(reset="epoch")
    _, state = step(jnp.array([2.0, 4.0]), L.lbtw_init(2), jnp.int32(0))
    _, state = step(jnp.array([1.0, 4.0]), state, jnp.int32(0))
    weights, state = step(jnp.array([1.0, 3.0]), state, jnp.int32(1))
    np.testing.assert_allclose(np.asarray(state.initial), [1.0, 3.0])
    np.testing.assert_allclose(np.asarray(weights), [1.0, 1.0], rtol=1e-6)
    assert int(state.epoch) == 1


def test_lbtw_baseline_is_kept_across_epochs_with_reset_once():
    step = _lbtw(reset="once")
    _, state = step(jnp.array([2.0, 4.0]), L.lbtw_init(2), jnp.int32(0))
    weights, state = step(jnp.array([1.0, 4.0]), state, jnp.int32(1))
    np.testing.assert_allclose(np.asarray(state.initial), [2.0, 4.0])
    assert float(weights[0] / weights[1]) == pytest.approx(math.sqrt(0.5), rel=1e-6)


def test_lbtw_alpha_zero_gives_all_ones():
    step = _lbtw(alpha=0.0)
    _, state = step(jnp.array([2.0, 4.0, 1.0]), L.lbtw_init(3), jnp.int32(0))
    weights, _ = step(jnp.array([0.1, 9.0, 1.0]), state, jnp.int32(0))
    np.testing.assert_allclose(np.asarray(weights), [1.0, 1.0, 1.0], rtol=1e-6)


def test_lbtw_weights_carry_no_gradient_into_the_losses():
    _, state = _lbtw()(jnp.array([2.0, 4.0]), L.lbtw_init(2), jnp.int32(0))

    def total(losses):
        weights, _ = L.lbtw_weights(losses, state, epoch=jnp.int32(0), alpha=0.5)
        return L.combine(losses, weights), weights

    grad, weights = jax.jit(jax.grad(total, has_aux=True))(jnp.array([1.0, 4.0]))
    np.testing.assert_allclose(np.asarray(grad), np.asarray(weights), rtol=1e-6)


def test_lbtw_rejects_a_task_count_that_differs_from_the_state():
    with pytest.raises(ValueError, match="lbtw_init"):
        L.lbtw_weights(jnp.array([1.0, 2.0, 3.0]), L.lbtw_init(2), epoch=0)


def test_fixed_weights_returns_the_config_values_and_records_them():
    weights, state = jax.jit(lambda l, s: L.fixed_weights(l, s, values=(1.0, 0.1, 0.5)))(
        jnp.array([3.0, 2.0, 1.0]), L.lbtw_init(3))
    np.testing.assert_allclose(np.asarray(weights), [1.0, 0.1, 0.5], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.weights), [1.0, 0.1, 0.5], rtol=1e-6)


def test_fixed_weights_rejects_a_wrong_number_of_values():
    with pytest.raises(ValueError, match="one weight per task"):
        L.fixed_weights(jnp.array([3.0, 2.0, 1.0]), L.lbtw_init(3), values=(1.0, 0.1))


def test_combine_is_the_weighted_sum_of_task_losses():
    # 1 * 2 + 0.5 * 4 + 2 * 0.25 = 4.5
    got = jax.jit(L.combine)(jnp.array([2.0, 4.0, 0.25]), jnp.array([1.0, 0.5, 2.0]))
    assert float(got) == pytest.approx(4.5)
