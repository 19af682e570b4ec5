"""CE-Net's colour and scale augmentation on device (cleaq_jax.data.augment): conversions against
scikit-image, the shift limits, and image, field of view and vessels moved together."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cleaq_jax.data import augment


# --------------------------------------------------------------------------- colour
def test_hsv_conversions_match_scikit_image():
    from skimage.color import hsv2rgb, rgb2hsv

    rgb = np.random.default_rng(0).random((24, 24, 3)).astype(np.float32)
    rgb[0, :3] = [[0, 0, 0], [0.5, 0.5, 0.5], [1, 0, 0]]  # black, grey (no hue), a pure primary
    np.testing.assert_allclose(np.asarray(augment.rgb_to_hsv(jnp.asarray(rgb))), rgb2hsv(rgb), atol=1e-6)
    hsv = np.random.default_rng(1).random((24, 24, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(augment.hsv_to_rgb(jnp.asarray(hsv))), hsv2rgb(hsv), atol=1e-6)


def _jitter_many(image, inside, n):
    keys = jax.random.split(jax.random.key(3), n)
    return np.asarray(jax.jit(jax.vmap(augment.colour_jitter, in_axes=(None, None, 0)))(image, inside, keys))


def test_colour_jitter_shifts_hue_saturation_value_within_cenet_limits_half_the_time():
    rng = np.random.default_rng(2)
    inside = np.zeros((16, 16), np.float32)
    inside[2:14, 2:14] = 1
    # Mid-range colours, so no shift is clipped at 0 or 1 and each shows in full.
    image = (0.3 + 0.4 * rng.random((16, 16, 3))).astype(np.float32) * inside[..., None]
    out = _jitter_many(jnp.asarray(image), jnp.asarray(inside), 64)
    changed = np.abs(out - image).max(axis=(1, 2, 3)) > 1e-6
    assert 16 <= changed.sum() <= 48  # probability 1/2 over 64 draws
    assert np.all(out[:, inside == 0] == 0)
    before = np.asarray(augment.rgb_to_hsv(jnp.asarray(image)))[inside > 0]
    colourful = before[:, 1] > 0.2  # hue is ill-defined near grey
    for jittered in out[changed]:
        delta = np.asarray(augment.rgb_to_hsv(jnp.asarray(jittered)))[inside > 0] - before
        hue = (np.mod(delta[:, 0] + 0.5, 1.0) - 0.5)[colourful]  # shortest way round the hue circle
        assert np.ptp(hue) < 1e-3 and abs(hue[0]) <= augment.HUE_SHIFT_DEG / 360 + 1e-4  # one shift for all pixels
        assert np.abs(delta[:, 1]).max() <= augment.SAT_SHIFT + 1e-4
        assert np.abs(delta[:, 2]).max() <= augment.VAL_SHIFT + 1e-4


# --------------------------------------------------------------------------- geometry
def test_shift_scale_keeps_a_square_within_cenet_scale_aspect_and_shift_limits():
    size = 64
    plane = np.zeros((size, size, 1), np.float32)
    plane[16:48, 16:48] = 1  # a 32-px square centred on the image centre
    keys = jax.random.split(jax.random.key(5), 48)
    out = np.asarray(jax.jit(jax.vmap(augment.shift_scale, in_axes=(None, 0)))(jnp.asarray(plane), keys))[..., 0] > 0.5
    moved = 0
    limit = (1 + augment.SCALE_LIMIT) * np.sqrt(1 + augment.ASPECT_LIMIT)
    for square in out:
        rows, cols = np.flatnonzero(square.any(1)), np.flatnonzero(square.any(0))
        for idx in (rows, cols):
            extent = idx[-1] - idx[0] + 1
            assert 32 / limit - 2 <= extent <= 32 * limit + 2
            assert abs((idx[0] + idx[-1]) / 2 - (size - 1) / 2) <= augment.SHIFT_LIMIT * size + 1
        moved += not np.array_equal(square, plane[..., 0] > 0.5)
    assert 12 <= moved <= 36  # probability 1/2 over 48 draws


def test_augment_batch_keeps_image_field_of_view_and_vessels_aligned():
    size = 32
    yy, xx = np.mgrid[:size, :size]
    fov = (np.hypot(yy - 15.5, xx - 15.5) < 14).astype(np.float32)
    vessel = ((np.abs(yy - xx) < 2) | (np.abs(yy - 10) < 1.5)).astype(np.float32) * fov
    # White vessels on black: an HSV shift keeps them apart (value moves by at most 15/255).
    image = np.repeat(vessel[..., None], 3, -1)
    batch = [np.stack([a] * 8) for a in (image, fov, vessel)]
    x, mask, ves = (np.asarray(a) for a in jax.jit(augment.augment_batch)(*map(jnp.asarray, batch), jax.random.key(7)))
    assert set(np.unique(mask)) <= {0.0, 1.0} and set(np.unique(ves)) <= {0.0, 1.0}
    assert np.all(ves <= mask) and np.all(x[mask == 0] == 0)
    assert (mask != fov).any()  # some images were moved ...
    agreement = ((x.max(-1) > 0.5) == (ves > 0.5))[mask > 0].mean()
    assert agreement > 0.97  # ... with their vessels (bilinear edges may differ)
