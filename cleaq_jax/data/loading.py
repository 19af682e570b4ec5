"""How a loader samples and reads a split: `EpochSampling` and `RecordReading`, the settings a stage
hands to `pipeline`'s loaders (which name them too).

Plain frozen dataclasses that import nothing beyond the standard library, so a stage's description
(`training.stages.Stage`) can hold them on a machine without the data stack (grain, array_record, OpenCV).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class EpochSampling:
    """How a training epoch samples the split: its seed, class balance and augmentation.

    seed: int in [0, 2**32), the same on every process; it draws each epoch's copies and order and
    each copy's augmentation. class_balance: beta in [0, 1], the exponent of the per-class repeat
    factor r_c = (n_max / n_c) ** beta over ``balance_by`` ("dr_grade" or "quality"); examples with
    an unknown (-1) label appear once per epoch. augment: a random rotation about the centre and
    horizontal/vertical flips of every copy (`decode.augment_matrix`).
    """

    seed: int
    class_balance: float = 0.0
    balance_by: str = "dr_grade"
    augment: bool = True


@dataclasses.dataclass(frozen=True)
class RecordReading:
    """How this process reads and decodes a split's records.

    image_size: output side S (None: the records' size). process_index/process_count: which rows of
    each global batch this process reads (None: jax.process_index() / jax.process_count()).
    worker_count: grain worker processes (0 = decode in this process). read_threads: threads per
    process that prepare whole batches ahead (0 = prepare on demand). source: the split's records to
    read instead of its shard files, in the shards' order: a TFDS data source of the shard set,
    ``tfds.builder_from_directory(data_dir).as_data_source(split)`` (decoded records, or record bytes
    with ``deserialize_method=RAW_BYTES``); the batches are the same either way, and the manifest of
    ``data_dir`` still gives labels and sizes. Keep worker_count 0 with it.
    """

    image_size: int | None = None
    process_index: int | None = None
    process_count: int | None = None
    worker_count: int = 0
    read_threads: int = 1
    source: Sequence[Any] | None = None
