"""The training and evaluation loaders: grain datasets that read a split's records and batch them per process.

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

Training epochs are laid out in *global positions*: epoch ``e`` is `balance.epoch_plan`, a seeded
permutation of the split in which every example appears ``r_c = (n_max / n_c) ** class_balance``
times (paper IV-B: more augmented copies of rarer classes), truncated to a whole number of global
batches. Global batch ``k`` is positions ``[k G, (k + 1) G)``; process ``p`` reads positions
``p, p + P, ...`` of it. Every copy is decoded and augmented by `decode.decode_example` with a
generator seeded by ``(seed, epoch, position)``, so the global batch at a step depends on neither
the process count nor the worker count, and an iterator restored from ``get_state()`` continues
with byte-identical batches.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from cleaq_jax import errors
from cleaq_jax.data import balance, decode, records
from cleaq_jax.data import shards
# The loader's settings live apart so that a stage's description needs no data stack; named here as before.
from cleaq_jax.data.loading import EpochSampling, RecordReading

# Each copy's augmentation draws from a random stream of the seed apart from the epoch plan's.
_AUGMENT_STREAM = balance.PLAN_STREAM + 1


# --------------------------------------------------------------------------- grain datasets
class _TrainEpochs(grain.MapDataset):
    """Global positions of consecutive training epochs -> {"record", "epoch", "position"}.

    Position ``i`` of epoch ``e`` reads source index ``balance.epoch_plan(...)[i]``; each epoch keeps only
    its first ``per_epoch`` positions (a whole number of global batches).
    """

    def __init__(self, parent: grain.MapDataset, *, plans: balance.PlanCache, per_epoch: int, num_epochs: int | None):
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
    return decode.decode_example(element["record"], image_size=image_size, rng=rng)


def _eval_element(element: Mapping[str, Any], *, image_size: int):
    if isinstance(element["record"], bytes) and not element["record"]:
        return decode.padding_example(image_size)
    return decode.decode_example(element["record"], image_size=image_size)


# --------------------------------------------------------------------------- public loaders
def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
    """global_batch_size // process_count; an error naming the config key when it does not divide."""
    if global_batch_size < 1 or global_batch_size % process_count:
        raise errors.ConfigError(
            f"global_batch_size={global_batch_size} must be a positive multiple of the process count "
            f"({process_count}): change config.batch_size (config.eval_batch_size for evaluation)")
    return global_batch_size // process_count


def num_batches_per_epoch(data_dir: str, split: str = "train", *, global_batch_size: int,
                          sampling: EpochSampling | None = None) -> int:
    """Training steps per epoch: floor(epoch_length / global_batch_size), from manifest.json alone.

    Matches the number of batches `train_loader` yields per epoch with the same arguments (sampling
    None: natural class frequencies). Every epoch has the same length for every seed (class totals
    are fixed, only which members get the extra copy is drawn), so the count does not use the seed.
    """
    sampling = sampling or EpochSampling(seed=0)
    counts, unknown = balance.manifest_class_counts(data_dir, split, sampling.balance_by)
    length = sum(balance.class_totals(counts, sampling.class_balance).values()) + unknown
    return length // global_batch_size


def num_eval_batches(data_dir: str, split: str, *, global_batch_size: int) -> int:
    """Batches `eval_loader` yields: ceil(num_records / global_batch_size)."""
    return -(-shards.split_entry(data_dir, split)["num_records"] // global_batch_size)


def train_loader(data_dir: str, split: str = "train", *, global_batch_size: int, sampling: EpochSampling,
                 num_epochs: int | None = None, reading: RecordReading = RecordReading()) -> LoaderIterator:
    """Shuffled, class-balanced, augmented training batches of this process (see module docstring).

    data_dir/split: a shard set written by `shards.ShardWriter`. global_batch_size: G, a multiple
    of the process count P (b = G // P rows per batch here). sampling: seed, class balance and
    augmentation (`EpochSampling`). num_epochs: None for endless. reading: image size, this
    process's place, workers, threads and an optional TFDS source (`RecordReading`).

    Each epoch yields floor(epoch_length / G) batches (`num_batches_per_epoch`): the last
    epoch_length mod G copies of each epoch's permutation are dropped, a different set every epoch;
    when G divides the epoch length every copy is seen exactly once across processes.
    Returns a `LoaderIterator` (a grain DatasetIterator): ``get_state()`` / ``set_state()``, or
    ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore`` in an orbax checkpoint; the state
    restores into a loader with another worker_count or process count.
    """
    process_index, process_count = _process(reading)
    batch = per_process_batch_size(global_batch_size, process_count)
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (endless) or >= 1, got {num_epochs}")
    size = _image_size(data_dir, split, reading.image_size)
    source = _source(data_dir, split, reading.source)
    beta = sampling.class_balance
    labels = balance.split_labels(data_dir, split, sampling.balance_by) if beta > 0 else np.zeros(len(source), np.int32)
    steps = balance.epoch_length(labels, beta) // global_batch_size
    if steps == 0:
        raise errors.ConfigError(
            f"global_batch_size={global_batch_size} exceeds the {balance.epoch_length(labels, beta)} "
            f"examples per epoch of split {split!r} in {data_dir}: lower config.batch_size")
    ds = _TrainEpochs(source, plans=balance.PlanCache(labels, sampling.seed, beta),
                      per_epoch=steps * global_batch_size, num_epochs=num_epochs)
    ds = ds[process_index::process_count]
    ds = ds.map(functools.partial(_train_element, image_size=size, seed=sampling.seed, augment=sampling.augment))
    settings = dict(split=split, num_records=len(source), global_batch_size=global_batch_size, seed=sampling.seed,
                    class_balance=beta, balance_by=sampling.balance_by, augment=sampling.augment, image_size=size)
    return LoaderIterator(ds.batch(batch, drop_remainder=True), settings, reading)


def eval_loader(data_dir: str, split: str, *, global_batch_size: int,
                reading: RecordReading = RecordReading()) -> LoaderIterator:
    """Every example of a split exactly once across processes, in record order, not augmented.

    Global batch k holds records [k G, (k + 1) G); process p gets rows p, p + P, ... of it. The
    final batch is filled with `decode.padding_example` rows (valid=False), so all `num_eval_batches`
    batches have b = G // P rows on every process. Arguments as in `train_loader`.
    """
    process_index, process_count = _process(reading)
    batch = per_process_batch_size(global_batch_size, process_count)
    size = _image_size(data_dir, split, reading.image_size)
    source = _source(data_dir, split, reading.source)
    padded = -(-len(source) // global_batch_size) * global_batch_size
    ds = _EvalPositions(source, padded)[process_index::process_count]
    ds = ds.map(functools.partial(_eval_element, image_size=size))
    settings = dict(split=split, num_records=len(source), global_batch_size=global_batch_size, image_size=size)
    return LoaderIterator(ds.batch(batch, drop_remainder=True), settings, reading)


class LoaderIterator(grain.DatasetIterator):
    """Iterator over the batches of a loader, with a state that is the same on every process.

    ``get_state()`` is {"next_batch": k, plus the settings that fix the batch sequence}: k is the
    number of global batches consumed, so a state restores into a loader with any worker_count or
    process count (grain's own mp_prefetch state is tied to its worker count). ``set_state`` rejects
    a state from a loader whose batches differ (another seed, split, batch size or balance).
    """

    def __init__(self, batches: grain.MapDataset, settings: Mapping[str, Any], reading: RecordReading):
        super().__init__()
        if reading.read_threads < 0:
            raise ValueError(f"read_threads must be >= 0, got {reading.read_threads}")
        self._batches, self._settings = batches, dict(settings)
        self._worker_count, self._read_threads = reading.worker_count, reading.read_threads
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
            raise errors.ConfigError(
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


def _process(reading: RecordReading) -> tuple[int, int]:
    process_index = jax.process_index() if reading.process_index is None else reading.process_index
    process_count = jax.process_count() if reading.process_count is None else reading.process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}")
    return process_index, process_count


class _CheckedShards(grain.MapDataset):
    """The records of a split's shards; a failed read raises `shards.ShardError` naming the shard."""

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
            raise shards.shard_error(self._paths[shard], f"reading its record {local} failed ({e or 'unreadable'})") from e


def _source(data_dir: str, split: str, records_in: Sequence[Any] | None = None) -> grain.MapDataset:
    """The split's records: its checked shards, or ``records_in`` (e.g. a TFDS data source of the
    whole split), checked against the manifest's count."""
    if records_in is not None:
        source = grain.MapDataset.source(records_in)
        expected = shards.split_entry(data_dir, split)["num_records"]
        if len(source) != expected:
            raise records.RecordError(
                f"{os.path.join(data_dir, shards.MANIFEST)} lists {expected} records for split {split!r} "
                f"but the given source holds {len(source)}: pass the whole split (no TFDS slice)")
        return source
    paths = shards.check_shards(data_dir, split)
    entry = shards.split_entry(data_dir, split)
    source = _CheckedShards(paths, list(entry["records_per_shard"]))
    if len(source) != entry["num_records"]:
        raise records.RecordError(
            f"{os.path.join(data_dir, shards.MANIFEST)} lists {entry['num_records']} records for split "
            f"{split!r} but its shards hold {len(source)}: {shards.rebuild_hint(data_dir, split)}")
    return source


def _image_size(data_dir: str, split: str, image_size: int | None) -> int:
    if image_size is not None:
        return int(image_size)
    shape = shards.split_entry(data_dir, split).get("image_size") or []
    if len(shape) != 2 or shape[0] != shape[1]:
        raise errors.ConfigError(
            f"records of split {split!r} in {data_dir} are {shape or 'of unknown size'}, not square: "
            f"set image_size")
    return int(shape[0])
