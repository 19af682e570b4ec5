"""Evaluation's pictures (cleaq_jax.programs.pictures): the downstream vessel table on synthetic photographs
with their true vessels and clean references, which splits it may score, and the Grad-CAM picks."""

import json
import os

import numpy as np
import pytest
from test_evaluate import host_state, save_checkpoint, tiny_config

from cleaq_jax.data import location, records, synthetic
from cleaq_jax.data import shards
from cleaq_jax.evaluation import report
from cleaq_jax.programs import evaluate, pictures
from cleaq_jax.runtime import parallel
from cleaq_jax.training import stages
from cleaq_jax.configs import default as default_config
from cleaq_jax.configs import eval as eval_config

SIZE = 64
PER_LEVEL = 4


@pytest.fixture(scope="module")
def synthetic_batch():
    """PER_LEVEL synthetic photographs per quality level at 64 px, each with its clean image as reference."""
    population = synthetic.Population(lesion_scale=4.0)
    examples = [synthetic.generate_example(0, i, SIZE, quality=i % 3, population=population)
                for i in range(3 * PER_LEVEL)]
    return {"image": np.stack([e["image"] for e in examples]), "reference": np.stack([e["clean"] for e in examples]),
            "has_reference": np.ones(len(examples), bool), "mask": np.stack([e["mask"] for e in examples]),
            "vessel": np.stack([e["vessel"] for e in examples]), "has_vessel": np.ones(len(examples), bool),
            "quality": np.asarray([e["quality"] for e in examples]),
            "id_hash": np.asarray([records.id_hash(e["id"]) for e in examples], np.int32),
            "dr_grade": np.asarray([e["dr_grade"] for e in examples])}


def _qt():
    cfg = default_config.get_config()
    cfg.data.image_size = SIZE
    return stages.qt_params(cfg)


def _table(batch, enhanced=None):
    images, has_reference = pictures.vessel_inputs(_qt(), batch, batch_size=6)
    if enhanced is not None:
        images["enhanced"] = enhanced
    per_kind = pictures.segment_kinds(pictures.classical_segmenter("matched"), images, {"reference": has_reference},
                                      batch["vessel"], batch["mask"])
    return images, per_kind, pictures.vessel_table(per_kind, batch["quality"])


def test_clean_references_segment_at_least_as_well_as_the_degraded_inputs(synthetic_batch):
    """On synthetic data the clean image (before QT) shows the true vessels best: the segmenter's Dice on it
    is at least its Dice on the degraded input at every quality level (good images degraded by op2 for
    the table, usable and reject ones as recorded). Measured at 64 px, 4 per level (matched filter):
    good 0.53 -> 0.57, usable 0.39 -> 0.45, reject 0.26 -> 0.60."""
    images, _, table = _table(synthetic_batch)
    good = synthetic_batch["quality"] == 0
    inside = synthetic_batch["mask"][..., None] > 0
    np.testing.assert_array_equal(images["reference"], synthetic_batch["reference"] * inside)
    assert (images["input"][good] != images["reference"][good]).any()  # good images are degraded first
    for level in ("good", "usable", "reject"):
        row = table["per_quality"][level]
        assert row["input"]["n"] == row["reference"]["n"] == PER_LEVEL
        assert row["reference"]["dice"] >= row["input"]["dice"], (level, row)
    reject = table["per_quality"]["reject"]
    assert reject["reference"]["dice"] > reject["input"]["dice"] + 0.1  # QT hides vessels: a real gap
    assert table["overall"]["reference"]["auc"] > table["overall"]["input"]["auc"]


def test_an_enhancement_is_scored_beside_the_input(synthetic_batch):
    # The clean image as a perfect "enhancement": its scores must equal the reference's.
    clean = (synthetic_batch["reference"] * (synthetic_batch["mask"][..., None] > 0)).astype(np.uint8)
    _, per_kind, _ = _table(synthetic_batch, enhanced=clean)
    for score in pictures.SCORES:
        np.testing.assert_allclose(per_kind["enhanced"][score], per_kind["reference"][score])


def test_without_stored_references_the_original_is_the_reference_and_reject_has_none(synthetic_batch):
    batch = {k: v for k, v in synthetic_batch.items() if k not in ("reference", "has_reference")}
    images, _, table = _table(batch)
    usable = batch["quality"] == 1
    original = batch["image"] * (batch["mask"][..., None] > 0)
    np.testing.assert_array_equal(images["reference"][usable], original[usable])
    per = table["per_quality"]
    assert per["good"]["reference"]["n"] == per["usable"]["reference"]["n"] == PER_LEVEL
    assert table["per_quality"]["reject"]["reference"] == {"n": 0, "dice": None, "auc": None, "accuracy": None}


def test_vessel_table_means_over_the_images_that_define_each_score():
    nan = np.nan
    per_kind = {"input": {"dice": np.array([0.2, 0.4, nan, 1.0]), "auc": np.array([0.5, 0.7, 0.9, nan]),
                          "accuracy": np.array([0.9, 0.8, 0.7, 0.6])},
                "reference": {"dice": np.array([nan, 0.6, nan, nan]), "auc": np.array([nan, 0.8, nan, nan]),
                              "accuracy": np.array([nan, 0.95, nan, nan])}}
    table = pictures.vessel_table(per_kind, np.array([1, 1, 1, 2]))
    usable = table["per_quality"]["usable"]
    assert usable["input"] == {"n": 3, "dice": pytest.approx(0.3), "auc": pytest.approx(0.7),
                               "accuracy": pytest.approx(0.8)}
    assert usable["reference"]["n"] == 1 and usable["reference"]["dice"] == pytest.approx(0.6)
    assert table["per_quality"]["reject"]["input"]["auc"] is None  # its only image has no AUC
    assert "good" not in table["per_quality"]
    assert table["overall"]["input"]["n"] == 4


def _manifest(directory, entry):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, shards.MANIFEST), "w") as f:
        json.dump({"schema": 1, "splits": {"test": entry}}, f)
    return str(directory)


def test_only_true_vessel_masks_score_a_segmentation(tmp_path):
    assert pictures.true_vessels(_manifest(tmp_path / "syn", {"with_vessel_mask": 5}), "test") == ""
    none = pictures.true_vessels(_manifest(tmp_path / "none", {"with_vessel_mask": 0}), "test")
    assert "no vessel masks" in none
    pseudo = pictures.true_vessels(_manifest(tmp_path / "pseudo", {"with_vessel_mask": 5,
                                                                    "vessel_masks": {"method": "frangi"}}), "test")
    assert "pseudo vessel masks" in pseudo and "frangi" in pseudo


def test_an_unknown_vessel_method_names_the_config_key():
    with pytest.raises(ValueError, match="config.eval.vessel_method"):
        pictures.classical_segmenter("hough")


def test_gradcam_picks_take_the_lowest_quality_images_of_each_grade():
    grades = np.array([0, 0, 0, 2, 2, -1, 4])
    quality = np.array([0, 2, 1, 0, 1, 2, 0])
    picks = pictures.gradcam_picks(grades, quality, per_grade=2)
    assert picks.tolist() == [1, 2, 4, 3, 6]


# --------------------------------------------------------------------------- inside an evaluation
@pytest.fixture(scope="module")
def evaluated_synthetic(tmp_path_factory):
    """A tiny stage-3 checkpoint (test_evaluate's) evaluated on 30 synthetic 32-px photographs."""
    root = tmp_path_factory.mktemp("pictures")
    data = str(root / "data")
    location.build_synthetic(data, num=30, size=32, seed=0, lesion_scale=4.0, workers=1)
    cfg = tiny_config()
    save_checkpoint(cfg, str(root / "stage3"), host_state(cfg), parallel.make_mesh())
    ecfg = eval_config.get_config()
    ecfg.checkpoint_dir, ecfg.data.dir, ecfg.eval_batch_size = str(root / "stage3"), data, 4
    ecfg.eval.num_examples_grid, ecfg.eval.gradcam_per_grade = 3, 1
    return evaluate.run(ecfg, str(root / "out")), str(root / "out" / "eval")


def test_evaluation_writes_the_vessel_table_and_both_figures(evaluated_synthetic):
    result, out_dir = evaluated_synthetic
    vessels = result["vessels"]
    assert vessels["segmenter"].startswith("classical matched")
    test_count = result["num_examples"]
    assert vessels["overall"]["input"]["n"] == vessels["overall"]["enhanced"]["n"] == test_count
    assert vessels["overall"]["reference"]["n"] == test_count  # synthetic records carry clean references
    assert vessels["overall"]["Seg-IQE"]["n"] == test_count  # IQE's own vessel map, scored beside the segmenter
    assert vessels["figure_rows"] == [q for q in ("good", "usable", "reject") if q in vessels["per_quality"]]
    md = open(os.path.join(out_dir, "eval.md")).read()
    assert "## Downstream vessel segmentation" in md and "| all | enhanced |" in md and "| all | Seg-IQE |" in md
    for name in ("vessels.png", "gradcam_grid.png"):
        with open(os.path.join(out_dir, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name


def test_a_split_without_true_vessels_is_noted_not_scored():
    md = report.markdown({"vessels_skipped": "split 'test' of d carries pseudo vessel masks"})
    assert "Not scored: split 'test' of d carries pseudo vessel masks." in md
