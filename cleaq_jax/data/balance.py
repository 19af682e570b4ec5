"""The class-balanced epoch plan: which records a training epoch reads, how many copies of each, in which order.

Epoch ``e`` is a seeded permutation of the split in which every example of class ``c`` appears
``r_c = (n_max / n_c) ** class_balance`` times (paper IV-B: more augmented copies of rarer classes);
examples with an unknown (-1) label appear once. The class of an example is its ``dr_grade`` or its
``quality`` (``balance_by``), read from the split's labels file or counted from its manifest, so no
record is opened to plan an epoch.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np

from cleaq_jax.data import records
from cleaq_jax.data import shards

# The epoch plan's random stream of a seed; the loader's augmentation draws from another.
PLAN_STREAM = 0
_PLAN_CACHE_EPOCHS = 2


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
    rng = np.random.default_rng([seed, PLAN_STREAM, epoch])
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

    Reads the manifest's quality x grade table (`shards.count_table`), so no record is opened.
    """
    counts: dict[int, int] = {}
    for quality_name, row in shards.split_entry(data_dir, split)["counts"].items():
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

    From the split's labels file (`shards.split_labels`): no record is opened, so a host reads only
    its own records. Read-only, as the plan cache shares it between threads.
    """
    labels = np.asarray(shards.split_labels(data_dir, split)[balance_by], np.int32)
    labels.setflags(write=False)
    return labels


class PlanCache:
    """`epoch_plan` of (labels, seed, class_balance) by epoch, keeping the latest few; shared by the
    read threads, and pickled empty (for worker processes)."""

    def __init__(self, labels: np.ndarray, seed: int, class_balance: float):
        self._args = (labels, seed, class_balance)
        self._plans: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __reduce__(self):
        return (PlanCache, self._args)

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
