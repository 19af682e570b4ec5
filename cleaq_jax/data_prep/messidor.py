"""Prepare Messidor as ArrayRecord shards the way the paper does (IV-A, Table I).

    python -m cleaq_jax.data_prep.messidor --root Messidor --out data/messidor            # train 1000, test 200

Reads every ``Annotation_Base*.xls`` under ``--root`` (sheet ``Feuil1``; columns ``Image name`` and
``Retinopathy grade`` 0-3) and finds each image (.tif) by name anywhere under ``--root``. Then, from
the spreadsheets and ``--seed`` alone:

- split: rows ordered by grade, then by a seeded random key, are dealt to train / test (/ left out)
  evenly along that order (`apportion`), so both splits keep the grade distribution; 1,000 / 200 by
  default (``--train`` / ``--test``), scaled in proportion when fewer rows are annotated;
- quality: within each split, rows ordered by grade and another seeded key take good / usable /
  reject in turn, a third of each in every grade;
- images: usable ones go through the quality transform's op1, reject ones through op2
  (`cleaq_jax.data.degrade`, cofe-Net's parameters), each with a fixed key per image id, in batches of
  ``--qt-batch`` on the CPU; every record keeps the clean crop as its ``reference``.

The manifest records the protocol, each split's assignment (``quality_of``) and the counts by split x
quality x grade, which the run prints (docs/data.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import fractions
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from cleaq_jax import errors
from cleaq_jax.data import degrade, records
from cleaq_jax.data_prep import common
from cleaq_jax.runtime import cli, console

SOURCE = "messidor"
SHEET = "Feuil1"
NAME_COLUMN = "Image name"
GRADE_COLUMN = "Retinopathy grade"
GRADE_RANGE = range(0, 4)
IMAGE_EXTENSIONS = (".tif", ".tiff")
TRAIN, TEST = 1000, 200  # Table I
QT_PARAMS = degrade.QTParams()  # cofe-Net's degradation, as the paper's QT


def find_annotations(root: str) -> list[str]:
    """Sorted paths of every Annotation_Base*.xls under root."""
    found = []
    for d, _, files in os.walk(root):
        found += [os.path.join(d, f) for f in files if f.startswith("Annotation_Base") and f.lower().endswith(".xls")]
    return sorted(found, key=lambda p: (os.path.basename(p), p))


def index_images(root: str) -> dict[str, list[str]]:
    """Lower-cased file name -> every path under root with that name (Messidor .tif images)."""
    index: dict[str, list[str]] = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f.lower().endswith(IMAGE_EXTENSIONS):
                index.setdefault(f.lower(), []).append(os.path.join(d, f))
    return {k: sorted(v) for k, v in index.items()}


def read_annotation(path: str) -> tuple[list[tuple[str, Any, str]], str | None]:
    """Rows (image name, raw grade cell, 'file:row') of one spreadsheet, or a problem naming what is wrong."""
    import xlrd

    try:
        book = xlrd.open_workbook(path)
    except Exception as e:  # xlrd raises several types for corrupt or non-.xls files
        return [], f"cannot read the spreadsheet ({e})"
    sheet = book.sheet_by_name(SHEET) if SHEET in book.sheet_names() else book.sheet_by_index(0)
    header = [str(sheet.cell_value(0, c)).strip() for c in range(sheet.ncols)] if sheet.nrows else []
    missing = [c for c in (NAME_COLUMN, GRADE_COLUMN) if c not in header]
    if missing:
        return [], (f"sheet {sheet.name!r} lacks column(s) {', '.join(missing)} (header: {header}); expected "
                    f"Messidor's '{NAME_COLUMN}', 'Ophthalmologic department', '{GRADE_COLUMN}', "
                    "'Risk of macular edema '")
    name_col, grade_col = header.index(NAME_COLUMN), header.index(GRADE_COLUMN)
    rows = []
    for r in range(1, sheet.nrows):
        name = str(sheet.cell_value(r, name_col)).strip()
        if name:
            rows.append((name, sheet.cell_value(r, grade_col), f"{path}:{r + 1}"))
    return rows, None


def parse_grade(cell: Any) -> int:
    """A spreadsheet cell (float or text) -> grade 0-3; ValueError saying what is wrong otherwise."""
    try:
        value = float(cell)
    except (TypeError, ValueError):
        raise ValueError(f"retinopathy grade {cell!r} is not a number") from None
    if not value.is_integer() or int(value) not in GRADE_RANGE:
        raise ValueError(f"retinopathy grade {cell!r} is out of range 0-3")
    return int(value)


def apportion(n: int, counts: Sequence[int]) -> list[int]:
    """Labels 0..k-1 for positions 0..n-1 with exactly counts[j] of label j, each spread evenly.

    Position r takes the label furthest behind its share r * counts[j] / n (lowest label on ties), so
    every stretch of the order holds each label in proportion, to within one (a stratum ordered
    together gets its share of every label).
    """
    if sum(counts) != n or min(counts, default=0) < 0:
        raise ValueError(f"counts {list(counts)} must be non-negative and sum to {n}")
    given = [0] * len(counts)
    labels = []
    for r in range(1, n + 1):
        behind = [fractions.Fraction(r * c, n) - g for c, g in zip(counts, given)]
        j = max(range(len(counts)), key=lambda i: (behind[i], -i))
        given[j] += 1
        labels.append(j)
    return labels


def _stratified_order(names: Sequence[str], strata: Sequence[int], seed: int, stream: int) -> list[int]:
    """Indices ordered by (stratum, a random key drawn with (seed, stream) in name order)."""
    by_name = sorted(range(len(names)), key=lambda i: names[i])
    key = np.empty(len(names))
    key[by_name] = np.random.default_rng([seed, stream]).random(len(names))
    return sorted(range(len(names)), key=lambda i: (strata[i], key[i]))


def split_counts(n: int, train: int, test: int) -> tuple[int, int, str | None]:
    """(train, test, note): the requested counts, or scaled in proportion when fewer than train + test
    rows are annotated (the note says so)."""
    if train + test <= n:
        return train, test, None
    test_n = round(n * test / (train + test))
    note = (f"the spreadsheets annotate {n} images, fewer than --train {train} + --test {test}: the splits are "
            f"scaled in proportion to {n - test_n} / {test_n}")
    return n - test_n, test_n, note


def assign_splits(names: Sequence[str], strata: Sequence[int], train: int, test: int, seed: int) -> list[str]:
    """'train', 'test' or '' (left out) per row: rows ordered by (grade, seeded key), the labels spread
    evenly over that order (`apportion`), so every grade keeps its share in both splits."""
    order = _stratified_order(names, strata, seed, stream=0)
    labels = apportion(len(names), [train, test, len(names) - train - test])
    splits = [""] * len(names)
    for i, label in zip(order, labels):
        splits[i] = ("train", "test", "")[label]
    return splits


def assign_quality(names: Sequence[str], strata: Sequence[int], splits: Sequence[str], seed: int) -> list[int]:
    """Quality 0 good / 1 usable / 2 reject per row: within each split, rows ordered by (grade, seeded
    key) take the three levels in turn, a third of each (to within one) in every grade."""
    quality = [-1] * len(names)
    for split in sorted(set(splits) - {""}):
        rows = [i for i, s in enumerate(splits) if s == split]
        order = _stratified_order([names[i] for i in rows], [strata[i] for i in rows], seed, stream=1)
        n = len(rows)
        for k, label in zip(order, apportion(n, [n // 3 + (j < n % 3) for j in range(3)])):
            quality[rows[k]] = label
    return quality


@dataclasses.dataclass
class Plan:
    """The protocol's choices for one set of spreadsheets: split sizes and every row's split and quality."""

    train: int
    test: int
    note: str | None
    left_out: int
    quality_of: dict[str, dict[str, str]]  # split -> {image id: quality name}


def _read_rows(root: str) -> tuple[list[tuple[str, Any, str]], list[tuple[str, str]]]:
    annotations = find_annotations(root)
    if not annotations:
        raise common.PrepError(f"no Annotation_Base*.xls under {root}: point --root at the Messidor download "
                               "(one spreadsheet per base, Annotation_Base11.xls ... Annotation_Base34.xls)")
    rows, file_skips = [], []
    for path in annotations:
        got, problem = read_annotation(path)
        rows += got
        if problem:
            file_skips.append((path, problem))
    return rows, file_skips


def collect(root: str, train: int = TRAIN, test: int = TEST, seed: int = 0
            ) -> tuple[list[common.Job], list[common.Skip], Plan]:
    """Jobs (with split and quality), skips, and the plan for every annotated Messidor image under root.

    The split and quality levels depend only on the spreadsheets and ``seed``, not on which image
    files turn out readable.
    """
    rows, file_skips = _read_rows(root)
    strata = []
    for _, cell, _ in rows:
        try:
            strata.append(parse_grade(cell))
        except ValueError:
            strata.append(-1)
    names = [r[0] for r in rows]
    train, test, note = split_counts(len(rows), train, test)
    splits = assign_splits(names, strata, train, test, seed)
    quality = assign_quality(names, strata, splits, seed)
    # A spreadsheet that cannot be read has no rows to split: report it with the training split.
    skips = [common.Skip("train", "", p, problem) for p, problem in file_skips]
    jobs = []
    images, seen = index_images(root), {}
    for (name, cell, where), split, q in zip(rows, splits, quality):
        stem = os.path.splitext(name)[0]
        if not split:
            continue  # left out of both splits by the requested sizes
        try:
            grade = parse_grade(cell)
            if name.lower() in seen:
                raise ValueError(f"{name} is annotated twice (first at {seen[name.lower()]})")
            seen[name.lower()] = where
            paths = images.get(name.lower(), [])
            if len(paths) != 1:
                raise ValueError(f"image {name} not found under {root}" if not paths else
                                 f"{len(paths)} files named {name}: {', '.join(paths)}")
        except ValueError as e:
            skips.append(common.Skip(split, stem, where, str(e)))
            continue
        jobs.append(common.Job(split, stem, paths[0], grade, q))
    quality_of = {s: {os.path.splitext(n)[0]: records.QUALITY_NAMES[q] for n, sp, q in zip(names, splits, quality)
                      if sp == s} for s in ("train", "test")}
    return jobs, skips, Plan(train, test, note, splits.count(""), quality_of)


# --------------------------------------------------------------------------- the quality transform
# Messidor's quality level -> the label `degrade.quality_transform` takes: usable -> op1, reject -> op2,
# good -> unchanged (its "reject" branch).
_QT_LABEL = np.array([2, 1, 0], np.int32)


def qt_keys(seed: int, ids: Sequence[str]) -> jax.Array:
    """The fixed QT key of each image id: fold_in(jax.random.key(seed), records.id_hash(id))."""
    return degrade.eval_keys(jax.random.key(seed), [records.id_hash(i) for i in ids])


def degrade_batch(payloads: Sequence[dict[str, Any]], seed: int, batch: int) -> list[bytes]:
    """Records with usable images through QT op1 and reject images through op2 (fixed key per id), the
    clean image kept as ``reference`` (good images too, unchanged); padded to ``batch`` rows so one
    program serves every batch of an image size."""
    n = len(payloads)
    images = np.stack([p["image"] for p in payloads]).astype(np.float32) / 255
    masks = np.stack([p["mask"] for p in payloads]).astype(np.float32)
    labels = _QT_LABEL[[p["quality"] for p in payloads]]
    keys = qt_keys(seed, [p["id"] for p in payloads])
    if n < batch:
        pad = batch - n
        images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.float32)])
        masks = np.concatenate([masks, np.zeros((pad, *masks.shape[1:]), np.float32)])
        labels = np.concatenate([labels, np.full(pad, 2, np.int32)])
        keys = jax.numpy.concatenate([keys, qt_keys(seed, [""] * pad)])
    out = np.asarray(degrade.quality_transform_batch(images, masks, labels, keys, QT_PARAMS))[:n]
    degraded = np.round(np.clip(out, 0.0, 1.0) * 255).astype(np.uint8)
    return [records.encode_record({**p, "reference": p["image"],
                                   "image": p["image"] if p["quality"] == 0 else degraded[i]})
            for i, p in enumerate(payloads)]


def _finisher(seed: int, batch: int) -> common.Finisher:
    def finish(jobs: Sequence[common.Job], data: Sequence[bytes]) -> list[bytes]:
        del jobs  # the records carry id and quality
        return degrade_batch([records.decode_record(d) for d in data], seed, batch)

    return finish


def _protocol(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    return {
        "split": "rows ordered by (grade, seeded key); train / test / left out spread evenly over that order",
        "requested": {"train": args.train, "test": args.test}, "train": plan.train, "test": plan.test,
        "left_out": plan.left_out, "scaled": plan.note is not None, "seed": args.seed,
        "quality": "within each split, rows ordered by (grade, seeded key) take good / usable / reject in turn",
        "quality_transform": {"good": "none", "usable": "op1", "reject": "op2",
                              "key": "fold_in(jax.random.key(seed), id_hash(id))",
                              "params": dataclasses.asdict(QT_PARAMS)},
        "reference": "the clean disc-cropped image, at every quality level",
    }


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of images, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: parse ``argv`` (default sys.argv[1:]), prepare train and test, return the exit code."""
    parser = cli.parser("python -m cleaq_jax.data_prep.messidor", __doc__)
    parser.add_argument("--root", required=True, help="the Messidor folder (spreadsheets and images, any depth)")
    parser.add_argument("--train", type=_count, default=TRAIN, help=f"training images (default {TRAIN})")
    parser.add_argument("--test", type=_count, default=TEST, help=f"test images (default {TEST})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the quality levels and the QT keys")
    parser.add_argument("--qt-batch", type=_count, default=16, help="images per batched quality transform")
    common.add_arguments(parser, num_shards=4)
    args = parser.parse_args(argv)
    if not os.path.isdir(args.root):
        parser.error(f"--root {args.root}: no such folder (it should hold Annotation_Base*.xls and the .tif images)")
    jax.config.update("jax_platforms", "cpu")  # the quality transform of prep never needs an accelerator
    console.setup(args.verbose)
    return errors.reported(lambda: _prepare(args, argv), args.verbose)


def _prepare(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """Read the spreadsheets, plan the splits and write the shards; raises `common.PrepError`."""
    jobs, skips, plan = collect(args.root, args.train, args.test, args.seed)
    if plan.note:
        print(f"note: {plan.note}", file=sys.stderr)
    if plan.left_out:
        print(f"note: {plan.left_out} annotated image(s) left out of both splits (--train {args.train}, "
              f"--test {args.test})", file=sys.stderr)
    protocol = _protocol(args, plan)
    per_split = {s: {"quality_of": plan.quality_of[s]} for s in ("train", "test")}
    return common.run(args, SOURCE, jobs, skips,
                      encoding=common.Encoding(finish=_finisher(args.seed, args.qt_batch), finish_batch=args.qt_batch),
                      provenance=common.Provenance(command=common.command_line("cleaq_jax.data_prep.messidor", argv),
                                                   extra={"protocol": protocol}, per_split=per_split))


if __name__ == "__main__":
    sys.exit(main())
