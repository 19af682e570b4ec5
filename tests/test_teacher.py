"""The vessel teacher: the evaluation's pixel counts and AUC, and both training stages run from DRIVE's
published layout to a teacher_b checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cleaq_jax.evaluation import restore
from cleaq_jax.programs import pictures, teacher
from tests import fixtures_layouts, tiny


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
    from cleaq_jax.data_prep import drive

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
    assert "teacher_b: cenet from teacher_a step 2 of" in log and os.path.join(workdir, "teacher_a") in log
    restored = restore.restore_teacher(os.path.join(workdir, "teacher_b"))
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


@pytest.mark.slow
def test_the_teacher_segments_evaluation_images_of_another_size(drive_teacher):
    """The downstream vessel table's segmenter: a 32-px teacher on 48-px images, resized there and back."""
    workdir, _ = drive_teacher
    segmenter = pictures.teacher_segmenter(os.path.join(workdir, "teacher_b"))
    assert segmenter.name.startswith("CE-Net vessel teacher") and "teacher_b" in segmenter.name
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    masks = np.broadcast_to(((yy - 24) ** 2 + (xx - 24) ** 2 < 22**2).astype(np.uint8), (3, 48, 48)).copy()
    images = (rng.integers(0, 256, (3, 48, 48, 3)) * masks[..., None]).astype(np.uint8)
    scores, vessels = segmenter.segment(images, masks)
    assert scores.shape == vessels.shape == (3, 48, 48) and vessels.dtype == bool
    assert scores.min() >= 0.0 and scores.max() <= 1.0
    np.testing.assert_array_equal(vessels, scores > 0.5)
