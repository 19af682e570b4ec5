"""The predict CLI (cleaq_jax.programs.predict) on the real scikit-image fundus photograph: CSV rows, enhanced images
at the processed size, unreadable and disc-less files reported and skipped, and quality gating."""

from __future__ import annotations

import contextlib
import csv
import io
import os

import cv2
import fixtures_layouts
import numpy as np
import pytest
import skimage.data
from test_evaluate import SIZE, host_state, save_checkpoint, tiny_config

from cleaq_jax.evaluation import restore
from cleaq_jax.programs import predict
from cleaq_jax.runtime import parallel

GOOD_BIAS = (50.0, 0.0, 0.0)  # C-IQA output bias that makes IQA rate every image good


def _canvas(photo: np.ndarray, width: int, height: int) -> np.ndarray:
    """The photograph scaled to the canvas height, centred on a black width x height canvas (RGB)."""
    side = height
    scaled = cv2.resize(photo, (side, side), interpolation=cv2.INTER_AREA)
    canvas = np.zeros((height, width, 3), np.uint8)
    left = (width - side) // 2
    canvas[:, left:left + side] = scaled
    return canvas


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """retina.jpg on a 4:3 canvas, a small TIFF copy, an unreadable .jpg and a black PNG."""
    folder = tmp_path_factory.mktemp("photos")
    retina = skimage.data.retina()
    cv2.imwrite(str(folder / "retina.jpg"), _canvas(retina, 1880, 1410)[..., ::-1])
    os.makedirs(folder / "more")
    cv2.imwrite(str(folder / "more" / "small.tif"), _canvas(retina, 400, 300)[..., ::-1])
    (folder / "broken.jpg").write_bytes(b"this is not a photograph")
    cv2.imwrite(str(folder / "black.png"), np.zeros((300, 400, 3), np.uint8))
    (folder / "notes.txt").write_text("not an image suffix: never read")
    return str(folder)


def _checkpoint(root, nets=("iqe", "iqa", "dr"), stage="stage3", quality_bias=None) -> str:
    cfg = tiny_config(stage)
    directory = str(root / stage)
    save_checkpoint(cfg, directory, host_state(cfg, nets, quality_bias=quality_bias), parallel.make_mesh())
    return directory


def _main(*argv: str) -> tuple[int, str]:
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        code = predict.main(list(argv))
    return code, log.getvalue()


def _rows(out_dir: str) -> dict[str, dict[str, str]]:
    with open(os.path.join(out_dir, "predictions.csv"), newline="") as f:
        return {os.path.basename(r["file"]): r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def predicted(photos, tmp_path_factory):
    checkpoint = _checkpoint(tmp_path_factory.mktemp("run"))
    out = str(tmp_path_factory.mktemp("out"))
    code, log = _main("--checkpoint", checkpoint, "--input", photos, "--out", out, "--batch-size", "2")
    return code, log, out


# --------------------------------------------------------------------------- a run over a folder
def test_predict_writes_a_csv_row_per_photograph(predicted):
    code, _, out = predicted
    rows = _rows(out)
    assert code == 0 and set(rows) == {"retina.jpg", "small.tif"}
    for row in rows.values():
        grades = [float(row[f"p_grade_{g}"]) for g in range(5)]
        assert int(row["grade"]) == int(np.argmax(grades)) and sum(grades) == pytest.approx(1.0, abs=1e-4)
        qualities = [float(row[f"p_{q}"]) for q in ("good", "usable", "reject")]
        assert row["quality"] == ("good", "usable", "reject")[int(np.argmax(qualities))]
        assert sum(qualities) == pytest.approx(1.0, abs=1e-4)


def test_enhanced_image_has_the_processed_size_and_is_black_outside_the_disc(predicted):
    _, _, out = predicted
    row = _rows(out)["retina.jpg"]
    assert row["enhanced"] == os.path.join("enhanced", "retina.png")
    image = cv2.imread(os.path.join(out, row["enhanced"]))
    assert image.shape == (SIZE, SIZE, 3)
    assert image[0, 0].tolist() == [0, 0, 0] and image[SIZE // 2, SIZE // 2].any()


def test_unreadable_and_black_files_are_reported_and_skipped(predicted):
    _, log, out = predicted
    with open(os.path.join(out, "skipped.txt")) as f:
        skipped = dict(line.rstrip("\n").split("\t") for line in f)
    assert {os.path.basename(p) for p in skipped} == {"broken.jpg", "black.png"}
    broken = next(p for p in skipped if p.endswith("broken.jpg"))
    black = next(p for p in skipped if p.endswith("black.png"))
    assert "not a JPEG/PNG/TIFF/GIF image" in skipped[broken] and "no retinal disc" in skipped[black]
    assert f"skipped {broken}" in log and f"skipped {black}" in log
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]


def test_gate_quality_leaves_images_rated_good_unenhanced(photos, tmp_path):
    checkpoint = _checkpoint(tmp_path, quality_bias=GOOD_BIAS)
    out = str(tmp_path / "out")
    code, _ = _main("--checkpoint", checkpoint, "--input", photos, "--out", out, "--gate-quality",
                    "--batch-size", "2")
    rows = _rows(out)
    assert code == 0 and {r["quality"] for r in rows.values()} == {"good"}
    assert all(r["enhanced"] == "" for r in rows.values())
    assert os.listdir(os.path.join(out, "enhanced")) == []


def test_a_png_declaring_40000_by_40000_px_is_skipped_and_the_photos_beside_it_graded(tmp_path):
    folder = tmp_path / "photos"
    os.makedirs(folder)
    retina = skimage.data.retina()
    cv2.imwrite(str(folder / "a.jpg"), _canvas(retina, 400, 300)[..., ::-1])
    fixtures_layouts.write_oversized_png(str(folder / "huge.png"))  # a few KB on disk
    cv2.imwrite(str(folder / "z.jpg"), _canvas(retina, 640, 480)[..., ::-1])
    out = str(tmp_path / "out")
    code, log = _main("--checkpoint", _checkpoint(tmp_path), "--input", str(folder), "--out", out,
                      "--batch-size", "2")
    assert code == 0 and set(_rows(out)) == {"a.jpg", "z.jpg"}
    with open(os.path.join(out, "skipped.txt")) as f:
        skipped = dict(line.rstrip("\n").split("\t") for line in f)
    huge = str(folder / "huge.png")
    assert list(skipped) == [huge]
    assert "declares 40000 x 40000 px" in skipped[huge] and "MAX_IMAGE_PIXELS" in skipped[huge]
    assert f"skipped {huge}" in log


# --------------------------------------------------------------------------- checkpoints lacking a network
def test_gate_quality_without_iqa_is_refused_naming_the_checkpoint(photos, tmp_path):
    checkpoint = _checkpoint(tmp_path, nets=("iqe", "dr"), stage="stage1")
    code, log = _main("--checkpoint", checkpoint, "--input", photos, "--out", str(tmp_path / "o"), "--gate-quality")
    assert code == 2 and "--gate-quality needs the IQA network" in log and checkpoint in log


def test_a_stage1_checkpoint_is_noted_to_lack_quality_assessment(tmp_path):
    restored = restore.load_checkpoint(_checkpoint(tmp_path, nets=("iqe", "dr"), stage="stage1"))
    notes = predict.check_checkpoint(restored, gate_quality=False)
    assert restored.stage == "stage1" and len(notes) == 1 and "no IQA network" in notes[0]


def test_a_folder_without_checkpoints_is_an_error(photos, tmp_path):
    code, log = _main("--checkpoint", str(tmp_path), "--input", photos, "--out", str(tmp_path / "o"))
    assert code == 2 and f"no checkpoint in {tmp_path}" in log


# --------------------------------------------------------------------------- inputs and names
def test_folders_are_searched_recursively_for_image_files(photos):
    found = predict.list_inputs([photos, "missing.jpg"])
    names = [os.path.relpath(p, photos) for p in found[:-1]]
    assert names == ["black.png", "broken.jpg", "retina.jpg", os.path.join("more", "small.tif")]
    assert found[-1] == "missing.jpg"  # kept, to be reported as unreadable


def test_enhanced_names_never_collide():
    taken: set[str] = set()
    names = [predict.enhanced_name(p, taken) for p in ("a/x.jpg", "b/x.png", "x.tif", "y.jpg")]
    assert names == ["x.png", "x-2.png", "x-3.png", "y.png"]
