"""Specification of the dataset prep CLIs (data_prep.eyeq, .messidor, .drive) and their shared machinery,
run on fixtures built in the published folder layouts from scikit-image's real retina photo."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cleaq_jax.data import pipeline
from cleaq_jax.data import records as records_lib
from cleaq_jax.data.records import iter_records
from data_prep import drive, eyeq, messidor
from fixtures_layouts import EYEQ_HEADER, MESSIDOR_HEADER, drive_layout, eyeq_layout, messidor_layout, retina_disc
from fixtures_layouts import small_fundus, write_csv, write_image, write_xls

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = "64"


def run_main(main, *argv):
    """main(argv) -> (exit code, stderr text)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([*argv, "--size", SIZE, "--workers", "1"])
    return code, err.getvalue()


def looks_complete(out) -> list[str]:
    """Whatever in ``out`` a reader could take for a finished shard set."""
    if not os.path.isdir(out):
        return []
    return [f for f in os.listdir(out) if not f.startswith(".")]


def records(out, split):
    return {r["id"]: r for r in iter_records(str(out), split)}


def skip_lines(out, split):
    with open(os.path.join(out, f"skipped-{split}.txt")) as f:
        return [line.rstrip("\n").split("\t") for line in f if not line.startswith("#")]


# --------------------------------------------------------------------------- EyeQ
@pytest.fixture(scope="module")
def eyeq_data(tmp_path_factory):
    return eyeq_layout(str(tmp_path_factory.mktemp("eyeq")))


@pytest.fixture(scope="module")
def eyeq_run(eyeq_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eyeq_out")
    code, err = run_main(eyeq.main, "--images", eyeq_data["images"], "--labels", eyeq_data["labels"],
                         "--split", "train", "--out", str(out))
    return code, err, out


def eyeq_args(data, out, *extra):
    return ("--images", data["images"], "--labels", data["labels"], "--split", "train", "--out", str(out), *extra)


def test_eyeq_records_round_trip_ids_grades_and_qualities(eyeq_data, eyeq_run):
    code, _, out = eyeq_run
    assert code == 0
    got = records(out, "train")
    assert {k: (r["dr_grade"], r["quality"]) for k, r in got.items()} == eyeq_data["good"]


def test_eyeq_records_hold_disc_cropped_images_and_binary_masks(eyeq_run):
    for r in records(eyeq_run[2], "train").values():
        assert r["image"].shape == (64, 64, 3) and r["mask"].shape == (64, 64)
        assert r["source"] == "eyeq" and r["vessel"] is None
        assert 0.7 < r["mask"].mean() < 0.8  # a disc filling the square covers pi/4 of it
        assert not r["image"][r["mask"] == 0].any()


def test_eyeq_skips_each_bad_item_and_names_it_with_the_reason(eyeq_data, eyeq_run):
    _, err, out = eyeq_run
    listed = {line[0]: line[2] for line in skip_lines(out, "train")}
    assert set(listed) == set(eyeq_data["bad"])
    for image_id, reason in eyeq_data["bad"].items():
        assert reason in listed[image_id]
        assert image_id in err  # also printed at the end of the run


def test_eyeq_manifest_counts_only_the_written_records(eyeq_data, eyeq_run):
    with open(os.path.join(eyeq_run[2], "manifest.json")) as f:
        split = json.load(f)["splits"]["train"]
    assert split["num_records"] == len(eyeq_data["good"])
    assert split["skipped"] == len(eyeq_data["bad"])
    assert sum(row["all"] for row in split["counts"].values()) == len(eyeq_data["good"])


def test_eyeq_shards_feed_a_class_balanced_loader(eyeq_data, eyeq_run):
    out = str(eyeq_run[2])
    split = records_lib.read_manifest(out)["splits"]["train"]
    # The label CSV is provenance under its own key; "labels" stays the class-label file of the shards.
    assert split["labels"] == "eyeq-train.labels.json" and split["source_labels"] == "Label_EyeQ_train.csv"
    grades = pipeline.split_labels(out, "train", "dr_grade")
    assert sorted(grades.tolist()) == sorted(g for g, _ in eyeq_data["good"].values())
    batch = next(pipeline.train_loader(out, "train", global_batch_size=2, seed=0, class_balance=0.5,
                                       process_index=0, process_count=1, read_threads=0))
    assert batch["image"].shape == (2, 64, 64, 3)


def test_eyeq_manifest_records_the_command_that_rebuilds_the_split(eyeq_data, eyeq_run):
    out = str(eyeq_run[2])
    command = records_lib.read_manifest(out)["splits"]["train"]["prep_command"]
    assert command.startswith("python -m data_prep.eyeq --images ") and f"--out {out}" in command
    assert records_lib.rebuild_hint(out, "train") == f"rebuild it with `{command}`"


def test_progress_line_reports_count_rate_and_eta(eyeq_data, eyeq_run):
    err = eyeq_run[1]
    total = len(eyeq_data["good"]) + 4  # four faulty images are read; three label rows are rejected before
    assert f"{total}/{total}" in err and "img/s" in err and "<" in err


def test_strict_stops_at_a_bad_label_row_naming_it_and_writes_nothing(eyeq_data, tmp_path):
    code, err = run_main(eyeq.main, *eyeq_args(eyeq_data, tmp_path / "out", "--strict"))
    assert code == 1
    assert "Label_EyeQ_train.csv:11" in err and "not found" in err
    assert looks_complete(tmp_path / "out") == []


def test_strict_stops_at_a_truncated_image_naming_it_and_writes_nothing(eyeq_data, tmp_path):
    labels = write_csv(str(tmp_path / "labels.csv"), EYEQ_HEADER,
                       [[0, "10009_right.jpeg", 0, 0], [1, "10010_left.jpeg", 1, 1], [2, "20001_left.jpeg", 0, 1]])
    code, err = run_main(eyeq.main, "--images", eyeq_data["images"], "--labels", labels, "--split", "train",
                         "--out", str(tmp_path / "out"), "--strict")
    assert code == 1
    assert "20001_left.jpeg" in err and "truncated" in err
    assert os.listdir(tmp_path / "out") == []  # the writer's temporary shards are gone too


def test_malformed_csv_header_is_reported_naming_the_file_and_nothing_is_written(eyeq_data, tmp_path):
    labels = write_csv(str(tmp_path / "trainLabels.csv"), ["image", "level"], [["10009_right", 0]])
    code, err = run_main(eyeq.main, "--images", eyeq_data["images"], "--labels", labels, "--split", "train",
                         "--out", str(tmp_path / "out"))
    assert code == 1
    assert "trainLabels.csv" in err and ",image,quality,DR_grade" in err
    assert looks_complete(tmp_path / "out") == []


def test_a_split_whose_every_item_is_skipped_fails_and_writes_nothing(eyeq_data, tmp_path):
    labels = write_csv(str(tmp_path / "labels.csv"), EYEQ_HEADER, [[0, "20003_left.jpeg", 0, 1]])
    code, err = run_main(eyeq.main, "--images", eyeq_data["images"], "--labels", labels, "--split", "train",
                         "--out", str(tmp_path / "out"))
    assert code == 1 and "no retinal disc" in err
    assert looks_complete(tmp_path / "out") == []


def test_shards_are_identical_whatever_the_worker_count(eyeq_data, eyeq_run, tmp_path):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = eyeq.main([*eyeq_args(eyeq_data, tmp_path), "--size", SIZE, "--workers", "2"])
    assert code == 0, err.getvalue()
    one = [r for r in iter_records(str(eyeq_run[2]), "train", decode_images=False)]
    two = [r for r in iter_records(str(tmp_path), "train", decode_images=False)]
    assert [r["id"] for r in one] == [r["id"] for r in two] and one == two


def test_module_entry_point_runs_in_a_subprocess(eyeq_data, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "data_prep.eyeq", *eyeq_args(eyeq_data, tmp_path),
                           "--size", SIZE, "--workers", "1", "--num-shards", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(f for f in os.listdir(tmp_path) if ".array_record-" in f) == [
        "eyeq-train.array_record-00000-of-00002", "eyeq-train.array_record-00001-of-00002"]


def test_a_run_killed_midway_leaves_nothing_that_looks_complete(eyeq_data, tmp_path):
    # The last image is a FIFO: reading it blocks, so the run is provably stopped mid-way when killed.
    fifo = os.path.join(eyeq_data["images"], "99999_left.jpeg")
    os.mkfifo(fifo)
    labels = write_csv(str(tmp_path / "labels.csv"), EYEQ_HEADER,
                       [[0, "10009_right.jpeg", 0, 0], [1, "10010_left.jpeg", 1, 1], [2, "99999_left.jpeg", 0, 0]])
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.eyeq", "--images", eyeq_data["images"], "--labels",
                             labels, "--split", "train", "--out", str(out), "--size", SIZE, "--workers", "1"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    writer = None
    try:
        deadline = time.monotonic() + 60
        while writer is None and time.monotonic() < deadline and proc.poll() is None:
            try:  # succeeds only once the run is blocked reading the FIFO, after the first two images
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.05)
        assert writer is not None, "the run never reached the third image"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if writer is not None:
            os.close(writer)
        os.remove(fifo)
    assert looks_complete(out) == []
    assert any(f.startswith(".tmp-eyeq-train-") for f in os.listdir(out))  # it had started writing
    with pytest.raises(FileNotFoundError):
        list(iter_records(str(out)))


# --------------------------------------------------------------------------- Messidor
@pytest.fixture(scope="module")
def messidor_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("messidor")
    return {"root": str(root), **messidor_layout(str(root))}


@pytest.fixture(scope="module")
def messidor_run(messidor_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("messidor_out")
    code, err = run_main(messidor.main, "--root", messidor_data["root"], "--out", str(out), "--test-fraction", "1/4")
    return code, err, out


def test_messidor_records_round_trip_grades_with_unknown_quality(messidor_data, messidor_run):
    code, _, out = messidor_run
    assert code == 0
    got = {**records(out, "train"), **records(out, "test")}
    assert {k: r["dr_grade"] for k, r in got.items()} == messidor_data["good"]
    assert {r["quality"] for r in got.values()} == {-1} and {r["source"] for r in got.values()} == {"messidor"}


def test_messidor_splits_are_disjoint_and_hold_the_test_fraction(messidor_run):
    out = messidor_run[2]
    train, test = set(records(out, "train")), set(records(out, "test"))
    assert not train & test
    # 16 annotated rows (12 good, 4 faulty) and a fraction of 1/4: every 4th row of the order is test.
    with open(os.path.join(out, "manifest.json")) as f:
        splits = json.load(f)["splits"]
    assert splits["test"]["num_records"] + splits["test"]["skipped"] == 4


def test_messidor_skips_and_names_bad_rows_and_spreadsheets(messidor_data, messidor_run):
    out = messidor_run[2]
    listed = skip_lines(out, "train") + skip_lines(out, "test")
    for key, reason in messidor_data["bad"].items():
        assert any((line[0] == key or line[1].endswith(key)) and reason in line[2] for line in listed), key


def test_stratified_split_is_exact_per_grade_and_fixed_by_the_seed():
    # Messidor's published grade counts (546, 153, 247, 254 of 1200).
    grades = [0] * 546 + [1] * 153 + [2] * 247 + [3] * 254
    names = [f"img{i:04d}.tif" for i in range(1200)]
    splits = messidor.assign_splits(names, grades, 1 / 6, seed=0)
    assert splits.count("test") == 200
    for g, n in zip(range(4), (546, 153, 247, 254)):
        in_test = sum(s == "test" and gr == g for s, gr in zip(splits, grades))
        assert abs(in_test - n / 6) <= 1
    assert messidor.assign_splits(names, grades, 1 / 6, seed=0) == splits
    assert messidor.assign_splits(names, grades, 1 / 6, seed=1) != splits


def seed_processing_last(root, image_id, fraction):
    """A seed that puts ``image_id`` in the split written second, after the first has records."""
    for seed in range(50):
        jobs = messidor.collect(root, fraction, seed)[0]
        if next(j for j in jobs if j.id == image_id).split != jobs[0].split:
            return seed
    raise AssertionError("no seed in 0-49 puts the image in the second split")


def test_messidor_strict_writes_neither_split_when_a_later_image_fails(tmp_path):
    root = tmp_path / "messidor"
    messidor_layout(str(root), per_base=5, bases=("11",), faults=False)
    write_image(str(root / "Base11" / "200511_99999_0100_PP.tif"), np.zeros((200, 300, 3), np.uint8))
    rows = [[f"200511_{k:05d}_0100_PP.tif", "x", float(k % 4), 0.0] for k in range(5)]
    rows.append(["200511_99999_0100_PP.tif", "x", 1.0, 0.0])  # no disc: fails only when its image is read
    write_xls(str(root / "Annotation_Base11.xls"), MESSIDOR_HEADER, rows)
    seed = seed_processing_last(str(root), "200511_99999_0100_PP", 0.5)
    code, err = run_main(messidor.main, "--root", str(root), "--out", str(tmp_path / "out"),
                         "--test-fraction", "0.5", "--seed", str(seed), "--strict")
    assert code == 1 and "200511_99999_0100_PP.tif" in err
    assert os.listdir(tmp_path / "out") == []


# --------------------------------------------------------------------------- DRIVE
@pytest.fixture(scope="module")
def drive_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("drive")
    layout = drive_layout(str(root))
    write_image(str(root / "training" / "images" / "23_training.tif"), small_fundus(3, (565, 584)))
    out = tmp_path_factory.mktemp("drive_out")
    code, err = run_main(drive.main, "--root", str(root), "--out", str(out))
    return code, err, out, layout


def test_drive_writes_train_and_test_splits_with_vessel_masks(drive_run):
    code, _, out, layout = drive_run
    assert code == 0
    train, test = records(out, "train"), records(out, "test")
    assert set(train) == {"21_training", "22_training"} and set(test) == {"01_test", "02_test"}
    for r in (*train.values(), *test.values()):
        assert r["vessel"] is not None and r["vessel"].shape == (64, 64)
        assert (r["dr_grade"], r["quality"], r["source"]) == (-1, -1, "drive")


def test_drive_retinal_mask_is_the_published_fov_cropped_like_the_image(drive_run):
    # The fixture's FOV is its disc (546 px photo) less 2 px: a centred circle just inside the square.
    radius = retina_disc().r * 546 / 1411
    yy, xx = np.mgrid[:64, :64]
    ideal = np.hypot(xx - 31.5, yy - 31.5) < 32 * (radius - 2) / radius
    for r in records(drive_run[2], "train").values():
        iou = (ideal & (r["mask"] > 0)).sum() / (ideal | (r["mask"] > 0)).sum()
        assert iou > 0.95
        assert not r["image"][r["mask"] == 0].any()


def test_drive_vessel_mask_keeps_thin_vessels_after_resizing(drive_run):
    layout = drive_run[3]
    for image_id, r in records(drive_run[2], "test").items():
        fov, vessel = layout["cases"][image_id]
        share_before = vessel.sum() / fov.sum()
        share_after = r["vessel"].sum() / r["mask"].sum()
        assert share_after >= 0.9 * share_before  # shrinking ~8.5x would erase most of them by plain rounding
        assert not (r["vessel"] & (1 - r["mask"])).any()


def test_drive_image_without_manual_annotation_is_skipped_and_named(drive_run):
    listed = skip_lines(drive_run[2], "train")
    assert [line[0] for line in listed] == ["23_training"]
    assert "1st_manual" in listed[0][2] and "23_manual1.gif" in listed[0][2]


def test_prep_cli_rejects_a_missing_root_with_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(io.StringIO()) as err:
        drive.main(["--root", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "nope" in err.getvalue()
