"""The synthetic fundus generator and the data_prep CLI that writes it as shards."""

import json
import os

import cv2
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cleaq_jax.data import location, records, synthetic
from cleaq_jax.data import shards
from cleaq_jax.data_prep import synthetic as prep

FIELDS = {"image", "clean", "mask", "vessel", "lesion", "dr_grade", "quality", "id", "source"}


def test_example_follows_the_record_schema():
    ex = synthetic.generate_example(0, 3, 64, grade=2, quality=1)
    assert FIELDS <= set(ex)
    assert ex["image"].shape == ex["clean"].shape == (64, 64, 3)
    assert ex["image"].dtype == ex["clean"].dtype == np.uint8
    for key in ("mask", "vessel", "lesion"):
        assert ex[key].shape == (64, 64) and ex[key].dtype == np.uint8 and set(np.unique(ex[key])) <= {0, 1}
    assert (ex["dr_grade"], ex["quality"], ex["source"]) == (2, 1, "synthetic")
    back = records.decode_record(records.encode_record(ex))
    np.testing.assert_array_equal(back["image"], ex["image"])
    np.testing.assert_array_equal(back["vessel"], ex["vessel"])


def test_same_seed_and_index_give_the_same_example():
    a = synthetic.generate_example(5, 7, 64)
    b = synthetic.generate_example(5, 7, 64)
    assert (a["dr_grade"], a["quality"], a["id"]) == (b["dr_grade"], b["quality"], b["id"])
    for key in ("image", "clean", "mask", "vessel", "lesion"):
        np.testing.assert_array_equal(a[key], b[key])


def test_other_indices_and_seeds_give_other_eyes():
    base = synthetic.generate_example(5, 7, 64, grade=0, quality=0)
    for other in (synthetic.generate_example(5, 8, 64, grade=0, quality=0),
                  synthetic.generate_example(6, 7, 64, grade=0, quality=0)):
        assert other["id"] != base["id"]
        assert np.abs(other["clean"].astype(int) - base["clean"]).mean() > 5
        assert (other["vessel"] != base["vessel"]).mean() > 0.02


def test_lesion_pixel_count_grows_with_grade():
    counts = np.array([[synthetic.generate_example(1, i, 128, grade=g, quality=0)["lesion"].sum() for i in range(6)]
                       for g in range(5)])
    assert (counts[0] == 0).all()
    assert (counts[1:] > 0).all(axis=1).all()
    assert (np.diff(counts.mean(1)) > 0).all(), counts.mean(1)
    # Small: even grade 4 covers a few percent of the field of view at most.
    assert counts[4].max() < 0.03 * 0.7 * 128 * 128


def test_lesion_scale_enlarges_lesions_and_leaves_the_eye_alone():
    plain = synthetic.generate_example(1, 2, 64, grade=4, quality=0)
    big = synthetic.generate_example(1, 2, 64, grade=4, quality=0, population=synthetic.Population(lesion_scale=4))
    np.testing.assert_array_equal(plain["mask"], big["mask"])
    np.testing.assert_array_equal(plain["vessel"], big["vessel"])
    assert big["lesion"].sum() > 4 * max(plain["lesion"].sum(), 1)
    # Same places: the enlarged lesions cover the small ones.
    assert (big["lesion"][plain["lesion"] > 0] > 0).mean() > 0.9
    with pytest.raises(ValueError, match="lesion_scale"):
        synthetic.generate_example(1, 2, 64, population=synthetic.Population(lesion_scale=0))


def test_build_records_a_lesion_scale_and_rebuilds_when_it_changes(tmp_path):
    out = str(tmp_path / "syn")
    plain = location.build_synthetic(out, 2, size=32, splits={"train": 1.0}, workers=1)
    assert "lesion_scale" not in plain["splits"]["train"]["generator"]
    scaled = location.build_synthetic(out, 2, size=32, splits={"train": 1.0}, workers=1, lesion_scale=4)
    assert scaled["splits"]["train"]["generator"]["lesion_scale"] == 4.0
    rec = next(shards.iter_records(os.path.join(out, scaled["splits"]["train"]["shards"][0])))
    scaled_example = synthetic.generate_example(0, 0, 32, population=synthetic.Population(lesion_scale=4))
    np.testing.assert_array_equal(rec["image"], scaled_example["image"])


def test_a_run_builds_its_synthetic_set_with_the_configured_splits_and_names_a_bad_one(tmp_path):
    """config.data.synthetic.splits decides the split sizes of the set a run builds on first use (a
    split at 0 is left out); fractions that do not sum to 1 stop it before anything is written."""
    from tests import tiny

    cfg = tiny.tiny_config(**{"data.dir": "", "data.synthetic.num": 10, "data.synthetic.splits.train": 0.3,
                              "data.synthetic.splits.val": 0.0, "data.synthetic.splits.test": 0.7})
    path = location.ensure_data(cfg.data, str(tmp_path / "run"))
    counts = {k: v["num_records"] for k, v in shards.read_manifest(path)["splits"].items()}
    assert counts == {"train": 3, "test": 7}
    cfg.data.synthetic.splits.test = 0.5
    with pytest.raises(ValueError, match=r"config\.data\.synthetic\.splits: the split fractions must sum to 1"):
        location.ensure_data(cfg.data, str(tmp_path / "other"))
    assert not os.path.exists(tmp_path / "other")


def test_built_records_keep_the_clean_image_as_reference_at_every_quality_level(tmp_path):
    manifest = location.build_synthetic(str(tmp_path), 12, size=32, splits={"train": 1.0}, workers=1)
    assert manifest["splits"]["train"]["with_reference"] == 12
    seen = set()
    for i, rec in enumerate(sorted(shards.iter_records(str(tmp_path), "train"), key=lambda r: r["id"])):
        ex = synthetic.generate_example(0, i, 32)
        assert rec["id"] == ex["id"]
        np.testing.assert_array_equal(rec["reference"], ex["clean"])
        np.testing.assert_array_equal(rec["image"], ex["image"])  # the image itself is as before
        assert (rec["quality"] == 0) == np.array_equal(rec["image"], rec["reference"])
        seen.add(rec["quality"])
    assert seen == {0, 1, 2}


def test_eye_anatomy_does_not_depend_on_grade():
    healthy = synthetic.generate_example(2, 4, 128, grade=0, quality=0)
    severe = synthetic.generate_example(2, 4, 128, grade=4, quality=0)
    np.testing.assert_array_equal(healthy["mask"], severe["mask"])
    np.testing.assert_array_equal(healthy["vessel"], severe["vessel"])
    near_lesion = cv2.dilate(severe["lesion"], np.ones((7, 7), np.uint8)) > 0
    diff = np.abs(healthy["clean"].astype(int) - severe["clean"]).max(-1)
    # Away from lesions only the global colour-statistics match moves pixels, by about one grey level.
    assert diff[~near_lesion & (severe["mask"] > 0)].mean() < 2.0
    assert diff[severe["lesion"] > 0].mean() > 10


def test_vessel_mask_is_nontrivial_and_inside_the_retina():
    for index in range(4):
        ex = synthetic.generate_example(3, index, 128, grade=0, quality=0)
        inside = ex["mask"] > 0
        assert (ex["vessel"][~inside] == 0).all()
        assert 0.04 < ex["vessel"][inside].mean() < 0.2  # DRIVE's manual masks: about 12% of the field of view


def test_vessel_mask_marks_the_dark_vessels_in_the_image():
    ex = synthetic.generate_example(3, 0, 128, grade=0, quality=0)
    green = ex["clean"][..., 1].astype(float)
    vessel, inside = ex["vessel"] > 0, ex["mask"] > 0
    assert np.median(green[vessel]) < 0.85 * np.median(green[inside & ~vessel])


@pytest.fixture(scope="module")
def colour_features():
    """Per-image mean and std of R, G, B in the retina over 300 eyes at 48 px: half grade 0, half grade
    2-4; plus each image's lesion pixel count."""
    features, labels, lesion_px = [], [], []
    for i in range(300):
        grade = 0 if i % 2 == 0 else 2 + (i // 2) % 3
        ex = synthetic.generate_example(0, i, 48, grade=grade, quality=0)
        pixels = ex["image"][ex["mask"] > 0].astype(np.float32) / 255
        features.append(np.concatenate([pixels.mean(0), pixels.std(0)]))
        labels.append(int(grade >= 2))
        lesion_px.append(ex["lesion"].sum())
    return np.array(features), np.array(labels), np.array(lesion_px, float)[:, None]


def _cv_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression())
    return float(cross_val_score(model, x, y, cv=StratifiedKFold(5, shuffle=True, random_state=0)).mean())


def test_a_classifier_on_mean_colour_is_at_chance(colour_features):
    features, labels, _ = colour_features
    # With no signal, this 5-fold accuracy on 300 balanced examples has a standard deviation of about
    # 0.035 (a permutation simulation with random features); 0.1 is about 3 of them (p ~ 0.003).
    assert abs(_cv_accuracy(features, labels) - 0.5) < 0.1


def test_the_same_classifier_on_lesion_area_separates_the_grades(colour_features):
    _, labels, lesion_px = colour_features
    assert _cv_accuracy(lesion_px, labels) > 0.85  # the signal is there, in the lesions, not in colour


def test_quality_levels_lower_psnr_against_the_clean_reference():
    def psnr(ex):
        mse = np.mean((ex["image"].astype(float) - ex["clean"]) ** 2)
        return np.inf if mse == 0 else 10 * np.log10(255**2 / mse)

    good = [synthetic.generate_example(4, i, 64, quality=0) for i in range(6)]
    usable = [psnr(synthetic.generate_example(4, i, 64, quality=1)) for i in range(6)]
    reject = [psnr(synthetic.generate_example(4, i, 64, quality=2)) for i in range(6)]
    assert all(np.array_equal(ex["image"], ex["clean"]) for ex in good)
    assert max(usable) < 45 and max(reject) < 25
    assert np.mean(reject) < np.mean(usable) - 3


def test_grade_and_quality_are_drawn_from_the_priors():
    population = synthetic.Population(grade_priors=(0, 0, 0, 1, 0), quality_priors=(1, 0, 0))
    exs = [synthetic.generate_example(9, i, 16, population=population) for i in range(5)]
    assert {(ex["dr_grade"], ex["quality"]) for ex in exs} == {(3, 0)}
    labels = np.array([synthetic.draw_labels(9, i) for i in range(2000)])
    # Binomial standard deviation at n=2000 is at most 0.011: 0.035 is above 3 of them.
    np.testing.assert_allclose(np.bincount(labels[:, 0], minlength=5) / 2000, synthetic.GRADE_PRIORS, atol=0.035)
    np.testing.assert_allclose(np.bincount(labels[:, 1], minlength=3) / 2000, synthetic.QUALITY_PRIORS, atol=0.035)


def test_bad_priors_are_rejected_by_name():
    with pytest.raises(ValueError, match="grade_priors"):
        synthetic.generate_example(0, 0, 32, population=synthetic.Population(grade_priors=(1, 2, 3)))


def test_cli_writes_the_splits_with_their_counts_and_decodable_records(tmp_path, capsys):
    out = tmp_path / "syn"
    rc = prep.main(["--out", str(out), "--num", "10", "--size", "32", "--seed", "3",
                    "--splits", "train=0.8,test=0.2", "--workers", "1"])
    assert rc == 0
    manifest = json.loads((out / shards.MANIFEST).read_text())
    assert {k: v["num_records"] for k, v in manifest["splits"].items()} == {"train": 8, "test": 2}
    assert manifest["splits"]["train"]["image_size"] == [32, 32]
    test_ids = [r["id"] for r in shards.iter_records(str(out), "test")]
    assert test_ids == [synthetic.example_id(3, 8), synthetic.example_id(3, 9)]
    for rec in shards.iter_records(str(out), "train"):
        want = synthetic.generate_example(3, int(rec["id"].rsplit("-", 1)[1]), 32)
        np.testing.assert_array_equal(rec["image"], want["image"])
        assert (rec["dr_grade"], rec["quality"], rec["source"]) == (want["dr_grade"], want["quality"], "synthetic")
    assert "img/s" in capsys.readouterr().err
    assert not [f for f in os.listdir(out) if f.startswith(".")]


def test_build_keeps_a_complete_identical_set_and_replaces_a_different_one(tmp_path):
    out = str(tmp_path / "syn")
    first = location.build_synthetic(out, 4, size=32, seed=0, splits={"train": 0.5, "test": 0.5}, workers=1)
    shard = os.path.join(out, first["splits"]["train"]["shards"][0])
    stamp = os.stat(shard).st_mtime_ns
    assert location.build_synthetic(out, 4, size=32, seed=0, splits={"train": 0.5, "test": 0.5}, workers=1) == first
    assert os.stat(shard).st_mtime_ns == stamp
    second = location.build_synthetic(out, 6, size=32, seed=1, splits={"train": 1.0}, workers=1)
    assert set(second["splits"]) == {"train"} and second["splits"]["train"]["num_records"] == 6
    assert sorted(f for f in os.listdir(out) if ".array_record-" in f) == sorted(second["splits"]["train"]["shards"])


@pytest.mark.parametrize("text", ["train=0.8,test=0.3", "train=0.8,test", "train=-1,test=2", "a=0.5,a=0.5"])
def test_bad_splits_are_rejected(text):
    with pytest.raises(ValueError, match="--splits"):
        location.parse_splits(text)


def test_split_counts_add_up_and_follow_the_fractions():
    assert location.split_counts(10, {"train": 0.7, "val": 0.1, "test": 0.2}) == {"train": 7, "val": 1, "test": 2}
    counts = location.split_counts(7, {"train": 0.7, "val": 0.1, "test": 0.2})
    assert sum(counts.values()) == 7 and counts["train"] == 5
