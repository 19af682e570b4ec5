"""The TFDS feature that decodes this project's records, named by every shard set's ``features.json``.

``tfds.builder_from_directory(SHARDS)`` imports this module (from the class name in ``features.json``,
see `tfds_metadata`) to read the records, which are msgpack maps (`records`), not the
``tf.train.Example`` protos TFDS's own features parse. Reading needs tensorflow-datasets; TensorFlow
is not imported. Supported: ``as_data_source(split)`` (decoded records, below) and
``as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)`` (record bytes,
for `records.decode_record` or the grain pipeline).

Not supported, and refused with `TFDataReadingError` (one line, naming what to use instead):
``builder.as_dataset`` (tf.data), whose reader parses every record as a ``tf.train.Example`` with the
specs `RecordFeatures.get_serialized_info` would give (the first thing ``as_dataset`` asks of the
features, so the refusal comes before TFDS's own parser fails on the records' unknown image sizes), and
custom ``decoders``. Making ``as_dataset`` work would take a second copy of the data as
``tf.train.Example`` records; the data source gives the same records without TensorFlow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from cleaq_jax import errors
from cleaq_jax.data import records, tfds_metadata


AS_DATASET_ERROR = (
    "cleaq_jax shards hold msgpack records, not tf.train.Example, so TFDS's tf.data reading (builder.as_dataset) "
    "cannot parse them: use builder.as_data_source(split) (decoded records, random access) or the grain loaders "
    "of cleaq_jax.data.pipeline (docs/data.md)")


class TFDataReadingError(errors.DataError, NotImplementedError):
    """TFDS was asked to read the records in a way they do not support (tf.data, TFDS decoders)."""


def as_tfds_example(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record dict of `records.decode_record` -> the fields of `tfds_metadata.FIELDS`.

    image HxWx3 uint8 RGB, mask HxW uint8 {0, 1}, vessel HxW uint8 {0, 1} (zeros when the record has
    none), has_vessel bool, reference HxWx3 uint8 (zeros when none), has_reference bool, dr_grade / quality int64 scalars, id / source str.
    """
    mask = np.asarray(record["mask"], np.uint8)
    vessel, reference = record.get("vessel"), record.get("reference")
    image = np.asarray(record["image"], np.uint8)
    return {
        "image": image,
        "mask": mask,
        "vessel": np.zeros_like(mask) if vessel is None else np.asarray(vessel, np.uint8),
        "has_vessel": np.bool_(vessel is not None),
        "reference": np.zeros_like(image) if reference is None else np.asarray(reference, np.uint8),
        "has_reference": np.bool_(reference is not None),
        "dr_grade": np.int64(record["dr_grade"]),
        "quality": np.int64(record["quality"]),
        "id": str(record["id"]),
        "source": str(record["source"]),
    }


class RecordFeatures(tfds.features.FeaturesDict):
    """FeaturesDict of `tfds_metadata.FIELDS` whose examples are cleaq_jax record bytes."""

    def __init__(self, feature_dict: Mapping[str, Any] | None = None, *, doc: Any = None):
        expected = {k: tfds.features.FeatureConnector.from_json(v) for k, v in tfds_metadata.FIELDS.items()}
        if feature_dict is not None and set(feature_dict) != set(expected):
            raise errors.DataError(
                f"features.json lists the fields {sorted(feature_dict)} but this cleaq_jax reads "
                f"{sorted(expected)}: rewrite the metadata with `python -m cleaq_jax.data_prep.tfds_metadata --shards DIR`")
        super().__init__(expected if feature_dict is None else feature_dict, doc=doc or tfds_metadata.RECORD_DOC)

    def deserialize_example_np(self, serialized_example, *, decoders=None) -> dict[str, Any]:
        """Record bytes -> the decoded fields (see `as_tfds_example`)."""
        if decoders is not None:
            raise TFDataReadingError(
                "cleaq_jax records take no TFDS decoders: read raw bytes with deserialize_method="
                "tfds.decode.DeserializeMethod.RAW_BYTES and decode them with cleaq_jax.data.records.decode_record")
        return as_tfds_example(records.decode_record(bytes(serialized_example)))

    def get_serialized_info(self):
        """The ``tf.train.Example`` specs that tf.data reading parses records with: refused (module doc)."""
        raise TFDataReadingError(AS_DATASET_ERROR)

    def deserialize_example(self, serialized_example, *, decoders=None):
        raise TFDataReadingError(AS_DATASET_ERROR)
