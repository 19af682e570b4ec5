"""The record schema: ShardWriter -> shards + manifest -> iter_records / decode_record."""

import os

import msgpack
import numpy as np
import pytest

from cleaq_jax.data import records
from cleaq_jax.data import shards


def _example(i: int, size: int = 32, *, vessel: bool = True, grade: int = 1, quality: int = 0) -> dict:
    rng = np.random.default_rng(i)
    return {
        "image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "mask": rng.integers(0, 2, (size, size), dtype=np.uint8),
        "vessel": rng.integers(0, 2, (size, size), dtype=np.uint8) if vessel else None,
        "dr_grade": grade,
        "quality": quality,
        "id": f"img_{i:03d}",
        "source": "test",
    }


def test_every_field_survives_a_round_trip_through_shards(tmp_path):
    examples = [_example(i, grade=i % 5, quality=i % 3) for i in range(5)]
    with shards.ShardWriter(str(tmp_path), "t", "train", num_shards=2) as writer:
        for example in examples:
            writer.write(example)
    back = {r["id"]: r for r in shards.iter_records(str(tmp_path), "train")}
    assert sorted(back) == [e["id"] for e in examples]
    for example in examples:
        got = back[example["id"]]
        np.testing.assert_array_equal(got["image"], example["image"])  # RGB order preserved
        np.testing.assert_array_equal(got["mask"], example["mask"])
        np.testing.assert_array_equal(got["vessel"], example["vessel"])
        assert (got["dr_grade"], got["quality"], got["source"]) == (example["dr_grade"], example["quality"], "test")


def test_missing_vessel_mask_reads_back_as_none(tmp_path):
    with shards.ShardWriter(str(tmp_path), "t", "train", num_shards=1) as writer:
        writer.write(_example(0, vessel=False))
    (got,) = shards.iter_records(str(tmp_path), "train")
    assert got["vessel"] is None
    assert records.decode_record(records.encode_record(_example(0, vessel=False)), decode_images=False)["vessel"] == b""


def test_id_hash_is_a_pinned_31_bit_value():
    # Eval keys derive from this hash: a change would silently change every fixed eval degradation.
    # crc32("10009_left") & 0x7fffffff, unlike Python's hash() the same in every process and run.
    assert records.id_hash("10009_left") == 624001414
    assert records.id_hash("10009_right") != records.id_hash("10009_left")
    assert all(0 <= records.id_hash(f"x{i}") < 2**31 for i in range(1000))


def test_duplicate_id_is_an_error_and_leaves_no_shards(tmp_path):
    with pytest.raises(records.RecordError, match="duplicate id 'img_000'"):
        with shards.ShardWriter(str(tmp_path), "t", "train") as writer:
            writer.write(_example(0))
            writer.write(_example(0))
    assert os.listdir(tmp_path) == []


def test_an_interrupted_split_leaves_nothing_and_keeps_other_splits(tmp_path):
    with shards.ShardWriter(str(tmp_path), "t", "test", num_shards=1) as writer:
        writer.write(_example(0))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(RuntimeError):
        with shards.ShardWriter(str(tmp_path), "t", "train", num_shards=3) as writer:
            writer.write(_example(1))
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == before  # no shard, no temp dir, manifest unchanged
    assert list(shards.read_manifest(str(tmp_path))["splits"]) == ["test"]


def test_manifest_counts_grades_by_quality_and_lists_shards(tmp_path):
    labels = [(0, 0), (0, 0), (2, 0), (1, 1), (-1, 2), (3, -1)]  # (grade, quality)
    with shards.ShardWriter(str(tmp_path), "t", "train", num_shards=4) as writer:
        for i, (grade, quality) in enumerate(labels):
            writer.write(_example(i, size=16, vessel=i % 2 == 0, grade=grade, quality=quality))
    entry = shards.read_manifest(str(tmp_path))["splits"]["train"]
    assert entry["counts"] == {
        "good": {"0": 2, "2": 1, "all": 3}, "usable": {"1": 1, "all": 1},
        "reject": {"unknown": 1, "all": 1}, "unknown": {"3": 1, "all": 1}}
    assert (entry["num_records"], sum(entry["records_per_shard"]), entry["with_vessel_mask"]) == (6, 6, 3)
    assert entry["image_size"] == [16, 16]
    assert [os.path.basename(p) for p in shards.split_shards(str(tmp_path), "train")] == [
        f"t-train.array_record-{i:05d}-of-00004" for i in range(4)]


def test_record_of_another_schema_version_is_rejected_with_a_rebuild_hint():
    payload = msgpack.unpackb(records.encode_record(_example(0)), raw=False)
    payload["schema"] = records.SCHEMA_VERSION + 1
    with pytest.raises(records.RecordError, match="rebuild the shards"):
        records.decode_record(msgpack.packb(payload, use_bin_type=True))


def test_bytes_that_are_not_a_record_are_rejected():
    with pytest.raises(records.RecordError, match="not a cleaq_jax record"):
        records.decode_record(b"\xc1 definitely not msgpack")


# --------------------------------------------------------------------------- the optional reference
def test_a_reference_round_trips_and_is_counted_in_the_manifest(tmp_path):
    examples = [_example(i) for i in range(3)]
    examples[0]["reference"] = np.random.default_rng(9).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    examples[2]["reference"] = examples[2]["image"][..., ::-1].copy()
    with shards.ShardWriter(str(tmp_path), "t", "train", num_shards=2) as writer:
        for example in examples:
            writer.write(example)
    back = {r["id"]: r for r in shards.iter_records(str(tmp_path), "train")}
    np.testing.assert_array_equal(back["img_000"]["reference"], examples[0]["reference"])  # RGB order kept
    np.testing.assert_array_equal(back["img_002"]["reference"], examples[2]["reference"])
    assert back["img_001"]["reference"] is None
    assert shards.read_manifest(str(tmp_path))["splits"]["train"]["with_reference"] == 2


def test_a_record_without_reference_has_no_reference_field():
    # A record without a reference carries no reference key, and decodes with reference None.
    payload = msgpack.unpackb(records.encode_record(_example(0)), raw=False)
    assert "reference" not in payload
    assert records.decode_record(msgpack.packb(payload, use_bin_type=True))["reference"] is None


def test_a_reference_of_another_shape_is_rejected():
    example = {**_example(0), "reference": np.zeros((16, 32, 3), np.uint8)}
    with pytest.raises(records.RecordError, match="reference must have the image's shape"):
        records.encode_record(example)


# --------------------------------------------------------------------------- manifest keys
@pytest.mark.parametrize("key", ["labels", "counts", "shards"])
def test_extra_manifest_keys_may_not_shadow_the_writers_own(tmp_path, key):
    with pytest.raises(ValueError, match=f"{key}.*source_{key}"):
        shards.ShardWriter(str(tmp_path), "t", "train", extra_manifest={key: "Label_EyeQ_train.csv"})
    writer = shards.ShardWriter(str(tmp_path), "t", "train")
    writer.write(_example(0))
    writer.extra[key] = "late"  # provenance added after construction is checked as well
    with pytest.raises(ValueError, match=key):
        writer.close()
    assert os.listdir(tmp_path) == []  # no manifest, no shard, no temporary directory


def test_a_missing_labels_file_is_named_with_the_fix(tmp_path):
    with shards.ShardWriter(str(tmp_path), "t", "train", num_shards=1) as writer:
        writer.write(_example(0))
    os.remove(os.path.join(tmp_path, shards.labels_name("t", "train")))
    with pytest.raises(FileNotFoundError, match="t-train.labels.json is missing.*copy it with the shards"):
        shards.split_labels(str(tmp_path), "train")


def test_format_counts_prints_split_by_quality_rows_and_grade_columns():
    manifest = {"splits": {
        "test": {"counts": {"good": {"0": 2, "all": 2}, "reject": {"3": 1, "all": 1}}},
        "train": {"counts": {"good": {"0": 3, "1": 1, "all": 4}, "usable": {"1": 2, "all": 2},
                             "unknown": {"unknown": 1, "all": 1}}}}}
    lines = shards.format_counts(manifest).splitlines()
    assert lines[0].split() == ["split", "quality", "grade", "0", "grade", "1", "grade", "3", "grade", "?", "all"]
    rows = [line.split() for line in lines[1:]]
    assert rows == [
        ["train", "good", "3", "1", "0", "0", "4"], ["train", "usable", "0", "2", "0", "0", "2"],
        ["train", "unknown", "0", "0", "0", "1", "1"], ["train", "all", "3", "3", "0", "1", "7"],
        ["test", "good", "2", "0", "0", "0", "2"], ["test", "reject", "0", "0", "1", "0", "1"],
        ["test", "all", "2", "0", "1", "0", "3"]]


# --------------------------------------------------------------------------- damaged shards
def _two_shards(tmp_path, **extra) -> list[str]:
    with shards.ShardWriter(str(tmp_path), "t", "train", num_shards=2, extra_manifest=extra) as writer:
        for i in range(6):
            writer.write(_example(i))
    return shards.split_shards(str(tmp_path), "train")


def test_a_truncated_shard_is_named_by_iter_records_and_check_shards(tmp_path):
    shard = _two_shards(tmp_path, prep_command="python -m cleaq_jax.data_prep.drive --root DRIVE --out x")[1]
    with open(shard, "rb") as f:
        data = f.read()
    with open(shard, "wb") as f:
        f.write(data[: len(data) // 2])
    for read in (lambda: shards.check_shards(str(tmp_path), "train"),
                 lambda: list(shards.iter_records(str(tmp_path), "train"))):
        with pytest.raises(shards.ShardError) as error:
            read()
        assert shard in str(error.value) and "`python -m cleaq_jax.data_prep.drive --root DRIVE --out x`" in str(error.value)


def test_a_shard_with_fewer_records_than_listed_is_named(tmp_path):
    from array_record.python import array_record_module

    shard = _two_shards(tmp_path)[0]
    writer = array_record_module.ArrayRecordWriter(shard, shards.WRITER_OPTIONS)  # rewritten with one record
    writer.write(records.encode_record(_example(0)))
    writer.close()
    with pytest.raises(shards.ShardError, match="holds 1 records, the manifest lists 3"):
        shards.check_shards(str(tmp_path), "train")


def test_the_rebuild_hint_of_a_synthetic_set_is_its_generator_command(tmp_path):
    info = {"generator": {"name": "synthetic", "version": 2, "num": 6, "size": 32, "seed": 3,
                          "splits": {"train": 1.0}}}
    _two_shards(tmp_path, **info)
    assert shards.rebuild_hint(str(tmp_path), "train") == (
        f"rebuild it with `python -m cleaq_jax.data_prep.synthetic --out {tmp_path} --num 6 --size 32 --seed 3 "
        "--splits train=1.0 --overwrite`")
