"""Specification of the dataset prep CLIs (cleaq_jax.data_prep.eyeq, .messidor, .drive) and their shared machinery,
run on fixtures built in the published folder layouts from scikit-image's real retina photo."""

import collections
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

from cleaq_jax.data import balance, pipeline, shards
from cleaq_jax.data import records as records_lib
from cleaq_jax.data.shards import iter_records
from cleaq_jax.data_prep import drive, eyeq, messidor
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
    split = shards.read_manifest(out)["splits"]["train"]
    # The label CSV is provenance under its own key; "labels" stays the class-label file of the shards.
    assert split["labels"] == "eyeq-train.labels.json" and split["source_labels"] == "Label_EyeQ_train.csv"
    grades = balance.split_labels(out, "train", "dr_grade")
    assert sorted(grades.tolist()) == sorted(g for g, _ in eyeq_data["good"].values())
    batch = next(pipeline.train_loader(out, "train", global_batch_size=2,
                                       sampling=pipeline.EpochSampling(seed=0, class_balance=0.5),
                                       reading=pipeline.RecordReading(process_index=0, process_count=1,
                                                                      read_threads=0)))
    assert batch["image"].shape == (2, 64, 64, 3)


def test_eyeq_manifest_records_the_command_that_rebuilds_the_split(eyeq_data, eyeq_run):
    out = str(eyeq_run[2])
    command = shards.read_manifest(out)["splits"]["train"]["prep_command"]
    assert command.startswith("python -m cleaq_jax.data_prep.eyeq --images ") and f"--out {out}" in command
    assert shards.rebuild_hint(out, "train") == f"rebuild it with `{command}`"


def test_progress_line_reports_count_rate_and_eta(eyeq_data, eyeq_run):
    err = eyeq_run[1]
    total = len(eyeq_data["good"]) + 4  # four faulty images are read; three label rows are rejected before
    assert f"{total}/{total}" in err and "img/s" in err and "<" in err


def test_strict_stops_at_a_bad_label_row_naming_it_and_writes_nothing(eyeq_data, tmp_path):
    code, err = run_main(eyeq.main, *eyeq_args(eyeq_data, tmp_path / "out", "--strict"))
    assert code == 2
    assert "Label_EyeQ_train.csv:11" in err and "not found" in err
    assert looks_complete(tmp_path / "out") == []


def test_strict_stops_at_a_truncated_image_naming_it_and_writes_nothing(eyeq_data, tmp_path):
    labels = write_csv(str(tmp_path / "labels.csv"), EYEQ_HEADER,
                       [[0, "10009_right.jpeg", 0, 0], [1, "10010_left.jpeg", 1, 1], [2, "20001_left.jpeg", 0, 1]])
    code, err = run_main(eyeq.main, "--images", eyeq_data["images"], "--labels", labels, "--split", "train",
                         "--out", str(tmp_path / "out"), "--strict")
    assert code == 2
    assert "20001_left.jpeg" in err and "truncated" in err
    assert os.listdir(tmp_path / "out") == []  # the writer's temporary shards are gone too


def test_malformed_csv_header_is_reported_naming_the_file_and_nothing_is_written(eyeq_data, tmp_path):
    labels = write_csv(str(tmp_path / "trainLabels.csv"), ["image", "level"], [["10009_right", 0]])
    code, err = run_main(eyeq.main, "--images", eyeq_data["images"], "--labels", labels, "--split", "train",
                         "--out", str(tmp_path / "out"))
    assert code == 2
    assert "trainLabels.csv" in err and ",image,quality,DR_grade" in err
    assert looks_complete(tmp_path / "out") == []


def test_a_split_whose_every_item_is_skipped_fails_and_writes_nothing(eyeq_data, tmp_path):
    labels = write_csv(str(tmp_path / "labels.csv"), EYEQ_HEADER, [[0, "20003_left.jpeg", 0, 1]])
    code, err = run_main(eyeq.main, "--images", eyeq_data["images"], "--labels", labels, "--split", "train",
                         "--out", str(tmp_path / "out"))
    assert code == 2 and "no retinal disc" in err
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
    proc = subprocess.run([sys.executable, "-m", "cleaq_jax.data_prep.eyeq", *eyeq_args(eyeq_data, tmp_path),
                           "--size", SIZE, "--workers", "1", "--num-shards", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(f for f in os.listdir(tmp_path) if ".array_record-" in f) == [
        "eyeq-train.array_record-00000-of-00002", "eyeq-train.array_record-00001-of-00002"]


def test_a_run_killed_midway_leaves_nothing_that_looks_complete(eyeq_data, tmp_path):
    # The last two images are FIFOs. Opening one for reading blocks until a writer opens it; the read then
    # fails at once (not seekable) and the run goes on to the next. The test opens the third image's writer
    # (which succeeds only once the run waits on it, after the first two images) and never the fourth's, so
    # from then on the run cannot finish: it is provably mid-way whenever the kill lands.
    fifos = [os.path.join(eyeq_data["images"], f"{n}_left.jpeg") for n in (99998, 99999)]
    for fifo in fifos:
        os.mkfifo(fifo)
    labels = write_csv(str(tmp_path / "labels.csv"), EYEQ_HEADER,
                       [[0, "10009_right.jpeg", 0, 0], [1, "10010_left.jpeg", 1, 1], [2, "99998_left.jpeg", 0, 0],
                        [3, "99999_left.jpeg", 0, 0]])
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "cleaq_jax.data_prep.eyeq", "--images", eyeq_data["images"], "--labels",
                             labels, "--split", "train", "--out", str(out), "--size", SIZE, "--workers", "1"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    writer = None
    try:
        deadline = time.monotonic() + 60
        while writer is None and time.monotonic() < deadline and proc.poll() is None:
            try:  # succeeds only once the run waits to read the third image
                writer = os.open(fifos[0], os.O_WRONLY | os.O_NONBLOCK)
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
        for fifo in fifos:
            os.remove(fifo)
    assert looks_complete(out) == []
    assert any(f.startswith(".tmp-eyeq-train-") for f in os.listdir(out))  # it had started writing
    with pytest.raises(FileNotFoundError):
        list(iter_records(str(out)))


# --------------------------------------------------------------------------- Messidor
# The fixture: bases 11 and 12 with 6 images each (grades k % 4) plus 4 faulty rows in base 12: 16 rows.
MESSIDOR_ROWS = 16


@pytest.fixture(scope="module")
def messidor_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("messidor")
    return {"root": str(root), **messidor_layout(str(root))}


@pytest.fixture(scope="module")
def messidor_run(messidor_data, tmp_path_factory):
    """The prep with the paper's defaults (1,000 / 200), which the 16 rows scale down to 13 / 3."""
    out = tmp_path_factory.mktemp("messidor_out")
    code, err = run_main(messidor.main, "--root", messidor_data["root"], "--out", str(out), "--qt-batch", "4")
    return code, err, out


def test_messidor_records_round_trip_grades_with_the_assigned_quality(messidor_data, messidor_run):
    code, _, out = messidor_run
    assert code == 0
    got = {**records(out, "train"), **records(out, "test")}
    assert {k: r["dr_grade"] for k, r in got.items()} == messidor_data["good"]
    assert {r["source"] for r in got.values()} == {"messidor"}
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    for split in ("train", "test"):
        assigned = manifest["splits"][split]["quality_of"]
        for k, r in records(out, split).items():
            assert r["quality"] == ("good", "usable", "reject").index(assigned[k])


def test_messidor_scales_the_default_split_to_a_small_set_and_says_so(messidor_run):
    _, err, out = messidor_run
    assert "annotate 16 images, fewer than --train 1000 + --test 200" in err and "13 / 3" in err
    protocol = json.load(open(os.path.join(out, "manifest.json")))["splits"]["test"]["protocol"]
    assert (protocol["train"], protocol["test"], protocol["scaled"]) == (13, 3, True)
    assert protocol["requested"] == {"train": 1000, "test": 200}


def test_messidor_splits_are_disjoint_and_hold_the_requested_counts(messidor_run):
    out = messidor_run[2]
    train, test = set(records(out, "train")), set(records(out, "test"))
    assert not train & test
    with open(os.path.join(out, "manifest.json")) as f:
        splits = json.load(f)["splits"]
    # Written and skipped rows together are the planned split sizes (the split ignores readability).
    assert splits["train"]["num_records"] + splits["train"]["skipped"] == 13 + 1  # + the unreadable spreadsheet
    assert splits["test"]["num_records"] + splits["test"]["skipped"] == 3


def test_messidor_keeps_the_clean_crop_as_reference_and_degrades_usable_and_reject(messidor_run):
    out = messidor_run[2]
    got = {**records(out, "train"), **records(out, "test")}
    assert {r["quality"] for r in got.values()} == {0, 1, 2}
    for r in got.values():
        assert r["reference"] is not None and not r["reference"][r["mask"] == 0].any()
        changed = np.abs(r["image"].astype(int) - r["reference"]).mean()
        assert (changed == 0) if r["quality"] == 0 else (changed > 0)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert all(e["with_reference"] == e["num_records"] for e in manifest["splits"].values())


def test_messidor_degradation_is_qt_with_the_fixed_key_of_each_image_id(messidor_run):
    import jax

    from cleaq_jax.data import degrade

    for r in [*records(messidor_run[2], "train").values(), *records(messidor_run[2], "test").values()]:
        if r["quality"] == 0:
            continue
        op = degrade.op1 if r["quality"] == 1 else degrade.op2
        key = messidor.qt_keys(0, [r["id"]])[0]
        alone = np.asarray(op(r["reference"].astype(np.float32) / 255, r["mask"].astype(np.float32), key,
                              messidor.QT_PARAMS))
        expected = np.round(np.clip(alone, 0, 1) * 255).astype(int)
        # One image alone vs in a vmapped batch: float32 round-off may move a value across a rounding edge.
        assert np.abs(expected - r["image"]).max() <= 1, r["id"]
        assert jax.random.key_data(key).tolist() == jax.random.key_data(
            jax.random.fold_in(jax.random.key(0), records_lib.id_hash(r["id"]))).tolist()


def test_messidor_records_do_not_depend_on_the_qt_batch_or_worker_count(messidor_data, messidor_run, tmp_path):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = messidor.main(["--root", messidor_data["root"], "--out", str(tmp_path), "--size", SIZE,
                              "--workers", "2", "--qt-batch", "3"])
    assert code == 0, err.getvalue()
    for split in ("train", "test"):
        one = list(iter_records(str(messidor_run[2]), split, decode_images=False))
        two = list(iter_records(str(tmp_path), split, decode_images=False))
        assert [r["id"] for r in one] == [r["id"] for r in two]
        for a, b in zip(one, two):
            pa, pb = (records_lib.decode_png(x["image"], color=True).astype(int) for x in (a, b))
            assert np.abs(pa - pb).max() <= 1 and a["reference"] == b["reference"]  # batch round-off only


def test_messidor_prints_the_counts_table_of_its_manifest(messidor_run):
    _, err, out = messidor_run
    table = shards.format_counts(shards.read_manifest(str(out)))
    assert table in err
    rows = {tuple(line.split()[:2]): [int(x) for x in line.split()[2:]] for line in table.splitlines()[1:]}
    assert rows[("train", "all")][-1] + rows[("test", "all")][-1] == len(messidor_run_records(out))
    assert {q for _, q in rows} == {"good", "usable", "reject", "all"}


def messidor_run_records(out):
    return {**records(out, "train"), **records(out, "test")}


def test_messidor_skips_and_names_bad_rows_and_spreadsheets(messidor_data, messidor_run):
    out = messidor_run[2]
    listed = skip_lines(out, "train") + skip_lines(out, "test")
    for key, reason in messidor_data["bad"].items():
        assert any((line[0] == key or line[1].endswith(key)) and reason in line[2] for line in listed), key


# Messidor's published grade counts (546, 153, 247, 254 of 1200).
MESSIDOR_GRADES = [0] * 546 + [1] * 153 + [2] * 247 + [3] * 254
MESSIDOR_NAMES = [f"img{i:04d}.tif" for i in range(1200)]


def test_stratified_split_is_1000_200_within_one_per_grade_and_fixed_by_the_seed():
    splits = messidor.assign_splits(MESSIDOR_NAMES, MESSIDOR_GRADES, 1000, 200, seed=0)
    assert splits.count("test") == 200 and splits.count("train") == 1000
    for g, n in zip(range(4), (546, 153, 247, 254)):
        in_test = sum(s == "test" and gr == g for s, gr in zip(splits, MESSIDOR_GRADES))
        assert abs(in_test - n / 6) <= 1
    assert messidor.assign_splits(MESSIDOR_NAMES, MESSIDOR_GRADES, 1000, 200, seed=0) == splits
    assert messidor.assign_splits(MESSIDOR_NAMES, MESSIDOR_GRADES, 1000, 200, seed=1) != splits


def test_quality_levels_are_thirds_within_one_in_every_split_and_grade():
    splits = messidor.assign_splits(MESSIDOR_NAMES, MESSIDOR_GRADES, 1000, 200, seed=0)
    quality = messidor.assign_quality(MESSIDOR_NAMES, MESSIDOR_GRADES, splits, seed=0)
    for split in ("train", "test"):
        in_split = [q for q, s in zip(quality, splits) if s == split]
        assert sorted(collections.Counter(in_split).values()) == sorted(
            [len(in_split) // 3 + (j < len(in_split) % 3) for j in range(3)])
        for g in range(4):
            cell = [q for q, s, gr in zip(quality, splits, MESSIDOR_GRADES) if s == split and gr == g]
            assert max(abs(cell.count(q) - len(cell) / 3) for q in range(3)) <= 1, (split, g)
    assert messidor.assign_quality(MESSIDOR_NAMES, MESSIDOR_GRADES, splits, seed=1) != quality


def test_fewer_requested_images_leave_the_rest_out_of_both_splits():
    splits = messidor.assign_splits(MESSIDOR_NAMES, MESSIDOR_GRADES, 500, 100, seed=0)
    assert (splits.count("train"), splits.count("test"), splits.count("")) == (500, 100, 600)
    assert messidor.split_counts(1200, 1000, 200) == (1000, 200, None)
    assert messidor.split_counts(600, 1000, 200)[:2] == (500, 100)


def test_apportion_gives_exact_counts_spread_evenly():
    for n in range(1, 60):
        for counts in ([n // 3 + (j < n % 3) for j in range(3)], [n - n // 6, n // 6], [n - 1, 1, 0]):
            labels = messidor.apportion(n, counts)
            assert [labels.count(j) for j in range(len(counts))] == counts
            for j, c in enumerate(counts):  # every prefix holds its share to within one
                assert all(abs(labels[:r].count(j) - r * c / n) < 1 for r in range(1, n + 1))


def seed_processing_last(root, image_id, train, test):
    """A seed that puts ``image_id`` in the split written second, after the first has records."""
    for seed in range(50):
        jobs = messidor.collect(root, train, test, seed)[0]
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
    seed = seed_processing_last(str(root), "200511_99999_0100_PP", 3, 3)
    code, err = run_main(messidor.main, "--root", str(root), "--out", str(tmp_path / "out"),
                         "--train", "3", "--test", "3", "--seed", str(seed), "--strict")
    assert code == 2 and "200511_99999_0100_PP.tif" in err
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
