"""The vessel teacher: CE-Net's colour and scale augmentation on device, the evaluation's pixel counts
and AUC, and both training stages run from DRIVE's published layout to a teacher_b checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cleaq_jax import teacher
from tests import fixtures_layouts, tiny


# --------------------------------------------------------------------------- colour
def test_hsv_conversions_match_scikit_image():
    from skimage.color import hsv2rgb, rgb2hsv

    rgb = np.random.default_rng(0).random((24, 24, 3)).astype(np.float32)
    rgb[0, :3] = [[0, 0, 0], [0.5, 0.5, 0.5], [1, 0, 0]]  # black, grey (no hue), a pure primary
    np.testing.assert_allclose(np.asarray(teacher.rgb_to_hsv(jnp.asarray(rgb))), rgb2hsv(rgb), atol=1e-6)
    hsv = np.random.default_rng(1).random((24, 24, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(teacher.hsv_to_rgb(jnp.asarray(hsv))), hsv2rgb(hsv), atol=1e-6)


def _jitter_many(image, inside, n):
    keys = jax.random.split(jax.random.key(3), n)
    return np.asarray(jax.jit(jax.vmap(teacher.colour_jitter, in_axes=(None, None, 0)))(image, inside, keys))


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
    before = np.asarray(teacher.rgb_to_hsv(jnp.asarray(image)))[inside > 0]
    colourful = before[:, 1] > 0.2  # hue is ill-defined near grey
    for jittered in out[changed]:
        delta = np.asarray(teacher.rgb_to_hsv(jnp.asarray(jittered)))[inside > 0] - before
        hue = (np.mod(delta[:, 0] + 0.5, 1.0) - 0.5)[colourful]  # shortest way round the hue circle
        assert np.ptp(hue) < 1e-3 and abs(hue[0]) <= teacher.HUE_SHIFT_DEG / 360 + 1e-4  # one shift for all pixels
        assert np.abs(delta[:, 1]).max() <= teacher.SAT_SHIFT + 1e-4
        assert np.abs(delta[:, 2]).max() <= teacher.VAL_SHIFT + 1e-4


# --------------------------------------------------------------------------- geometry
def test_shift_scale_keeps_a_square_within_cenet_scale_aspect_and_shift_limits():
    size = 64
    plane = np.zeros((size, size, 1), np.float32)
    plane[16:48, 16:48] = 1  # a 32-px square centred on the image centre
    keys = jax.random.split(jax.random.key(5), 48)
    out = np.asarray(jax.jit(jax.vmap(teacher.shift_scale, in_axes=(None, 0)))(jnp.asarray(plane), keys))[..., 0] > 0.5
    moved = 0
    limit = (1 + teacher.SCALE_LIMIT) * np.sqrt(1 + teacher.ASPECT_LIMIT)
    for square in out:
        rows, cols = np.flatnonzero(square.any(1)), np.flatnonzero(square.any(0))
        for idx in (rows, cols):
            extent = idx[-1] - idx[0] + 1
            assert 32 / limit - 2 <= extent <= 32 * limit + 2
            assert abs((idx[0] + idx[-1]) / 2 - (size - 1) / 2) <= teacher.SHIFT_LIMIT * size + 1
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
    x, mask, ves = (np.asarray(a) for a in jax.jit(teacher.augment_batch)(*map(jnp.asarray, batch), jax.random.key(7)))
    assert set(np.unique(mask)) <= {0.0, 1.0} and set(np.unique(ves)) <= {0.0, 1.0}
    assert np.all(ves <= mask) and np.all(x[mask == 0] == 0)
    assert (mask != fov).any()  # some images were moved ...
    agreement = ((x.max(-1) > 0.5) == (ves > 0.5))[mask > 0].mean()
    assert agreement > 0.97  # ... with their vessels (bilinear edges may differ)


# --------------------------------------------------------------------------- evaluation counts
def test_auc_from_logit_histograms_matches_scikit_learn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(4)
    truth = (rng.random((3, 20, 20)) < 0.15).astype(np.float32)
    logits = (rng.normal(size=truth.shape) * 2 + 2.5 * truth - 1).astype(np.float32)
    mask = np.ones_like(truth)
    counts = jax.device_get(teacher.segmentation_counts(jnp.asarray(logits), jnp.asarray(truth), jnp.asarray(mask),
                                                        jnp.ones(3)))
    expected = roc_auc_score(truth.ravel(), logits.ravel())
    assert teacher.auc_from_histograms(counts["pos_hist"], counts["neg_hist"]) == pytest.approx(expected, abs=2e-4)


def test_segmentation_counts_use_only_pixels_inside_the_mask_of_weighted_images():
    truth = np.array([[[1, 1, 0, 0]], [[1, 0, 0, 0]], [[1, 1, 1, 1]]], np.float32)
    logits = np.array([[[5, -5, 5, -5]], [[5, 5, 5, 5]], [[-5, -5, -5, -5]]], np.float32)
    mask = np.array([[[1, 1, 1, 0]], [[1, 1, 1, 1]], [[1, 1, 1, 1]]], np.float32)  # pixel 4 of image 0 is outside
    weight = np.array([1, 1, 0], np.float32)  # image 2 is padding
    c = jax.device_get(teacher.segmentation_counts(*map(jnp.asarray, (logits, truth, mask, weight))))
    assert (c["tp"], c["fp"], c["fn"], c["tn"]) == (2, 4, 1, 0)
    summary = teacher.summarise_counts(c)
    assert summary["images"] == 2 and summary["dice"] == pytest.approx(4 / 9)
    assert summary["mean_image_dice"] == pytest.approx((2 / 4 + 2 / 5) / 2)
    assert summary["accuracy"] == pytest.approx(2 / 7) and summary["specificity"] == 0.0


# --------------------------------------------------------------------------- both stages from DRIVE
@pytest.fixture(scope="module")
def drive_teacher(tmp_path_factory):
    """DRIVE's published layout (6 training, 2 test images) prepared at 32 px, then configs/vessel_teacher.py
    (teacher_a, then teacher_b) at width 1/16 for 2 epochs each, in a subprocess."""
    from data_prep import drive

    root = tmp_path_factory.mktemp("drive")
    fixtures_layouts.drive_layout(str(root / "DRIVE"), train=(21, 22, 23, 24), test=(1, 2))
    data = str(root / "shards")
    assert drive.main(["--root", str(root / "DRIVE"), "--out", data, "--size", "32", "--workers", "1"]) == 0
    workdir = str(root / "run")
    overrides = {"data.dir": data, "data.image_size": 32, "model.width": 0.0625, "model.encoder_stages": "(1,1,1,1)",
                 "batch_size": 4, "eval_batch_size": 2, "num_epochs": 2, "optim.constant_epochs": 2,
                 "log_every_steps": 1, "checkpoint_every_steps": 2}
    cmd = [sys.executable, "-m", "cleaq_jax.main", "--config=configs/vessel_teacher.py", f"--workdir={workdir}"]
    proc = subprocess.run(cmd + [f"--config.{k}={v}" for k, v in overrides.items()], env=tiny.subprocess_env(),
                          cwd=tiny.REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return workdir, proc.stderr


@pytest.mark.slow
def test_both_stages_run_from_drive_fixtures_and_leave_a_teacher_b_checkpoint(drive_teacher):
    workdir, log = drive_teacher
    for stage in ("teacher_a", "teacher_b"):
        assert os.listdir(os.path.join(workdir, stage, "checkpoints")), f"{stage} saved no checkpoint"
    assert "teacher_b: cenet initialised from" in log and os.path.join(workdir, "teacher_a") in log
    restored = teacher.restore_teacher(os.path.join(workdir, "teacher_b"))
    assert restored.config.stage == "teacher_b" and restored.step == 2 and restored.image_size == 32


@pytest.mark.slow
def test_each_stage_reports_dice_accuracy_and_auc_on_drive_test_raw_and_degraded(drive_teacher):
    workdir, _ = drive_teacher
    for stage in ("teacher_a", "teacher_b"):
        with open(os.path.join(workdir, stage, "eval", "eval.json")) as f:
            result = json.load(f)
        assert result["stage"] == stage and result["split"] == "test"
        for view in ("raw", "degraded"):
            assert result[view]["images"] == 2
            for key in ("dice", "accuracy", "auc", "sensitivity", "specificity"):
                value = result[view][key]
                assert value is None or 0.0 <= value <= 1.0, (stage, view, key, value)
            assert result[view]["accuracy"] is not None and result[view]["auc"] is not None
        with open(os.path.join(workdir, stage, "eval", "eval.md")) as f:
            assert "| as is |" in f.read()
