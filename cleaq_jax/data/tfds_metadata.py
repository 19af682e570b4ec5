"""TensorFlow Datasets metadata for a shard set: the ``dataset_info.json`` and ``features.json`` that
``tfds.builder_from_directory`` reads, derived from ``manifest.json`` alone.

`shards.write_manifest` writes both beside every manifest (no TensorFlow or TFDS needed to write),
so a shard directory opens as a TFDS dataset::

    import tensorflow_datasets as tfds
    builder = tfds.builder_from_directory("data/eyeq")       # splits, counts, citation, description
    train = builder.as_data_source("train")                  # random access, decoded records

The shards already follow TFDS's file naming (``<name>-<split>.array_record-NNNNN-of-MMMMM``). The
records are this project's msgpack schema (`records`), not ``tf.train.Example`` protos, so
``features.json`` names `cleaq_jax.data.tfds_features.RecordFeatures` as the top-level feature: TFDS
imports that module (cleaq_jax must be importable, tensorflow-datasets installed; TensorFlow is not
needed) and it decodes each record as `records.decode_record` does. ``tf.data`` reading
(``builder.as_dataset``) would parse ``tf.train.Example``: it stops with one line saying what to use
instead (`tfds_features.TFDataReadingError`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cleaq_jax import errors

DATASET_INFO = "dataset_info.json"
FEATURES = "features.json"
FILE_FORMAT = "array_record"
FEATURE_CLASS = "cleaq_jax.data.tfds_features.RecordFeatures"
# TFDS's default shard template; a split whose shards carry another name gets its own (see `_split_info`).
_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"


def _tensor(shape: list[int], dtype: str, desc: str, value_range: str = "") -> dict[str, Any]:
    kind = "scalar.Scalar" if not shape else "tensor_feature.Tensor"
    spec = {"pythonClassName": f"tensorflow_datasets.core.features.{kind}",
            "tensor": {"shape": {"dimensions": [str(d) for d in shape]} if shape else {}, "dtype": dtype,
                       "encoding": "none"},
            "description": desc}
    return {**spec, "valueRange": value_range} if value_range else spec


def _text(desc: str) -> dict[str, Any]:
    return {"pythonClassName": "tensorflow_datasets.core.features.text_feature.Text", "text": {},
            "description": desc}


# Each field as `RecordFeatures` returns it (the TFDS proto-JSON of its feature connector).
FIELDS: dict[str, dict[str, Any]] = {
    "image": {"pythonClassName": "tensorflow_datasets.core.features.image_feature.Image",
              "image": {"shape": {"dimensions": ["-1", "-1", "3"]}, "dtype": "uint8", "encodingFormat": "png"},
              "description": "RGB fundus photograph, disc-cropped and resized at prep (H x W x 3)"},
    "mask": _tensor([-1, -1], "uint8", "retinal (field-of-view) mask, 0 or 1 (H x W)"),
    "vessel": _tensor([-1, -1], "uint8", "vessel mask, 0 or 1 (H x W); all 0 where has_vessel is False"),
    "has_vessel": _tensor([], "bool", "whether the record carries a vessel mask"),
    "reference": {"pythonClassName": "tensorflow_datasets.core.features.image_feature.Image",
                  "image": {"shape": {"dimensions": ["-1", "-1", "3"]}, "dtype": "uint8", "encodingFormat": "png"},
                  "description": "clean reference image (before QT), all 0 where has_reference is False"},
    "has_reference": _tensor([], "bool", "whether the record carries a clean reference image"),
    "dr_grade": _tensor([], "int64", "DR grade (EyeQ 0-4, Messidor 0-3), -1 unknown", "-1..4"),
    "quality": _tensor([], "int64", "image quality: 0 good, 1 usable, 2 reject, -1 unknown", "-1..2"),
    "id": _text("example id (the source file's stem), unique within the dataset"),
    "source": _text("dataset the record comes from (eyeq, messidor, drive, synthetic, ...)"),
}


RECORD_DOC = "one cleaq_jax record (msgpack schema, see cleaq_jax/data/records.py)"


def features_json() -> dict[str, Any]:
    """The content of ``features.json``: a FeaturesDict of `FIELDS` decoded by `FEATURE_CLASS`."""
    return {"pythonClassName": FEATURE_CLASS, "description": RECORD_DOC, "featuresDict": {"features": FIELDS}}


def tfds_version(schema: int) -> str:
    """TFDS version of a shard set: the record schema as the major version."""
    return f"{int(schema)}.0.0"


def dataset_name(manifest: Mapping[str, Any]) -> str:
    """The dataset's TFDS name: the shard name of its first split (in sorted split order)."""
    splits = manifest.get("splits") or {}
    if not splits:
        raise errors.DataError("the manifest lists no splits: there is nothing to describe")
    return str(splits[sorted(splits)[0]]["name"])


def dataset_info(manifest: Mapping[str, Any], shard_bytes: Mapping[str, int]) -> dict[str, Any]:
    """The content of ``dataset_info.json`` (TFDS DatasetInfo proto as JSON) for a manifest.

    manifest: as `shards.read_manifest` returns it; shard_bytes: {shard file name: size in bytes}.
    Splits keep the manifest's shards in order with their record counts (``shardLengths``).
    """
    name = dataset_name(manifest)
    splits = manifest["splits"]
    sources = sorted({_source_of(entry) for entry in splits.values()})
    info: dict[str, Any] = {
        "name": name,
        "version": tfds_version(manifest["schema"]),
        "description": _description(name, manifest, sources),
        "citation": "\n\n".join([_PAPER_CITATION] + [c for c in (_SOURCES.get(s, {}).get("citation") for s in sources) if c]),
        "fileFormat": FILE_FORMAT,
        "moduleName": "cleaq_jax.data.tfds_metadata",
        "splits": [_split_info(name, split, splits[split], shard_bytes) for split in sorted(splits)],
    }
    # The paper last: TFDS shows the first URL as the homepage, the paper's for synthetic sets.
    urls = [u for u in (_SOURCES.get(s, {}).get("homepage") for s in sources) if u] + [_PAPER_URL]
    info["location"] = {"urls": urls}
    return info


def _split_info(name: str, split: str, entry: Mapping[str, Any], shard_bytes: Mapping[str, int]) -> dict[str, Any]:
    shards = list(entry["shards"])
    lengths = list(entry.get("records_per_shard") or [])
    if len(lengths) != len(shards) or sum(lengths) != entry["num_records"]:
        raise errors.DataError(f"split {split!r}: records_per_shard {lengths} does not match its {len(shards)} "
                               f"shard(s) and {entry['num_records']} records")
    info = {"name": split, "numBytes": str(sum(int(shard_bytes[s]) for s in shards)),
            "shardLengths": [str(n) for n in lengths]}
    if entry["name"] != name:  # the shard files of this split carry their own dataset name
        info["filepathTemplate"] = _TEMPLATE.replace("{DATASET}", str(entry["name"]))
    return info


def _source_of(entry: Mapping[str, Any]) -> str:
    if "generator" in entry:
        return "synthetic"
    return str(entry.get("source") or entry["name"])


def count_table_markdown(counts: Mapping[str, Mapping[str, int]]) -> list[str]:
    """Markdown lines of a manifest count table (quality x DR grade, the paper's Table I layout)."""
    grades = sorted({g for row in counts.values() for g in row if g not in ("all", "unknown")}, key=int)
    if any("unknown" in row for row in counts.values()):
        grades.append("unknown")
    qualities = [q for q in ("good", "usable", "reject", "unknown") if q in counts]
    lines = ["| quality | " + " | ".join(f"DR-{g}" if g != "unknown" else "grade ?" for g in grades) + " | all |",
             "|---" * (len(grades) + 2) + "|"]
    for q in qualities:
        row = counts[q]
        lines.append(f"| {q} | " + " | ".join(str(row.get(g, 0)) for g in grades) + f" | {row.get('all', 0)} |")
    totals = [sum(counts[q].get(g, 0) for q in qualities) for g in grades]
    lines.append("| total | " + " | ".join(map(str, totals)) + f" | {sum(counts[q].get('all', 0) for q in qualities)} |")
    return lines


def _description(name: str, manifest: Mapping[str, Any], sources: list[str]) -> str:
    splits = manifest["splits"]
    parts = [f"cleaq_jax shard set `{name}` (record schema {manifest['schema']}) for CLEAQ-DR: fundus "
             "photographs with DR grade, image quality (good / usable / reject), retinal mask and, where "
             "known, a vessel mask. Records are cleaq_jax's msgpack schema, decoded by "
             f"`{FEATURE_CLASS}`: read with `tfds.builder_from_directory(DIR).as_data_source()` "
             "(needs cleaq_jax and tensorflow-datasets, not TensorFlow), or "
             "`as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)` for the record "
             "bytes. Not readable: `as_dataset` (tf.data parses `tf.train.Example`; it stops with an error "
             "naming these), `DeserializeMethod.DESERIALIZE_NO_DECODE` and TFDS `decoders`."]
    for s in sources:
        parts.append(_SOURCES.get(s, {}).get("about", f"Source: {s}."))
    parts.append("Counts by quality x DR grade (the layout of the paper's Table I), from manifest.json:")
    for split in sorted(splits):
        entry = splits[split]
        vessels = entry.get("with_vessel_mask", 0)
        parts.append(f"{split}: {entry['num_records']} records in {len(entry['shards'])} shard(s), "
                     f"{vessels} with a vessel mask\n\n" + "\n".join(count_table_markdown(entry["counts"])))
    manual = [_SOURCES[s]["manual"] for s in sources if s in _SOURCES]
    if manual:
        parts.append("Manual download (these datasets cannot be fetched automatically):\n\n" + "\n\n".join(manual))
    return "\n\n".join(parts) + "\n"


_PAPER_URL = "https://doi.org/10.1109/JBHI.2022.3231276"
_PAPER_CITATION = """@article{hou2023cleaqdr,
  title   = {Image Quality Assessment Guided Collaborative Learning of Image Enhancement and Classification for Diabetic Retinopathy Grading},
  author  = {Hou, Qingshan and Cao, Peng and Jia, Liyu and Chen, Leqi and Yang, Jinzhu and Zaiane, Osmar R.},
  journal = {IEEE Journal of Biomedical and Health Informatics},
  year    = {2023},
  doi     = {10.1109/JBHI.2022.3231276}
}"""

_SOURCES: dict[str, dict[str, str]] = {
    "eyeq": {
        "homepage": "https://github.com/HzFu/EyeQ",
        "about": "EyeQ: quality labels (good / usable / reject) over EyePACS photographs with their DR "
                 "grades 0-4; 12,543 training and 16,249 test images (paper Table I).",
        "manual": "EyeQ: download the EyePACS `train` and `test` images of Kaggle's \"Diabetic "
                  "Retinopathy Detection\" competition (https://www.kaggle.com/c/diabetic-retinopathy-detection, "
                  "after accepting its rules) and `Label_EyeQ_train.csv` / `Label_EyeQ_test.csv` from the EyeQ "
                  "repository, then run `python -m cleaq_jax.data_prep.eyeq --images EyePACS/train --labels "
                  "EyeQ/Label_EyeQ_train.csv --split train --out DIR` and the same for `test` (docs/data.md).",
        "citation": """@inproceedings{fu2019eyeq,
  title     = {Evaluation of Retinal Image Quality Assessment Networks in Different Color-spaces},
  author    = {Fu, Huazhu and others},
  booktitle = {Medical Image Computing and Computer Assisted Intervention (MICCAI)},
  pages     = {48--56},
  year      = {2019}
}""",
    },
    "messidor": {
        "homepage": "https://www.adcis.net/en/third-party/messidor/",
        "about": "Messidor: 1,200 photographs from three ophthalmology departments with DR grades 0-3; "
                 "no quality labels (the paper makes three quality levels with its quality transform).",
        "manual": "Messidor: request the images and the `Annotation_BaseNN.xls` spreadsheets from the "
                  "Messidor distribution page (registration required), unpack them as they come, then run "
                  "`python -m cleaq_jax.data_prep.messidor --root Messidor --out DIR` (docs/data.md).",
        "citation": """@article{decenciere2014messidor,
  title   = {Feedback on a publicly distributed image database: the Messidor database},
  author  = {Decenci{\\`e}re, Etienne and others},
  journal = {Image Analysis \\& Stereology},
  volume  = {33},
  number  = {3},
  pages   = {231--234},
  year    = {2014}
}""",
    },
    "drive": {
        "homepage": "https://drive.grand-challenge.org/",
        "about": "DRIVE: 40 photographs with manual vessel segmentations and field-of-view masks (training "
                 "the CE-Net vessel teacher); grade and quality unknown.",
        "manual": "DRIVE: download `training/` and `test/` from the DRIVE challenge page (registration "
                  "required), then run `python -m cleaq_jax.data_prep.drive --root DRIVE --out DIR` (docs/data.md).",
        "citation": """@article{staal2004drive,
  title   = {Ridge-based vessel segmentation in color images of the retina},
  author  = {Staal, Joes and Abramoff, Michael D. and Niemeijer, Meindert and Viergever, Max A. and van Ginneken, Bram},
  journal = {IEEE Transactions on Medical Imaging},
  volume  = {23},
  number  = {4},
  pages   = {501--509},
  year    = {2004}
}""",
    },
    "synthetic": {
        "homepage": "",
        "about": "Synthetic: procedural fundus images with DR lesions, vessels and quality levels "
                 "(cleaq_jax/data/synthetic.py), ground truth for grade, quality and vessels.",
        "manual": "Synthetic: nothing to download; `python -m cleaq_jax.data_prep.synthetic --out DIR` rebuilds it.",
        "citation": "",
    },
}
