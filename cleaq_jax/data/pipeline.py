"""grain input pipelines over the ArrayRecord shards of one split.

Every batch is a dict of numpy arrays, the per-process part of a global batch, ready for
``jax.make_array_from_process_local_data``::

    image       uint8  (b, S, S, 3)  RGB
    mask        uint8  (b, S, S)     retinal mask, {0, 1}
    vessel      uint8  (b, S, S)     vessel mask, {0, 1}; zeros where none is known
    has_vessel  bool   (b,)
    reference   uint8  (b, S, S, 3)  the clean image the record's image was degraded from (RGB),
                                     augmented like the image; zeros where the record has none
    has_reference bool (b,)
    dr_grade    int32  (b,)          -1 unknown
    quality     int32  (b,)          0 good, 1 usable, 2 reject, -1 unknown
    id_hash     int32  (b,)          `records.id_hash` of the example id
    valid       bool   (b,)          False on the padding rows of a final eval batch

with ``b = global_batch_size // process_count``.

Training epochs are laid out in *global positions*: epoch ``e`` is a seeded permutation of the
split, in which every example appears ``r_c = (n_max / n_c) ** class_balance`` times (paper IV-B:
more augmented copies of rarer classes), truncated to a whole number of global batches. Global
batch ``k`` is positions ``[k G, (k + 1) G)``; process ``p`` reads positions ``p, p + P, ...`` of
it. Every copy is augmented with a generator seeded by ``(seed, epoch, position)``, so the global
batch at a step depends on neither the process count nor the worker count, and an iterator restored
from ``get_state()`` continues with byte-identical batches.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import grain
import jax
import numpy as np

from cleaq_jax.data import records

# Separate random streams for the epoch plan and the augmentation drawn from the same seed.
_PLAN_STREAM, _AUGMENT_STREAM = 0, 1
_PLAN_CACHE_EPOCHS = 2


# --------------------------------------------------------------------------- class balance
def class_totals(counts: Mapping[int, int], class_balance: float) -> dict[int, int]:
    """Copies of each class per epoch: ``round(n_c * (n_max / n_c) ** class_balance)``.

    counts: {class: n_c} over known classes (n_c > 0). class_balance 0 keeps n_c, 1 gives n_max.
    """
    if not counts:
        return {}
    n_max = max(counts.values())
    return {c: int(round(n * (n_max / n) ** class_balance)) for c, n in counts.items()}


def epoch_length(labels: np.ndarray, class_balance: float) -> int:
    """Number of example copies in one training epoch (before truncation to whole batches).

    labels: (N,) int class per example, negative = unknown (such examples appear once per epoch).
    """
    labels = np.asarray(labels)
    return sum(class_totals(_class_counts(labels), class_balance).values()) + int((labels < 0).sum())


def epoch_plan(labels: np.ndarray, *, seed: int, epoch: int, class_balance: float) -> np.ndarray:
    """Source indices of one training epoch, in order: class-balanced copies, then a permutation.

    labels: (N,) int class per example (negative = unknown, kept once). Class c gets
    ``class_totals`` copies in all: each member ``floor`` or ``ceil`` of r_c, the members that get
    the extra copy drawn without replacement from a generator seeded by (seed, epoch), so the epoch
    length is fixed while the fractional part of r_c is honoured on average.
    Returns int64 (epoch_length(labels, class_balance),).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, _PLAN_STREAM, epoch])
    copies = np.ones(len(labels), np.int64)
    if class_balance > 0:
        for c, total in class_totals(_class_counts(labels), class_balance).items():
            members = np.flatnonzero(labels == c)
            base, extra = divmod(total, len(members))
            copies[members] = base
            copies[rng.choice(members, extra, replace=False)] += 1
    return rng.permutation(np.repeat(np.arange(len(labels)), copies))


def _class_counts(labels: np.ndarray) -> dict[int, int]:
    classes, counts = np.unique(labels[labels >= 0], return_counts=True)
    return dict(zip(classes.tolist(), counts.tolist()))


def manifest_class_counts(data_dir: str, split: str, balance_by: str) -> tuple[dict[int, int], int]:
    """({class: count} of known labels, number of unknown labels) of a split, from manifest.json.

    Reads the manifest's quality x grade table (`records.count_table`), so no record is opened.
    """
    counts: dict[int, int] = {}
    for quality_name, row in _split_entry(data_dir, split)["counts"].items():
        for grade_key, n in row.items():
            if grade_key == "all":
                continue
            if balance_by == "quality":
                label = records.QUALITY_NAMES.index(quality_name) if quality_name in records.QUALITY_NAMES else -1
            else:
                label = int(grade_key) if grade_key != "unknown" else -1
            counts[label] = counts.get(label, 0) + n
    return {c: n for c, n in counts.items() if c >= 0}, counts.get(-1, 0)


def split_labels(data_dir: str, split: str, balance_by: str) -> np.ndarray:
    """(N,) int32 labels (``dr_grade`` or ``quality``) of a split's records, in source order.

    From the split's labels file (no record is opened, so a host reads only its own records); shard
    sets written before that file existed fall back to one pass over the records without decoding
    images, cached while the shards are unchanged.
    """
    listed = records.split_labels(data_dir, split)
    if listed is not None:
        labels = np.asarray(listed[balance_by], np.int32)
        labels.setflags(write=False)
        return labels
    paths = tuple(records.split_shards(data_dir, split))
    stamp = tuple((os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths)
    return _labels_of(paths, stamp, balance_by)


@functools.lru_cache(maxsize=8)
def _labels_of(paths: tuple[str, ...], stamp: tuple, balance_by: str) -> np.ndarray:
    del stamp  # part of the cache key only: a rewritten shard set is read again
    values = [r[balance_by] for p in paths for r in records.iter_records(p, decode_images=False)]
    labels = np.asarray(values, np.int32)
    labels.setflags(write=False)
    return labels


# --------------------------------------------------------------------------- decode + augment
def augment_matrix(rng: np.random.Generator, size: int) -> np.ndarray:
    """(2, 3) float64 affine map from output to input pixel coordinates of a ``size`` x ``size``
    image: rotation by an angle drawn from U(0, 2 pi) about the centre, then horizontal and vertical
    flips each with probability 1/2 (flips folded into the matrix, so one resampling does all)."""
    angle = rng.uniform(0.0, 2.0 * math.pi)
    flip_x, flip_y = rng.random(2) < 0.5
    sx, sy = (-1.0 if flip_x else 1.0), (-1.0 if flip_y else 1.0)
    c, s = math.cos(angle), math.sin(angle)
    a, b, d, e = c * sx, -s * sy, s * sx, c * sy  # rotation @ diag(sx, sy)
    m = (size - 1) / 2.0  # pixel-centre convention: flips map pixels onto pixels
    # Plain floats: the same matrix from small numpy ops cost ~0.3 ms per example.
    return np.array([[a, b, m - a * m - b * m], [d, e, m - d * m - e * m]])


def decode_example(record: bytes | Mapping[str, Any], *, image_size: int, rng: np.random.Generator | None = None
                   ) -> dict[str, np.ndarray]:
    """One record -> one example in the batch layout of this module (without the batch axis).

    record: bytes in the `records` schema, or that record decoded by a TFDS data source
    (`tfds_features.as_tfds_example`: the same example comes out of either); image_size: output
    side S (resized with INTER_AREA when the record differs); rng: augmentation generator, or None
    for no augmentation. Image and retinal mask are warped together as one 4-channel image, the
    vessel mask and the reference with the same matrix, so all stay aligned; masks are thresholded
    back to {0, 1} after the warp.
    """
    payload, bgr, mask, vessel, reference = _decoded(record)
    bgr, mask = _resized(bgr, image_size), _resized(mask, image_size)
    vessel = _resized(vessel, image_size) if vessel is not None else None
    reference = _resized(reference, image_size) if reference is not None else None
    if rng is None:
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        reference = cv2.cvtColor(reference, cv2.COLOR_BGR2RGB) if reference is not None else None
    else:
        image, mask, vessel, reference = _augment(bgr, mask, vessel, reference, augment_matrix(rng, image_size))
    return {
        "image": image,
        "mask": _binary(mask),
        "vessel": _binary(vessel) if vessel is not None else np.zeros((image_size, image_size), np.uint8),
        "has_vessel": np.bool_(vessel is not None),
        "reference": reference if reference is not None else np.zeros((image_size, image_size, 3), np.uint8),
        "has_reference": np.bool_(reference is not None),
        "dr_grade": np.int32(payload["dr_grade"]),
        "quality": np.int32(payload["quality"]),
        "id_hash": np.int32(records.id_hash(payload["id"])),
        "valid": np.bool_(True),
    }


def _decoded(record: bytes | Mapping[str, Any]):
    """(labels, BGR image, 0/255 mask, 0/255 vessel mask or None, BGR reference or None) of record bytes
    or a TFDS-decoded record."""
    if isinstance(record, Mapping):
        # Masks back to 0/255, as their PNGs hold them, so resizing gives the bytes path's pixels.
        vessel = record["vessel"] * np.uint8(255) if record["has_vessel"] else None
        reference = cv2.cvtColor(record["reference"], cv2.COLOR_RGB2BGR) if record["has_reference"] else None
        return (record, cv2.cvtColor(record["image"], cv2.COLOR_RGB2BGR), record["mask"] * np.uint8(255), vessel,
                reference)
    payload = records.decode_record(record, decode_images=False)
    where = f"record {payload['id']!r}"
    vessel = _imdecode(payload["vessel"], cv2.IMREAD_GRAYSCALE, where) if payload["vessel"] else None
    reference = _imdecode(payload["reference"], cv2.IMREAD_COLOR, where) if payload.get("reference") else None
    return (payload, _imdecode(payload["image"], cv2.IMREAD_COLOR, where),
            _imdecode(payload["mask"], cv2.IMREAD_GRAYSCALE, where), vessel, reference)


def padding_example(image_size: int) -> dict[str, np.ndarray]:
    """The all-zero row (valid=False, labels -1) that fills the final eval batch."""
    zeros = np.zeros((image_size, image_size), np.uint8)
    return {"image": np.zeros((image_size, image_size, 3), np.uint8), "mask": zeros, "vessel": zeros,
            "has_vessel": np.bool_(False), "reference": np.zeros((image_size, image_size, 3), np.uint8),
            "has_reference": np.bool_(False), "dr_grade": np.int32(-1), "quality": np.int32(-1),
            "id_hash": np.int32(0), "valid": np.bool_(False)}


def _augment(bgr: np.ndarray, mask: np.ndarray, vessel: np.ndarray | None, reference: np.ndarray | None,
             matrix: np.ndarray):
    """(image RGB, mask, vessel or None, reference RGB or None), all warped by one matrix."""
    size = (bgr.shape[1], bgr.shape[0])
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP

    def warp(array: np.ndarray) -> np.ndarray:
        return cv2.warpAffine(array, matrix, size, flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)

    # 4 channels take OpenCV's vectorised path: image + mask in one warp costs less than the image alone.
    rgba = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGBA)
    rgba[..., 3] = mask
    warped = warp(rgba)
    vessel = warp(vessel) if vessel is not None else None
    if reference is not None:
        reference = cv2.cvtColor(warp(cv2.cvtColor(reference, cv2.COLOR_BGR2RGBA)), cv2.COLOR_RGBA2RGB)
    return cv2.cvtColor(warped, cv2.COLOR_RGBA2RGB), cv2.extractChannel(warped, 3), vessel, reference


def _imdecode(data: bytes, flag: int, where: str) -> np.ndarray:
    array = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if array is None:
        raise records.RecordError(f"undecodable image in {where}: rebuild the shards with data_prep")
    return array


def _resized(array: np.ndarray, size: int) -> np.ndarray:
    if array.shape[:2] == (size, size):
        return array
    shrink = array.shape[0] > size or array.shape[1] > size
    return cv2.resize(array, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _binary(array: np.ndarray) -> np.ndarray:
    return cv2.threshold(array, 127, 1, cv2.THRESH_BINARY)[1]


# --------------------------------------------------------------------------- grain datasets
class _PlanCache:
    """The latest few epoch plans, shared by the read threads; pickles empty (for worker processes)."""

    def __init__(self, labels: np.ndarray, seed: int, class_balance: float):
        self._args = (labels, seed, class_balance)
        self._plans: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __reduce__(self):
        return (_PlanCache, self._args)

    def __call__(self, epoch: int) -> np.ndarray:
        with self._lock:
            plan = self._plans.get(epoch)
            if plan is None:
                labels, seed, class_balance = self._args
                plan = epoch_plan(labels, seed=seed, epoch=epoch, class_balance=class_balance)
                # Reads move forward through epochs: the latest two are all that is ever needed.
                while len(self._plans) >= _PLAN_CACHE_EPOCHS:
                    self._plans.pop(min(self._plans))
                self._plans[epoch] = plan
            return plan


class _TrainEpochs(grain.MapDataset):
    """Global positions of consecutive training epochs -> {"record", "epoch", "position"}.

    Position ``i`` of epoch ``e`` reads source index ``epoch_plan(...)[i]``; each epoch keeps only
    its first ``per_epoch`` positions (a whole number of global batches).
    """

    def __init__(self, parent: grain.MapDataset, *, plans: _PlanCache, per_epoch: int, num_epochs: int | None):
        super().__init__(parent)
        self._plans, self._per_epoch, self._num_epochs = plans, per_epoch, num_epochs

    def __len__(self) -> int:
        return sys.maxsize if self._num_epochs is None else self._per_epoch * self._num_epochs

    def __str__(self) -> str:
        return f"TrainEpochs(per_epoch={self._per_epoch}, num_epochs={self._num_epochs})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(index, self._per_epoch)
        source_index = int(self._plans(epoch)[position])
        return {"record": self._parent[source_index], "epoch": epoch, "position": position}


class _EvalPositions(grain.MapDataset):
    """Positions 0..length-1 over a source, positions past its end -> an empty (padding) record."""

    def __init__(self, parent: grain.MapDataset, length: int):
        super().__init__(parent)
        self._length, self._num_records = length, len(parent)

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        return f"EvalPositions(length={self._length})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        record = self._parent[index] if index < self._num_records else b""
        return {"record": record, "epoch": 0, "position": index}


def _train_element(element: Mapping[str, Any], *, image_size: int, seed: int, augment: bool):
    rng = np.random.default_rng([seed, _AUGMENT_STREAM, element["epoch"], element["position"]]) if augment else None
    return decode_example(element["record"], image_size=image_size, rng=rng)


def _eval_element(element: Mapping[str, Any], *, image_size: int):
    if isinstance(element["record"], bytes) and not element["record"]:
        return padding_example(image_size)
    return decode_example(element["record"], image_size=image_size)


# --------------------------------------------------------------------------- public loaders
def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
    """global_batch_size // process_count; an error naming the config key when it does not divide."""
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of the process count "
            f"({process_count}): change config.batch_size (config.eval_batch_size for evaluation)")
    return global_batch_size // process_count


def num_batches_per_epoch(data_dir: str, split: str = "train", *, global_batch_size: int,
                          class_balance: float = 0.0, balance_by: str = "dr_grade", seed: int | None = None) -> int:
    """Training steps per epoch: floor(epoch_length / global_batch_size), from manifest.json alone.

    Matches the number of batches `train_loader` yields per epoch with the same arguments. Every
    epoch has the same length for every seed (class totals are fixed, only which members get the
    extra copy is drawn), so ``seed`` is accepted for symmetry with `train_loader` and not needed.
    """
    del seed
    counts, unknown = manifest_class_counts(data_dir, split, balance_by)
    length = sum(class_totals(counts, class_balance).values()) + unknown
    return length // global_batch_size


def num_eval_batches(data_dir: str, split: str, *, global_batch_size: int) -> int:
    """Batches `eval_loader` yields: ceil(num_records / global_batch_size)."""
    return -(-_split_entry(data_dir, split)["num_records"] // global_batch_size)


def train_loader(data_dir: str, split: str = "train", *, global_batch_size: int, seed: int,
                 num_epochs: int | None = None, class_balance: float = 0.0, balance_by: str = "dr_grade",
                 augment: bool = True, process_index: int | None = None, process_count: int | None = None,
                 worker_count: int = 0, image_size: int | None = None, read_threads: int = 1,
                 source: Sequence[Any] | None = None) -> LoaderIterator:
    """Shuffled, class-balanced, augmented training batches of this process (see module docstring).

    data_dir/split: a shard set written by `records.ShardWriter`. global_batch_size: G, a multiple
    of process_count (b = G // P rows per batch here). seed: int in [0, 2**32); the same on every
    process. num_epochs: None for endless. class_balance: beta in [0, 1], the exponent of the
    per-class repeat factor r_c = (n_max / n_c) ** beta over ``balance_by`` ("dr_grade" or
    "quality"); examples with an unknown (-1) label appear once per epoch. augment: random rotation
    about the centre and horizontal/vertical flips. process_index/process_count: default
    jax.process_index() / jax.process_count(). worker_count: grain worker processes (0 = decode in
    this process). image_size: output side S (default: the records' size). read_threads: threads
    per process that prepare whole batches ahead (0 = prepare on demand). source: the split's
    records to read instead of its shard files, in the shards' order: a TFDS data source of the
    shard set, ``tfds.builder_from_directory(data_dir).as_data_source(split)`` (decoded records, or
    record bytes with ``deserialize_method=RAW_BYTES``); the batches are the same either way, and
    the manifest of ``data_dir`` still gives labels and sizes. Keep worker_count 0 with it.

    Each epoch yields floor(epoch_length / G) batches (`num_batches_per_epoch`): the last
    epoch_length mod G copies of each epoch's permutation are dropped, a different set every epoch;
    when G divides the epoch length every copy is seen exactly once across processes.
    Returns a `LoaderIterator` (a grain DatasetIterator): ``get_state()`` / ``set_state()``, or
    ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore`` in an orbax checkpoint; the state
    restores into a loader with another worker_count or process count.
    """
    process_index, process_count = _process(process_index, process_count)
    batch = per_process_batch_size(global_batch_size, process_count)
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (endless) or >= 1, got {num_epochs}")
    size = _image_size(data_dir, split, image_size)
    source = _source(data_dir, split, source)
    labels = split_labels(data_dir, split, balance_by) if class_balance > 0 else np.zeros(len(source), np.int32)
    steps = epoch_length(labels, class_balance) // global_batch_size
    if steps == 0:
        raise ValueError(
            f"global_batch_size={global_batch_size} exceeds the {epoch_length(labels, class_balance)} "
            f"examples per epoch of split {split!r} in {data_dir}: lower config.batch_size")
    ds = _TrainEpochs(source, plans=_PlanCache(labels, seed, class_balance),
                      per_epoch=steps * global_batch_size, num_epochs=num_epochs)
    ds = ds[process_index::process_count]
    ds = ds.map(functools.partial(_train_element, image_size=size, seed=seed, augment=augment))
    settings = dict(split=split, num_records=len(source), global_batch_size=global_batch_size, seed=seed,
                    class_balance=class_balance, balance_by=balance_by, augment=augment, image_size=size)
    return LoaderIterator(ds.batch(batch, drop_remainder=True), settings, worker_count, read_threads)


def eval_loader(data_dir: str, split: str, *, global_batch_size: int, process_index: int | None = None,
                process_count: int | None = None, image_size: int | None = None, worker_count: int = 0,
                read_threads: int = 1, source: Sequence[Any] | None = None) -> LoaderIterator:
    """Every example of a split exactly once across processes, in record order, not augmented.

    Global batch k holds records [k G, (k + 1) G); process p gets rows p, p + P, ... of it. The
    final batch is filled with `padding_example` rows (valid=False), so all `num_eval_batches`
    batches have b = G // P rows on every process. Other arguments as in `train_loader`.
    """
    process_index, process_count = _process(process_index, process_count)
    batch = per_process_batch_size(global_batch_size, process_count)
    size = _image_size(data_dir, split, image_size)
    source = _source(data_dir, split, source)
    padded = -(-len(source) // global_batch_size) * global_batch_size
    ds = _EvalPositions(source, padded)[process_index::process_count]
    ds = ds.map(functools.partial(_eval_element, image_size=size))
    settings = dict(split=split, num_records=len(source), global_batch_size=global_batch_size, image_size=size)
    return LoaderIterator(ds.batch(batch, drop_remainder=True), settings, worker_count, read_threads)


class LoaderIterator(grain.DatasetIterator):
    """Iterator over the batches of a loader, with a state that is the same on every process.

    ``get_state()`` is {"next_batch": k, plus the settings that fix the batch sequence}: k is the
    number of global batches consumed, so a state restores into a loader with any worker_count or
    process count (grain's own mp_prefetch state is tied to its worker count). ``set_state`` rejects
    a state from a loader whose batches differ (another seed, split, batch size or balance).
    """

    def __init__(self, batches: grain.MapDataset, settings: Mapping[str, Any], worker_count: int,
                 read_threads: int):
        super().__init__()
        if read_threads < 0:
            raise ValueError(f"read_threads must be >= 0, got {read_threads}")
        self._batches, self._settings = batches, dict(settings)
        self._worker_count, self._read_threads = worker_count, read_threads
        self._next = 0
        self._inner: grain.DatasetIterator | None = None

    def _start(self) -> grain.DatasetIterator:
        batches = self._batches[self._next:] if self._next else self._batches
        # Elements here are whole batches: a small buffer bounds host memory at a few batches per thread.
        options = grain.ReadOptions(num_threads=self._read_threads, prefetch_buffer_size=2 * self._read_threads)
        iter_ds = batches.to_iter_dataset(options)
        if self._worker_count > 0:
            # Workers take whole batches in turn, so batches do not depend on worker_count.
            iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._worker_count,
                                                                       per_worker_buffer_size=2))
        return iter(iter_ds)

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        if self._inner is None:
            self._inner = self._start()
        batch = next(self._inner)
        self._next += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"next_batch": self._next, **self._settings}

    def set_state(self, state: Mapping[str, Any]) -> None:
        differ = {k: (state.get(k), v) for k, v in self._settings.items() if state.get(k) != v}
        if differ or not isinstance(state.get("next_batch"), int) or state["next_batch"] < 0:
            raise ValueError(
                f"data iterator state {dict(state)} does not fit this loader (saved vs now: {differ}): "
                f"restore with the same data settings, or start the data iterator afresh")
        self._stop()
        self._next = state["next_batch"]

    def start_prefetch(self) -> None:
        if self._inner is None:
            self._inner = self._start()

    def _stop(self) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None

    def close(self) -> None:
        self._stop()
        super().close()


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
    return process_index, process_count


def _split_entry(data_dir: str, split: str) -> dict[str, Any]:
    splits = records.read_manifest(data_dir).get("splits", {})
    if split not in splits:
        raise KeyError(f"split {split!r} is not in {os.path.join(data_dir, records.MANIFEST)} "
                       f"(it has: {sorted(splits)})")
    return splits[split]


class _CheckedShards(grain.MapDataset):
    """The records of a split's shards; a failed read raises `records.ShardError` naming the shard."""

    def __init__(self, paths: list[str], counts: list[int]):
        # "path[start:end]" tells grain each shard's size, so it does not open every shard again.
        super().__init__(grain.MapDataset.source(grain.sources.ArrayRecordDataSource(
            [f"{p}[0:{n}]" for p, n in zip(paths, counts)])))
        self._paths, self._ends = paths, np.cumsum(counts)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __str__(self) -> str:
        return f"CheckedShards({len(self._paths)} shards)"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        try:
            return self._parent[index]
        except RuntimeError as e:  # riegeli reports a damaged chunk as RuntimeError, naming no file
            shard = int(np.searchsorted(self._ends, index, side="right"))
            local = index - (int(self._ends[shard - 1]) if shard else 0)
            raise records.shard_error(self._paths[shard], f"reading its record {local} failed ({e or 'unreadable'})") from e


def _source(data_dir: str, split: str, records_in: Sequence[Any] | None = None) -> grain.MapDataset:
    """The split's records: its checked shards, or ``records_in`` (e.g. a TFDS data source of the
    whole split), checked against the manifest's count."""
    if records_in is not None:
        source = grain.MapDataset.source(records_in)
        expected = _split_entry(data_dir, split)["num_records"]
        if len(source) != expected:
            raise records.RecordError(
                f"{os.path.join(data_dir, records.MANIFEST)} lists {expected} records for split {split!r} "
                f"but the given source holds {len(source)}: pass the whole split (no TFDS slice)")
        return source
    paths = records.check_shards(data_dir, split)
    entry = _split_entry(data_dir, split)
    counts = entry.get("records_per_shard")
    if counts is None or len(counts) != len(paths):  # shard sets written before the per-shard counts
        counts = [_num_records(p) for p in paths]
    source = _CheckedShards(paths, list(counts))
    if len(source) != entry["num_records"]:
        raise records.RecordError(
            f"{os.path.join(data_dir, records.MANIFEST)} lists {entry['num_records']} records for split "
            f"{split!r} but its shards hold {len(source)}: {records.rebuild_hint(data_dir, split)}")
    return source


def _num_records(path: str) -> int:
    with records.open_shard(path) as reader:
        return reader.num_records()


def _image_size(data_dir: str, split: str, image_size: int | None) -> int:
    if image_size is not None:
        return int(image_size)
    shape = _split_entry(data_dir, split).get("image_size") or []
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(
            f"records of split {split!r} in {data_dir} are {shape or 'of unknown size'}, not square: "
            f"set image_size")
    return int(shape[0])
