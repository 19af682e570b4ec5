"""The quality transform QT (paper III-B, eq. 4): op1 / op2 on the cofe-Net degradation model."""

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import skimage.data
from skimage.metrics import structural_similarity

from cleaq_jax.data import degrade
from cleaq_jax.data.records import id_hash

SIZE = 128
NUM_KEYS = 32


def _psnr(reference: np.ndarray, image: np.ndarray) -> float:
    mse = float(np.mean((reference.astype(np.float64) - image) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def _ssim(reference: np.ndarray, image: np.ndarray) -> float:
    return structural_similarity(reference, image, channel_axis=-1, data_range=1.0)


@pytest.fixture(scope="module")
def photo():
    """skimage's real fundus photograph at 128 px with a circular mask, zero outside it."""
    image = cv2.resize(skimage.data.retina(), (SIZE, SIZE), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    yy, xx = np.mgrid[:SIZE, :SIZE]
    mask = ((yy - (SIZE - 1) / 2) ** 2 + (xx - (SIZE - 1) / 2) ** 2 <= (0.49 * SIZE) ** 2).astype(np.float32)
    return image * mask[..., None], mask


KEYS = jax.random.split(jax.random.key(0), NUM_KEYS)
# One compiled program per op, shared by the tests (compiling dominates their time on a CPU).
OVER_KEYS = {name: jax.jit(jax.vmap(getattr(degrade, name), in_axes=(None, None, 0)))
             for name in ("illumination", "artefacts", "blur", "op1", "op2")}


@pytest.fixture(scope="module")
def degraded(photo):
    """op1 and op2 of the photo under KEYS, as numpy (NUM_KEYS, H, W, 3)."""
    image, mask = photo
    return {name: np.asarray(OVER_KEYS[name](image, mask, KEYS)) for name in ("op1", "op2")}


def test_op2_lowers_psnr_and_ssim_into_the_documented_range(photo, degraded):
    image, _ = photo
    psnr = np.array([_psnr(image, d) for d in degraded["op2"]])
    ssim = np.array([_ssim(image, d) for d in degraded["op2"]])
    # Documented (module docstring, docs/degradation.md): every key 11-20 dB, SSIM 0.53-0.82.
    assert psnr.min() > 9.5 and psnr.max() < 22.0, psnr
    assert ssim.min() > 0.45 and ssim.max() < 0.88, ssim


def test_op1_lowers_psnr_and_ssim_into_the_documented_range(photo, degraded):
    image, _ = photo
    mse = np.array([np.mean((d - image) ** 2) for d in degraded["op1"]])
    ssim = np.array([_ssim(image, d) for d in degraded["op1"]])
    # Documented: PSNR of the mean error about 19 dB, mean SSIM about 0.85; no key goes below op2's floor.
    assert 16.0 < 10 * np.log10(1 / mse.mean()) < 22.0, mse
    assert 0.78 < ssim.mean() < 0.92, ssim
    assert min(_psnr(image, d) for d in degraded["op1"]) > 9.5


def test_op2_degrades_more_than_op1_on_average(photo, degraded):
    image, _ = photo
    for metric in (_ssim, lambda a, b: -np.mean((a - b) ** 2)):
        op1 = np.mean([metric(image, d) for d in degraded["op1"]])
        op2 = np.mean([metric(image, d) for d in degraded["op2"]])
        assert op2 < op1


def test_same_key_gives_the_same_image(photo, degraded):
    image, mask = photo
    np.testing.assert_array_equal(np.asarray(OVER_KEYS["op2"](image, mask, KEYS)), degraded["op2"])


def test_different_keys_give_different_images(degraded):
    op2 = degraded["op2"].reshape(NUM_KEYS, -1)
    distances = np.abs(op2[:, None] - op2[None]).mean(-1)
    assert (distances[~np.eye(NUM_KEYS, dtype=bool)] > 1e-3).all()


@pytest.mark.parametrize("name", ["illumination", "artefacts", "blur", "op1", "op2"])
def test_pixels_outside_the_mask_are_zero(photo, name):
    image, mask = photo
    # Bright everywhere, also outside the mask: the op itself must zero the outside.
    noisy = np.clip(image + 0.5 * (1 - mask[..., None]), 0, 1)
    out = np.asarray(OVER_KEYS[name](noisy, mask, KEYS))
    assert (out[:, mask == 0] == 0).all()
    assert (out[:, mask == 1].mean(axis=(1, 2)) > 0.05).all()


def _transform_batch(photo, qualities) -> np.ndarray:
    image, mask = photo
    images, masks = jnp.broadcast_to(image, (NUM_KEYS, *image.shape)), jnp.broadcast_to(mask, (NUM_KEYS, *mask.shape))
    return np.asarray(degrade.quality_transform_batch(images, masks, jnp.asarray(qualities), KEYS))


def test_quality_transform_runs_under_jit_and_vmap_with_traced_quality(photo, degraded):
    qualities = np.tile([0, 1, 2, -1], NUM_KEYS // 4)
    batch = _transform_batch(photo, qualities)
    for i, q in enumerate(qualities):
        want = {0: degraded["op2"][i], 1: degraded["op1"][i]}.get(int(q), photo[0])
        np.testing.assert_allclose(batch[i], want, atol=2e-6)


@pytest.mark.parametrize("quality", [2, -1])
def test_reject_and_unknown_quality_pass_unchanged(photo, quality):
    batch = _transform_batch(photo, np.full(NUM_KEYS, quality))
    np.testing.assert_array_equal(batch, np.broadcast_to(photo[0], batch.shape))


def test_eval_keys_depend_only_on_the_example_id():
    base = jax.random.key(42)
    ids = ["10009_left", "10009_right", "20051_left", "synthetic-0-0000003"]
    hashes = [id_hash(i) for i in ids]
    keys = degrade.eval_keys(base, hashes)
    shuffled = degrade.eval_keys(base, hashes[::-1])[::-1]
    alone = degrade.eval_keys(base, hashes[2:3])
    data = jax.random.key_data
    np.testing.assert_array_equal(data(keys), data(shuffled))
    np.testing.assert_array_equal(data(keys[2]), data(alone[0]))
    np.testing.assert_array_equal(data(keys[1]), data(jax.random.fold_in(base, id_hash("10009_right"))))
    assert len({tuple(np.asarray(data(k)).tolist()) for k in keys}) == len(ids)


@pytest.mark.parametrize("width", [3, 5, 7])
def test_blur_equals_opencv_gaussian_blur_for_odd_kernels(width):
    rng = np.random.default_rng(width)
    image = rng.uniform(size=(40, 48, 3)).astype(np.float32)
    sigma = 6.0
    # reference_size = 40 keeps pixel values unscaled; degenerate ranges pin sigma and the kernel width.
    p = degrade.QTParams(reference_size=40, blur_sigma=(sigma, sigma), blur_kernel=(width / sigma, width / sigma))
    out = np.asarray(degrade.blur(image, np.ones((40, 48)), jax.random.key(0), p))
    np.testing.assert_allclose(out, cv2.GaussianBlur(image, (width, width), sigma), atol=1e-5)


def test_blur_is_weaker_at_smaller_images_by_the_size_ratio():
    rng = np.random.default_rng(0)
    big = cv2.resize(rng.uniform(size=(16, 16, 3)).astype(np.float32), (256, 256), interpolation=cv2.INTER_NEAREST)
    small = cv2.resize(big, (64, 64), interpolation=cv2.INTER_NEAREST)
    p = degrade.QTParams(reference_size=256, blur_sigma=(8.0, 8.0), blur_kernel=(1.0, 1.0))
    change_big = np.abs(np.asarray(degrade.blur(big, np.ones((256, 256)), jax.random.key(0), p)) - big)
    change_small = np.abs(np.asarray(degrade.blur(small, np.ones((64, 64)), jax.random.key(0), p)) - small)
    # The same blur relative to the image: the blurred band around each edge covers the same fraction.
    assert abs((change_big > 0.01).mean() - (change_small > 0.01).mean()) < 0.05


def test_qtparams_from_config_reads_the_field_names():
    cfg = ml_collections.ConfigDict({"blur_sigma": [2.0, 4.0], "spot_count": (1, 3), "halo_weight": 0.5})
    p = degrade.QTParams.from_config(cfg)
    assert p == degrade.QTParams(blur_sigma=(2.0, 4.0), spot_count=(1, 3), halo_weight=0.5)
    hash(p)  # hashable, so it can be a static jit argument


def test_qtparams_from_config_names_an_unknown_key():
    with pytest.raises(ValueError, match="blur_sigmas"):
        degrade.QTParams.from_config(ml_collections.ConfigDict({"blur_sigmas": (1.0, 2.0)}))


def test_qtparams_rejects_an_inverted_range():
    with pytest.raises(ValueError, match="contrast"):
        degrade.QTParams(contrast=(1.4, 0.6))
