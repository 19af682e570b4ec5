"""ArrayRecord shard sets of records (`data.records`): naming, writing, the manifest, reading and checks.

Shards of a split are ``<name>-<split>.array_record-NNNNN-of-MMMMM`` in one directory, beside a
``manifest.json`` that lists every split's shards and counts by grade x quality (the paper's
Table I), and ``<name>-<split>.labels.json`` with every record's grade and quality in reading order
(so class-balanced loaders need not open the records), and TensorFlow Datasets' ``dataset_info.json``
and ``features.json`` (`tfds_metadata`), so the directory also opens with
``tfds.builder_from_directory``. A split is written under a temporary directory and moved into place
only when complete, so an interrupted run never leaves shards that look complete.

The manifest's per-split keys that `ShardWriter` writes (`MANIFEST_KEYS`) have one meaning each;
a writer refuses extra provenance keys that would shadow them. A shard that cannot be read
(truncated, corrupt) raises `ShardError` naming the file and the command that rebuilds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from array_record.python import array_record_module

from cleaq_jax import errors
from cleaq_jax.data import records, tfds_metadata
from cleaq_jax.runtime import storage

MANIFEST = "manifest.json"


# "group_size:1" keeps every record individually addressable for random access (grain).
WRITER_OPTIONS = "group_size:1"


# The per-split manifest entries ShardWriter owns; extra provenance keys must not reuse these names.
MANIFEST_KEYS = ("name", "shards", "labels", "num_records", "records_per_shard", "image_size",
                 "with_vessel_mask", "with_reference", "counts")


class ShardError(records.RecordError):
    """A shard file that cannot be read (truncated, corrupt, or not the size its manifest says)."""


class UnknownSplitError(errors.ConfigError, KeyError):
    """A split name (config.data.*_split, --split) that the shard set's manifest does not list."""


class ShardWriteError(ShardError):
    """Shards that could not be written whole (a full disk); none of them was put under its name."""


def shard_name(name: str, split: str, index: int, count: int) -> str:
    return f"{name}-{split}.array_record-{index:05d}-of-{count:05d}"


def labels_name(name: str, split: str) -> str:
    return f"{name}-{split}.labels.json"


def split_labels(data_dir: str, split: str) -> dict[str, list[int]]:
    """{'dr_grade': [...], 'quality': [...]} of a split's records in reading order (shard by shard),
    from the labels file its manifest entry names."""
    path = os.path.join(data_dir, split_entry(data_dir, split)["labels"])
    if not os.path.exists(path):
        raise errors.MissingError(
            f"{path} is missing: {os.path.join(data_dir, MANIFEST)} lists it beside the shards of split "
            f"{split!r}; copy it with the shards, or {rebuild_hint(data_dir, split)}")
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------- manifest
def read_manifest(data_dir: str) -> dict[str, Any]:
    storage.require_local(data_dir, "the shard directory")
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.exists(path):
        raise errors.MissingError(
            f"{path} does not exist: {data_dir} holds no complete shard set. Build one with "
            f"`python -m cleaq_jax.data_prep.synthetic --out {data_dir}` or the data_prep CLI for your dataset.")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise errors.DataError(f"{path} is not JSON ({e}): the shard set is damaged; rebuild it with the "
                                   "data_prep command that wrote it") from e


def write_json(path: str, obj: Any) -> None:
    """``obj`` as JSON (sorted keys, indent 2, a final newline) at ``path``, put there whole (`storage.atomic_file`)."""
    storage.atomic_file(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_manifest(data_dir: str, manifest: Mapping[str, Any]) -> None:
    """Write ``manifest.json`` and, first, the TFDS metadata derived from it (`tfds_metadata`), so the
    shard set also opens with ``tfds.builder_from_directory``; the manifest comes last, marking the set
    complete. Every shard the manifest lists must be in ``data_dir``."""
    sizes = {s: os.path.getsize(os.path.join(data_dir, s))
             for entry in manifest["splits"].values() for s in entry["shards"]}
    write_json(os.path.join(data_dir, tfds_metadata.FEATURES), tfds_metadata.features_json())
    write_json(os.path.join(data_dir, tfds_metadata.DATASET_INFO), tfds_metadata.dataset_info(manifest, sizes))
    write_json(os.path.join(data_dir, MANIFEST), manifest)


def count_table(grades: Iterable[int], qualities: Iterable[int]) -> dict[str, dict[str, int]]:
    """Counts by quality x grade, as in the paper's Table I: {quality_name: {grade: n, 'all': n}}."""
    table: dict[str, dict[str, int]] = {}
    for g, q in zip(grades, qualities):
        qname = records.QUALITY_NAMES[q] if 0 <= q < len(records.QUALITY_NAMES) else "unknown"
        row = table.setdefault(qname, {})
        key = str(g) if g >= 0 else "unknown"
        row[key] = row.get(key, 0) + 1
        row["all"] = row.get("all", 0) + 1
    return table


def format_counts(manifest: Mapping[str, Any]) -> str:
    """The manifest's counts as a text table, split x quality rows by grade columns (the paper's Table I)."""
    splits = manifest.get("splits", {})
    order = sorted(splits, key=lambda s: (("train", "val", "test").index(s) if s in ("train", "val", "test") else 3, s))
    grades = sorted({g for e in splits.values() for row in e.get("counts", {}).values() for g in row if g != "all"},
                    key=lambda g: (g == "unknown", int(g) if g != "unknown" else 0))
    columns = [f"grade {g}" if g != "unknown" else "grade ?" for g in grades] + ["all"]
    lines = [f"{'split':<8}{'quality':<9}" + "".join(f"{c:>9}" for c in columns)]
    for split in order:
        counts = splits[split].get("counts", {})
        qualities = [q for q in (*records.QUALITY_NAMES, "unknown") if q in counts]
        total = {g: sum(counts[q].get(g, 0) for q in qualities) for g in (*grades, "all")}
        for q, row in [(q, counts[q]) for q in qualities] + [("all", total)]:
            lines.append(f"{split:<8}{q:<9}" + "".join(f"{row.get(g, 0):>9}" for g in (*grades, "all")))
    return "\n".join(lines)


def split_entry(data_dir: str, split: str) -> dict[str, Any]:
    """A split's entry of manifest.json (`MANIFEST_KEYS` and provenance); KeyError naming the splits
    the manifest has when ``split`` is not one of them."""
    splits = read_manifest(data_dir).get("splits", {})
    if split not in splits:
        raise UnknownSplitError(
            f"split {split!r} is not in {os.path.join(data_dir, MANIFEST)} (it has: {sorted(splits)})")
    return splits[split]


def split_shards(data_dir: str, split: str) -> list[str]:
    """Absolute paths of a split's shards, in order, as listed by the manifest."""
    paths = [os.path.join(data_dir, s) for s in split_entry(data_dir, split)["shards"]]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise errors.MissingError(f"manifest lists shards that are missing: {missing[:3]}; rebuild {data_dir}")
    return paths


# --------------------------------------------------------------------------- writing
def _checked_extra(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(MANIFEST_KEYS))
    if clash:
        raise ValueError(
            f"extra manifest key(s) {', '.join(clash)} would overwrite the writer's own entries "
            f"({', '.join(MANIFEST_KEYS)}): give the provenance another name (e.g. 'source_{clash[0]}')")
    return extra


class ShardWriter:
    """Writes one split of a dataset as ArrayRecord shards, atomically.

    Records go round-robin into ``num_shards`` shards under a hidden temporary directory; `close()`
    renames them into ``out_dir`` as ``<name>-<split>.array_record-NNNNN-of-MMMMM`` (empty shards are
    dropped, so M is the number that hold records) and merges the split into ``manifest.json``.
    Leaving the context with an exception discards everything written. Use as::

        with ShardWriter(out, "eyeq", "train", num_shards=16) as w:
            for example in examples:
                w.write(example)
    """

    def __init__(self, out_dir: str, name: str, split: str, num_shards: int = 8,
                 extra_manifest: Mapping[str, Any] | None = None):
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        self.out_dir, self.name, self.split = out_dir, name, split
        self.extra = _checked_extra(extra_manifest)
        storage.require_local(out_dir, "the shard output directory")
        os.makedirs(out_dir, exist_ok=True)
        self._tmp = tempfile.mkdtemp(dir=out_dir, prefix=f".tmp-{name}-{split}-")
        self._writers = [
            array_record_module.ArrayRecordWriter(os.path.join(self._tmp, f"part-{i:05d}"), WRITER_OPTIONS)
            for i in range(num_shards)]
        self._counts = [0] * num_shards
        self._shard_labels: list[list[tuple[int, int]]] = [[] for _ in range(num_shards)]
        self._ids: set[str] = set()
        self._grades: list[int] = []
        self._qualities: list[int] = []
        self._has_vessel = 0
        self._has_reference = 0
        self._image_size: tuple[int, int] | None = None
        self._n = 0

    def write(self, example: Mapping[str, Any] | bytes) -> None:
        """Append one example (a dict in the schema, or bytes from `records.encode_record`)."""
        data = example if isinstance(example, bytes) else records.encode_record(example)
        meta = records.decode_record(data, decode_images=False)
        if meta["id"] in self._ids:
            raise records.RecordError(f"duplicate id {meta['id']!r} in {self.name}/{self.split}")
        self._ids.add(meta["id"])
        if self._image_size is None:
            self._image_size = records.decode_png(meta["image"], color=False).shape
        shard = self._n % len(self._writers)
        try:
            self._writers[shard].write(data)
        except Exception as e:
            self._failed(e)
        self._counts[shard] += 1
        self._shard_labels[shard].append((meta["dr_grade"], meta["quality"]))
        self._grades.append(meta["dr_grade"])
        self._qualities.append(meta["quality"])
        self._has_vessel += bool(meta["vessel"])
        self._has_reference += bool(meta.get("reference"))
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def close(self) -> list[str]:
        """Finish: move shards into place, update the manifest; returns the shard paths.

        ArrayRecord reports a failed write (a full disk) only when its writer closes: then nothing is
        moved into place, the temporary directory is removed, and `ShardWriteError` names the folder."""
        try:
            for w in self._writers:
                w.close()
        except Exception as e:  # ArrayRecord raises RuntimeError("write() failed: No space left on device; ...")
            self._failed(e)
        try:
            self.extra = _checked_extra(self.extra)  # callers may add provenance after construction
        except ValueError:
            self.abort()
            raise
        used = [i for i, c in enumerate(self._counts) if c > 0]
        if not used:
            self.abort()
            raise records.RecordError(f"no records were written for {self.name}/{self.split}")
        # Remove any older shards of this split first so a rewrite with fewer shards leaves no strays.
        prefix = f"{self.name}-{self.split}.array_record-"
        for old in os.listdir(self.out_dir):
            if old.startswith(prefix):
                os.remove(os.path.join(self.out_dir, old))
        names = []
        for j, i in enumerate(used):
            final = shard_name(self.name, self.split, j, len(used))
            storage.move_into_place(os.path.join(self._tmp, f"part-{i:05d}"), os.path.join(self.out_dir, final))
            names.append(final)
        ordered = [lab for i in used for lab in self._shard_labels[i]]
        labels = {"dr_grade": [g for g, _ in ordered], "quality": [q for _, q in ordered]}
        write_json(os.path.join(self.out_dir, labels_name(self.name, self.split)), labels)
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._update_manifest(names)
        return [os.path.join(self.out_dir, n) for n in names]

    def _failed(self, error: Exception) -> None:
        """Discard everything written and raise `ShardWriteError` for a write that failed."""
        self.abort()
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ShardWriteError(
            f"cannot write the {self.name}/{self.split} shards in {self.out_dir}: {reason}. No shard of it was put "
            "in place; free space there and run the same command again") from error

    def abort(self) -> None:
        for w in self._writers:
            with contextlib.suppress(Exception):
                w.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _update_manifest(self, names: list[str]) -> None:
        path = os.path.join(self.out_dir, MANIFEST)
        # Two prep runs finishing into one directory (train and test) must not drop each other's split.
        with open(os.path.join(self.out_dir, ".manifest.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._merge_manifest(path, names)

    def _merge_manifest(self, path: str, names: list[str]) -> None:
        manifest: dict[str, Any] = {"schema": records.SCHEMA_VERSION, "splits": {}}
        if os.path.exists(path):
            with open(path) as f:
                manifest = json.load(f)
        manifest["schema"] = records.SCHEMA_VERSION
        manifest.setdefault("splits", {})[self.split] = {
            "name": self.name,
            "shards": names,
            "labels": labels_name(self.name, self.split),
            "num_records": self._n,
            "records_per_shard": [c for c in self._counts if c > 0],
            "image_size": list(self._image_size or ()),
            "with_vessel_mask": self._has_vessel,
            "with_reference": self._has_reference,
            "counts": count_table(self._grades, self._qualities),
            **self.extra,
        }
        write_manifest(os.path.dirname(path), manifest)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------- reading
def _shard_files(path: str, split: str | None) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise errors.MissingError(f"{path} is neither a shard file nor a shard directory")
    if split is not None:
        return split_shards(path, split)
    if os.path.exists(os.path.join(path, MANIFEST)):
        manifest = read_manifest(path)
        return [os.path.join(path, s) for sp in sorted(manifest["splits"]) for s in manifest["splits"][sp]["shards"]]
    files = sorted(f for f in os.listdir(path) if ".array_record-" in f and not f.startswith("."))
    if not files:
        raise errors.MissingError(f"no ArrayRecord shards in {path}")
    return [os.path.join(path, f) for f in files]


def iter_records(path: str, split: str | None = None, *, decode_images: bool = True) -> Iterator[dict[str, Any]]:
    """Yield decoded records from a shard file, or from every shard of a directory (one split when
    ``split`` is given; all splits in manifest order otherwise). A shard that cannot be read raises
    `ShardError` naming it."""
    for shard in _shard_files(path, split):
        with open_shard(shard) as reader:
            for i in range(reader.num_records()):
                yield records.decode_record(read_records(reader, shard, [i])[0], decode_images=decode_images)


# --------------------------------------------------------------------------- damaged shards
def rebuild_hint(data_dir: str, split: str) -> str:
    """What rebuilds a split's shards, from its manifest entry: 'rebuild it with `<command>`'."""
    try:
        entry = read_manifest(data_dir)["splits"].get(split, {})
    except (OSError, ValueError):
        entry = {}
    if "vessel_masks" in entry:
        masks = entry["vessel_masks"]
        method = masks.get("method", "teacher")
        teacher = f" --teacher {masks['teacher']}" if masks.get("teacher") else ""
        return (f"delete it and rerun `python -m cleaq_jax.data_prep.pseudo_masks --shards {masks.get('input', '<input shards>')} "
                f"--out {data_dir} --method {method}{teacher}` (it redoes only the missing shards)")
    if "generator" in entry:
        g = entry["generator"]
        splits = ",".join(f"{k}={v}" for k, v in g.get("splits", {}).items())
        scale = f" --lesion-scale {g['lesion_scale']}" if "lesion_scale" in g else ""
        return (f"rebuild it with `python -m cleaq_jax.data_prep.synthetic --out {data_dir} --num {g.get('num')} "
                f"--size {g.get('size')} --seed {g.get('seed')} --splits {splits}{scale} --overwrite`")
    if "prep_command" in entry:
        return f"rebuild it with `{entry['prep_command']}`"
    return f"rebuild {data_dir} with the data_prep command that wrote it (docs/data.md)"


def shard_error(shard: str, problem: str) -> ShardError:
    """`ShardError` for a damaged shard file: its path, the problem and how to rebuild it."""
    data_dir = os.path.dirname(os.path.abspath(shard))
    split = _split_of(data_dir, os.path.basename(shard))
    hint = rebuild_hint(data_dir, split) if split else "rebuild its shard set with data_prep"
    return ShardError(f"{shard}: {problem}: the shard is truncated or corrupt; {hint}")


def _split_of(data_dir: str, shard: str) -> str | None:
    try:
        splits = read_manifest(data_dir).get("splits", {})
    except (OSError, ValueError):
        return None
    return next((name for name, entry in splits.items() if shard in entry.get("shards", ())), None)


@contextlib.contextmanager
def open_shard(shard: str):
    """An ArrayRecordReader of one shard file; `ShardError` naming it when it cannot be opened."""
    try:
        reader = array_record_module.ArrayRecordReader(shard)
    except RuntimeError as e:  # riegeli reports truncation and corruption as RuntimeError
        raise shard_error(shard, f"cannot open it ({e or 'unreadable'})") from e
    if not reader.ok():  # a file cut at a block boundary opens "successfully" with 0 records
        with contextlib.suppress(RuntimeError):
            reader.close()
        raise shard_error(shard, "it does not open as an ArrayRecord file")
    try:
        yield reader
    finally:
        with contextlib.suppress(RuntimeError):  # closing a reader that met corruption re-raises it
            reader.close()


def read_records(reader, shard: str, indices: list[int]) -> list[bytes]:
    """reader.read(indices) with a read failure reported as `ShardError` naming ``shard``."""
    try:
        return reader.read(indices)
    except RuntimeError as e:
        raise shard_error(shard, f"reading records {indices[0]}-{indices[-1]} failed ({e or 'unreadable'})") from e


def check_shards(data_dir: str, split: str) -> list[str]:
    """The split's shard paths (`split_shards`) after opening each one: a shard that does not open or
    holds another number of records than the manifest lists raises `ShardError` naming it.

    Opening reads each shard's footer and index only, so this costs milliseconds per shard.
    """
    paths = split_shards(data_dir, split)
    for path, expected in zip(paths, split_entry(data_dir, split)["records_per_shard"], strict=True):
        with open_shard(path) as reader:
            n = reader.num_records()
        if n != expected:
            raise shard_error(path, f"it holds {n} records, the manifest lists {expected}")
    return paths
