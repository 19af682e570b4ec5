"""Grad-CAM of the DR grader: its definition, its shape and range, and that it finds a lesion."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cleaq_jax.evaluation import gradcam
from cleaq_jax.models.dr import DRGrader

TINY = dict(width=1 / 16, stage_sizes=(1, 1, 1, 1))
# Float32 sums of at most a few hundred O(1) products: round-off is ~1e-6 of the peak, far below this.
TOL = 1e-4


def _grader(num_grades=5, seed=0, shape=(1, 32, 32, 3), **kw):
    model = DRGrader(num_grades=num_grades, **(kw or TINY))
    variables = model.init(jax.random.key(seed), jnp.zeros(shape))
    # Non-trivial running statistics, so inference-mode BatchNorm is not the identity.
    variables = {"params": variables["params"],
                 "batch_stats": jax.tree.map(lambda a: a + 0.1, variables["batch_stats"])}
    return model, variables


def test_cam_from_gradients_matches_the_hand_computed_example():
    a0 = [[1.0, 2.0], [3.0, 4.0]]
    a1 = [[0.0, 1.0], [0.0, 1.0]]
    features = jnp.asarray(np.stack([a0, a1], -1)[None])  # (1, 2, 2, 2)
    g0 = np.full((2, 2), 0.25)  # alpha_0 = 0.25
    g1 = np.asarray([[-1.0, -1.0], [1.0, -3.0]])  # alpha_1 = -1
    grads = jnp.asarray(np.stack([g0, g1], -1)[None])
    # 0.25 A0 - A1 = [[0.25, -0.5], [0.75, 0]] -> ReLU -> over its maximum 0.75.
    expected = np.asarray([[1 / 3, 0.0], [1.0, 0.0]])
    heat = gradcam.cam_from_gradients(features, grads, (2, 2))
    np.testing.assert_allclose(np.asarray(heat[0]), expected, atol=1e-6)


def test_cam_of_a_map_with_no_positive_evidence_is_zero_not_nan():
    features = jnp.ones((2, 2, 2, 3))
    heat = gradcam.cam_from_gradients(features, -jnp.ones((2, 2, 2, 3)), (8, 8))
    assert heat.shape == (2, 8, 8)
    np.testing.assert_array_equal(np.asarray(heat), 0.0)


def test_heatmaps_are_non_negative_normalised_and_have_the_input_size():
    model, variables = _grader(shape=(1, 40, 48, 3))
    x = jax.random.uniform(jax.random.key(1), (3, 40, 48, 3))
    out = jax.jit(gradcam.grad_cam, static_argnums=0)(model, variables, x)
    heat = np.asarray(out["heatmap"])
    assert heat.shape == (3, 40, 48) and heat.dtype == np.float32
    assert heat.min() >= 0.0
    # Each map is divided by its own maximum: 1 wherever there is any heat.
    for h in heat:
        assert h.max() == pytest.approx(1.0) or h.max() == 0.0
    assert out["probs"].shape == (3, 5) and out["grade"].shape == (3,)


def test_the_gradient_matches_the_closed_form_of_a_pooled_linear_head():
    """The grader's head is mean-pool then fc, so d y_c / d A_ij^k = W[k, c] / (h w) and Grad-CAM equals
    ReLU(A . W[:, c]) up to the positive factor the normalisation removes (CAM, Zhou et al. 2016)."""
    model, variables = _grader(shape=(1, 96, 96, 3))
    x = jax.random.uniform(jax.random.key(2), (4, 96, 96, 3))  # a 3x3 map at S/32
    target = jnp.asarray([0, 1, 3, 4])
    out = gradcam.grad_cam(model, variables, x, target)
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    features = state["intermediates"]["backbone"]["layer4"]["__call__"][0]
    w = variables["params"]["backbone"]["fc"]["kernel"]  # (K, grades)
    coarse = nn.relu(jnp.einsum("bhwk,kb->bhw", features, w[:, target]))
    expected = jax.image.resize(coarse, (4, 96, 96), "bilinear")
    peak = jnp.max(expected, axis=(1, 2), keepdims=True)
    expected = jnp.where(peak > 0, expected / jnp.where(peak > 0, peak, 1.0), 0.0)
    spread = jnp.max(expected, (1, 2)) - jnp.min(expected, (1, 2))
    assert int(jnp.sum(spread > 0.1)) >= 2  # not a comparison of flat maps
    np.testing.assert_allclose(np.asarray(out["heatmap"]), np.asarray(expected), atol=TOL)
    np.testing.assert_array_equal(np.asarray(out["grade"]), np.asarray(target))


def test_probabilities_are_the_graders_own_and_default_target_is_the_predicted_grade():
    model, variables = _grader()
    x = jax.random.uniform(jax.random.key(3), (3, 32, 32, 3))
    out = gradcam.grad_cam(model, variables, x)
    logits = model.apply(variables, x, train=False)
    np.testing.assert_allclose(np.asarray(out["probs"]), np.asarray(jax.nn.softmax(logits)), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["grade"]), np.asarray(jnp.argmax(logits, -1)))


def test_each_image_in_a_batch_gets_its_own_map():
    model, variables = _grader()
    x = jax.random.uniform(jax.random.key(4), (3, 32, 32, 3))
    batched = gradcam.grad_cam(model, variables, x)["heatmap"]
    for i in range(3):
        alone = gradcam.grad_cam(model, variables, x[i:i + 1])["heatmap"][0]
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(alone), atol=TOL)


def test_overlay_keeps_the_photograph_where_there_is_no_heat_or_no_retina():
    image = jnp.full((2, 8, 8, 3), 0.4)
    heat = jnp.zeros((2, 8, 8)).at[:, 2:4, 2:4].set(1.0)
    mask = jnp.ones((2, 8, 8)).at[:, 3, 3].set(0)
    out = np.asarray(gradcam.overlay(image, heat, mask))
    assert out.shape == (2, 8, 8, 3) and out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out[:, 0, 0], 0.4)  # cold
    np.testing.assert_allclose(out[:, 3, 3], 0.4)  # outside the retina
    assert np.abs(out[:, 2, 2] - 0.4).max() > 0.1  # hot: coloured


# --------------------------------------------------------------------------- a trained tiny grader
SIZE = 32
LESION_RADIUS = 3


def _lesion_images(rng, n, with_lesion):
    """Flat noisy backgrounds; where with_lesion, a bright yellow disc at a random centre (returned)."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    x = 0.3 + 0.05 * rng.standard_normal((n, SIZE, SIZE, 3))
    centre = rng.integers(LESION_RADIUS + 2, SIZE - LESION_RADIUS - 2, (n, 2))
    disc = (yy - centre[:, :1, None]) ** 2 + (xx - centre[:, 1:, None]) ** 2 <= LESION_RADIUS**2
    x = np.where((disc & with_lesion[:, None, None])[..., None], np.asarray([0.9, 0.9, 0.3]), x)
    return np.clip(x, 0, 1).astype(np.float32), centre


def test_the_heat_peak_lies_on_the_lesion_a_trained_grader_learned():
    """A two-stage DRGrader (feature map 4x4, cells of 8 px at 32 px) learns lesion vs none in 150 Adam
    steps (about 4 s on 2 cores). The peak of a bilinearly upsampled 4x4 map sits near a cell centre, at
    most 4*sqrt(2) = 5.7 px from any point of its cell; we allow one cell (8 px). A map blind to the lesion
    would put its peak 12 px away on average (two uniform points in a 32 px square are 0.52 * 32 apart)."""
    model = DRGrader(num_grades=2, width=1 / 16, stage_sizes=(1, 1))
    variables = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, stats, opt, x, y):
        def loss(p):
            logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]

        (_, stats), g = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), stats, opt

    rng = np.random.default_rng(0)
    for _ in range(150):
        y = rng.integers(0, 2, 32)
        x, _ = _lesion_images(rng, 32, y.astype(bool))
        params, stats, opt = step(params, stats, opt, x, y)
    x, centre = _lesion_images(np.random.default_rng(1), 16, np.ones(16, bool))
    out = gradcam.grad_cam(model, {"params": params, "batch_stats": stats}, x, jnp.ones(16, jnp.int32))
    assert float(jnp.mean(out["probs"][:, 1])) > 0.9, "the tiny grader did not learn the lesion"
    heat = np.asarray(out["heatmap"])
    peaks = np.asarray([np.unravel_index(np.argmax(h), h.shape) for h in heat])
    dist = np.linalg.norm(peaks - centre, axis=1)
    assert np.mean(dist <= 8.0) >= 0.9, dist
    assert dist.mean() < 6.0, dist


def test_the_compiled_function_is_cached_per_model_and_gives_the_same_maps():
    model, variables = _grader(shape=(1, 64, 64, 3))
    x = jax.random.uniform(jax.random.key(5), (2, 64, 64, 3))
    assert gradcam.compiled(model) is gradcam.compiled(DRGrader(num_grades=5, **TINY))
    np.testing.assert_allclose(np.asarray(gradcam.compiled(model)(variables, x)["heatmap"]),
                               np.asarray(gradcam.grad_cam(model, variables, x)["heatmap"]), atol=TOL)
