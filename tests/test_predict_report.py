"""predict --explain and --report: Grad-CAM overlays of the reported grade beside each prediction, and a
report.html that a real browser (headless Chromium) loads cleanly with one card per graded photograph."""

from __future__ import annotations

import csv
import os

import cv2
import jax.numpy as jnp
import numpy as np
import pytest
from test_evaluate import SIZE
from test_predict import _checkpoint, _main, photos  # noqa: F401  (photos is a fixture)

from cleaq_jax.evaluation import gradcam, restore
from cleaq_jax.programs import explain
from tests import _browser


@pytest.fixture(scope="module")
def reported(photos, tmp_path_factory):  # noqa: F811
    checkpoint = _checkpoint(tmp_path_factory.mktemp("run"))
    out = str(tmp_path_factory.mktemp("out"))
    code, log = _main("--checkpoint", checkpoint, "--input", photos, "--out", out, "--batch-size", "2", "--report")
    return code, log, out, checkpoint


def _rows(out):
    with open(os.path.join(out, "predictions.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_explain_writes_a_heatmap_over_the_photograph_and_its_enhancement(reported):
    code, _, out, _ = reported
    assert code == 0
    assert sorted(os.listdir(os.path.join(out, explain.EXPLAIN_DIR))) == [
        "retina-enhanced.png", "retina.png", "small-enhanced.png", "small.png"]
    for name in ("retina.png", "retina-enhanced.png"):
        heat = cv2.imread(os.path.join(out, explain.EXPLAIN_DIR, name))
        assert heat.shape == (SIZE, SIZE, 3)
        assert heat[0, 0].tolist() == [0, 0, 0]  # outside the retina the (black) photograph shows


def test_the_heatmaps_explain_the_reported_grade(photos, tmp_path):  # noqa: F811
    restored = restore.load_checkpoint(_checkpoint(tmp_path))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(3)]
    masks = [np.ones((SIZE, SIZE), np.uint8)] * 3
    probs = np.eye(5, dtype=np.float32)[[4, 0, 2]]  # the grades "reported" for the three images
    out = {"dr_probs": probs, "enhanced": rng.random((3, SIZE, SIZE, 3)).astype(np.float32),
           "enhance": np.array([True, False, True])}
    heat = explain.padded_heatmaps(restored, images, masks, out, batch_size=4)
    assert [sorted(h) for h in heat] == [["enhanced", "photo"], ["photo"], ["enhanced", "photo"]]
    variables = {"params": restored.state.params["dr"], "batch_stats": restored.state.batch_stats["dr"]}
    x = jnp.asarray(np.stack(images), jnp.float32) / 255.0
    direct = gradcam.grad_cam(restored.models["dr"], variables, x, jnp.asarray([4, 0, 2]))["heatmap"]
    for i in range(3):
        np.testing.assert_allclose(heat[i]["photo"], np.asarray(direct[i]), atol=1e-4)


def test_report_has_a_card_per_graded_photograph_and_lists_the_skipped(reported):
    _, log, out, _ = reported
    page = open(os.path.join(out, explain.REPORT), encoding="utf-8").read()
    assert page.count('<article class="card"') == len(_rows(out)) == 2
    assert "broken.jpg" in page and "black.png" in page and "Skipped (2)" in page
    assert os.path.join(out, explain.REPORT) in log
    for crop in ("retina.png", "small.png"):
        assert cv2.imread(os.path.join(out, explain.CROPS_DIR, crop)).shape == (SIZE, SIZE, 3)


def test_report_loads_in_a_browser_without_errors(reported, tmp_path):
    _, _, out, _ = reported
    with _browser.Page(str(tmp_path / "profile")) as page:
        page.open("file://" + os.path.join(out, explain.REPORT))
        assert page.errors() == []
        assert page.evaluate("document.querySelectorAll('.card:not([hidden])').length") == 2
        # crop, enhancement and two heatmaps per card, every one found beside the report
        assert page.evaluate("document.images.length") == 8
        assert page.evaluate("Array.prototype.every.call(document.images, function(i){return i.naturalWidth>0})")


def test_explain_without_report_writes_no_report(photos, tmp_path):  # noqa: F811
    out = str(tmp_path / "out")
    code, _ = _main("--checkpoint", _checkpoint(tmp_path), "--input", photos, "--out", out, "--explain")
    assert code == 0 and not os.path.exists(os.path.join(out, explain.REPORT))
    assert len(os.listdir(os.path.join(out, explain.EXPLAIN_DIR))) == 4


def test_a_checkpoint_without_grader_is_noted_to_give_no_heatmaps(photos, tmp_path):  # noqa: F811
    checkpoint = _checkpoint(tmp_path, nets=("iqa",), stage="stage2")
    out = str(tmp_path / "out")
    code, log = _main("--checkpoint", checkpoint, "--input", photos, "--out", out, "--report")
    assert code == 0 and "no heatmaps" in log
    page = open(os.path.join(out, explain.REPORT), encoding="utf-8").read()
    assert page.count('<article class="card"') == 2 and "Grad-CAM" not in page.split("<main")[1]
