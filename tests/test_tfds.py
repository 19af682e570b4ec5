"""Shard sets open as TensorFlow Datasets: dataset_info.json / features.json beside the shards,
`tfds.builder_from_directory(...).as_data_source()` returning the records, and the grain pipeline fed
from that data source giving the batches it reads from the shard files."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from google.protobuf import json_format  # noqa: E402

from cleaq_jax import errors  # noqa: E402
from cleaq_jax.data import pipeline, records, tfds_features, tfds_metadata  # noqa: E402
from cleaq_jax.data import shards  # noqa: E402
from cleaq_jax.data_prep import pseudo_masks  # noqa: E402
from cleaq_jax.data.location import build_synthetic  # noqa: E402


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A synthetic shard set written by data_prep (train / val / test, 2 shards each, 32 px)."""
    out = str(tmp_path_factory.mktemp("tfds") / "synthetic")
    build_synthetic(out, num=14, size=32, seed=3, workers=1, num_shards=2)
    return out


def _example(i: int, *, vessel: bool) -> dict:
    rng = np.random.default_rng(i)
    return {"image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
            "mask": rng.integers(0, 2, (16, 16), dtype=np.uint8),
            "vessel": rng.integers(0, 2, (16, 16), dtype=np.uint8) if vessel else None,
            "dr_grade": i % 4, "quality": i % 3, "id": f"img_{i:02d}", "source": "test"}


def test_builder_lists_every_split_with_the_manifests_counts_and_shards(prepared):
    manifest = shards.read_manifest(prepared)
    info = tfds.builder_from_directory(prepared).info
    assert (info.name, str(info.version), info.file_format.value) == ("synthetic", "1.0.0", "array_record")
    assert sorted(info.splits) == sorted(manifest["splits"]) == ["test", "train", "val"]
    for split, entry in manifest["splits"].items():
        got = info.splits[split]
        assert got.num_examples == entry["num_records"]
        assert got.shard_lengths == entry["records_per_shard"]
        assert got.filenames == entry["shards"]  # the shards' own names are TFDS's default template
        assert got.num_bytes == sum(os.path.getsize(os.path.join(prepared, s)) for s in entry["shards"])
        # Table I's layout in the description: the split's total row ends with its record count.
        table = tfds_metadata.count_table_markdown(entry["counts"])
        assert "\n".join(table) in info.description and table[-1].endswith(f"| {entry['num_records']} |")
    assert "10.1109/JBHI.2022.3231276" in info.citation
    assert "cleaq_jax.data_prep.synthetic" in info.description


def test_data_source_returns_each_record_as_decode_record_does(prepared):
    sources = tfds.builder_from_directory(prepared).as_data_source()
    for split in ("train", "val", "test"):
        want = list(shards.iter_records(prepared, split))
        got = sources[split]
        assert len(got) == len(want)
        for i, record in enumerate(want):
            example = got[i]
            assert set(example) == set(tfds_metadata.FIELDS)
            np.testing.assert_array_equal(example["image"], record["image"])
            np.testing.assert_array_equal(example["mask"], record["mask"])
            np.testing.assert_array_equal(example["vessel"], record["vessel"])
            assert example["has_vessel"]
            assert (example["dr_grade"], example["quality"], example["id"], example["source"]) == (
                record["dr_grade"], record["quality"], record["id"], record["source"])
            assert example["image"].dtype == np.uint8 and example["dr_grade"].dtype == np.int64


def test_raw_bytes_data_source_yields_the_stored_record_bytes(prepared):
    raw = tfds.builder_from_directory(prepared).as_data_source(
        "test", deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    from array_record.python import array_record_module

    stored = []
    for shard in shards.split_shards(prepared, "test"):
        reader = array_record_module.ArrayRecordReader(shard)
        stored += reader.read(list(range(reader.num_records())))
        reader.close()
    assert [raw[i] for i in range(len(raw))] == stored


def test_record_without_vessel_mask_reads_as_zeros_with_has_vessel_false(tmp_path):
    with shards.ShardWriter(str(tmp_path), "t", "train", num_shards=1) as w:
        w.write(_example(0, vessel=False))
        w.write(_example(1, vessel=True))
    source = tfds.builder_from_directory(str(tmp_path)).as_data_source("train")
    assert not source[0]["has_vessel"] and not source[0]["vessel"].any()
    assert source[0]["vessel"].shape == (16, 16)
    assert source[1]["has_vessel"]
    np.testing.assert_array_equal(source[1]["vessel"], _example(1, vessel=True)["vessel"])


def test_splits_whose_shards_carry_another_name_open_too(tmp_path):
    with shards.ShardWriter(str(tmp_path), "alpha", "train", num_shards=2) as w:
        for i in range(3):
            w.write(_example(i, vessel=True))
    with shards.ShardWriter(str(tmp_path), "beta", "test", num_shards=1) as w:
        w.write(_example(9, vessel=True))
    builder = tfds.builder_from_directory(str(tmp_path))
    assert builder.info.name == "beta"  # the first split in sorted order names the dataset
    assert builder.info.splits["train"].filenames == shards.read_manifest(str(tmp_path))["splits"]["train"]["shards"]
    sources = builder.as_data_source()
    assert [sources["train"][i]["id"] for i in range(3)] == [r["id"] for r in shards.iter_records(str(tmp_path), "train")]
    assert sources["test"][0]["id"] == "img_09"


def test_features_json_is_what_the_feature_connector_writes(prepared):
    with open(os.path.join(prepared, tfds_metadata.FEATURES)) as f:
        written = json.load(f)
    assert written == json_format.MessageToDict(tfds_features.RecordFeatures().to_proto())
    restored = tfds.features.FeatureConnector.from_config(prepared)
    assert type(restored) is tfds_features.RecordFeatures
    assert json_format.MessageToDict(restored.to_proto()) == written


def test_the_dataset_description_offers_what_reads_and_warns_of_the_rest(prepared):
    description = tfds.builder_from_directory(prepared).info.description
    assert "as_data_source()" in description and "Not readable: `as_dataset`" in description


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                    reason="as_dataset needs TensorFlow, which the project does not install; without it TFDS stops "
                           "at its own `import tensorflow` before any record is read")
def test_as_dataset_stops_with_one_line_naming_what_reads_the_records(prepared):
    """TFDS's own tf.data path (builder.as_dataset, run as a user would, in a fresh interpreter) stops with
    the project's one-line error naming the data source and the grain loaders, not inside TFDS's parser;
    the same builder's data source reads the split."""
    code = ("import sys, tensorflow_datasets as tfds\n"
            "from cleaq_jax import errors\n"
            f"builder = tfds.builder_from_directory({prepared!r})\n"
            "print(len(builder.as_data_source('test')), builder.as_data_source('test')[0]['id'])\n"
            "sys.exit(errors.reported(lambda: builder.as_dataset(split='test')))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))})
    assert proc.returncode == 2, proc.stderr[-3000:]  # a traceback (status 1) is a bug's, not this error's
    first = next(shards.iter_records(prepared, "test"))
    assert proc.stdout.split() == [str(shards.split_entry(prepared, "test")["num_records"]), first["id"]]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0] == f"error: {tfds_features.AS_DATASET_ERROR}", proc.stderr[-3000:]
    assert "builder.as_data_source(split)" in lines[0] and "cleaq_jax.data.pipeline" in lines[0]
    assert "Traceback" not in proc.stderr and "Multiple unknown dimension" not in proc.stderr


def test_tfds_decoders_and_tf_parsing_are_refused_with_what_to_use(prepared):
    source = tfds.builder_from_directory(prepared).as_data_source(
        "test", decoders={"image": tfds.decode.SkipDecoding()})
    with pytest.raises(tfds_features.TFDataReadingError, match="RAW_BYTES"):
        source[0]
    features = tfds_features.RecordFeatures()
    for refused in (features.get_serialized_info, lambda: features.deserialize_example(b"")):
        with pytest.raises(tfds_features.TFDataReadingError, match="as_data_source") as caught:
            refused()
        # The project's error (one line from every program) and the NotImplementedError TFDS callers expect.
        assert isinstance(caught.value, errors.DataError) and isinstance(caught.value, NotImplementedError)


def test_reading_through_tfds_imports_no_tensorflow(prepared):
    code = ("import sys, tensorflow_datasets as tfds\n"
            f"s = tfds.builder_from_directory({prepared!r}).as_data_source('train')\n"
            "assert s[0]['image'].shape == (32, 32, 3)\n"
            "print(sorted(m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.')))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("raw", [False, True])
def test_pipeline_batches_from_the_tfds_source_equal_those_from_the_shards(prepared, raw):
    method = tfds.decode.DeserializeMethod.RAW_BYTES if raw else tfds.decode.DeserializeMethod.DESERIALIZE_AND_DECODE
    sources = tfds.builder_from_directory(prepared).as_data_source(deserialize_method=method)
    kw = dict(global_batch_size=2, sampling=pipeline.EpochSampling(seed=5, class_balance=0.5), num_epochs=1)
    reading = pipeline.RecordReading(image_size=24, process_index=0, process_count=1)
    want = list(pipeline.train_loader(prepared, "train", **kw, reading=reading))
    got = list(pipeline.train_loader(prepared, "train", **kw,
                                     reading=dataclasses.replace(reading, source=sources["train"])))
    one = pipeline.RecordReading(process_index=0, process_count=1)
    ev_want = list(pipeline.eval_loader(prepared, "test", global_batch_size=4, reading=one))
    ev_got = list(pipeline.eval_loader(prepared, "test", global_batch_size=4,
                                       reading=dataclasses.replace(one, source=sources["test"])))
    assert len(got) == len(want) > 0 and len(ev_got) == len(ev_want) > 0
    for a, b in zip(want + ev_want, got + ev_got):
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_pipeline_rejects_a_sliced_tfds_source_naming_the_split(prepared):
    part = tfds.builder_from_directory(prepared).as_data_source("train[:50%]")
    with pytest.raises(records.RecordError, match="'train'.*given source"):
        pipeline.eval_loader(prepared, "train", global_batch_size=2,
                             reading=pipeline.RecordReading(process_index=0, process_count=1, source=part))


def test_derived_shard_sets_carry_metadata_of_their_own_shards(prepared, tmp_path):
    out = str(tmp_path / "masked")
    ones = lambda payloads: [np.ones_like(records.decode_png(p["mask"], color=False)) for p in payloads]  # noqa: E731
    pseudo_masks.run_pass(prepared, out, ones, {"method": "ones"})
    info = tfds.builder_from_directory(out).info
    manifest = shards.read_manifest(out)
    for split, entry in manifest["splits"].items():
        assert info.splits[split].num_bytes == sum(os.path.getsize(os.path.join(out, s)) for s in entry["shards"])
    assert f"{manifest['splits']['train']['num_records']} with a vessel mask" in info.description
    assert tfds.builder_from_directory(out).as_data_source("val")[0]["vessel"].all()


def test_metadata_command_writes_what_an_older_shard_set_lacks(prepared, tmp_path):
    import shutil

    old = str(tmp_path / "old")
    shutil.copytree(prepared, old)
    for name in (tfds_metadata.DATASET_INFO, tfds_metadata.FEATURES):
        os.remove(os.path.join(old, name))
    proc = subprocess.run([sys.executable, "-m", "cleaq_jax.data_prep.tfds_metadata", "--shards", old], capture_output=True,
                          text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr
    for name in (tfds_metadata.DATASET_INFO, tfds_metadata.FEATURES):
        with open(os.path.join(old, name)) as a, open(os.path.join(prepared, name)) as b:
            assert json.load(a) == json.load(b)
    missing = str(tmp_path / "nothing")
    proc = subprocess.run([sys.executable, "-m", "cleaq_jax.data_prep.tfds_metadata", "--shards", missing], capture_output=True,
                          text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "manifest.json does not exist" in proc.stderr
