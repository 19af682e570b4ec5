"""The evaluation report's picture sections: the downstream vessel table and figure (paper Fig. 8) and the
Grad-CAM grid (paper Fig. 9), written beside eval.md."""

import json

import cv2
import numpy as np

from cleaq_jax.evaluation import report


def _vessels_block():
    row = lambda d: {"n": 4, "dice": d, "auc": 0.9, "accuracy": 0.95}  # noqa: E731
    per = {q: {"input": row(0.5), "enhanced": row(0.6), "reference": row(0.7)} for q in ("good", "usable")}
    per["reject"] = {"input": row(0.3), "enhanced": {"n": 4, "dice": None, "auc": None, "accuracy": None}}
    return {"segmenter": "classical (frangi)", "overall": per["good"], "per_quality": per,
            "figure_rows": ["good", "usable"]}


def test_vessel_table_lists_each_level_and_image_kind():
    lines = report.vessel_markdown(_vessels_block())
    text = "\n".join(lines)
    assert "| usable | enhanced | 4 | 0.6000 | 0.9000 | 0.9500 |" in text
    assert "| reject | enhanced | 4 | - | - | - |" in text  # undefined, not 0
    assert "classical (frangi)" in text


def test_write_adds_the_vessel_figure_and_the_gradcam_grid(tmp_path):
    rng = np.random.default_rng(0)
    n, s = 2, 16
    images = {k: rng.random((n, s, s, 3)) for k in ("input", "enhanced", "reference")}
    segmented = {k: rng.random((n, s, s)) > 0.8 for k in images}
    rows = report.vessel_rows(images, segmented, rng.random((n, s, s)) > 0.8)
    assert rows.shape == (n, s, 8 * s, 3)
    np.testing.assert_array_equal(rows[..., s:2 * s, 0], segmented["input"].astype(np.float32))
    grid = {k: rng.random((3, s, s, 3)) for k in ("input", "enhanced", "heat_input", "heat_enhanced")}
    grid.update(grade=np.array([0, 2, 4]), pred_input=np.array([0, 1, 4]), pred_enhanced=np.array([0, 2, 3]),
                quality=np.array([1, 2, 2]))
    result = {"stage": "stage3", "split": "test", "num_examples": 8, "vessels": _vessels_block()}
    report.write(result, str(tmp_path), vessel_panels=rows, gradcam=grid)
    for name in ("vessels.png", "gradcam_grid.png"):
        image = cv2.imread(str(tmp_path / name))
        assert image is not None and image.shape[0] > 100, name
    assert "Downstream vessel segmentation" in (tmp_path / "eval.md").read_text()
    assert json.loads((tmp_path / "eval.json").read_text())["vessels"]["segmenter"] == "classical (frangi)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "eval.md", "gradcam_grid.png", "vessels.png"]
