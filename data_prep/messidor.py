"""Prepare Messidor as ArrayRecord shards with a deterministic stratified train/test split.

    python -m data_prep.messidor --root Messidor --out data/messidor

Reads every ``Annotation_Base*.xls`` under ``--root`` (sheet ``Feuil1``; columns ``Image name`` and
``Retinopathy grade`` 0-3) and finds each image (.tif) by name anywhere under ``--root``. Messidor has
no official split: rows are ordered by grade, then by a seeded random key, and every k-th goes to
"test" (k = 1/--test-fraction), so both splits keep the grade distribution and the split depends
only on the spreadsheets and --seed. Image quality is unknown (-1): the paper derives Messidor's
quality levels with its quality transform QT.
"""

from __future__ import annotations

import argparse
import fractions
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_prep import common

SOURCE = "messidor"
SHEET = "Feuil1"
NAME_COLUMN = "Image name"
GRADE_COLUMN = "Retinopathy grade"
GRADE_RANGE = range(0, 4)
IMAGE_EXTENSIONS = (".tif", ".tiff")


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


def assign_splits(names: Sequence[str], strata: Sequence[int], test_fraction: float, seed: int) -> list[str]:
    """'train'/'test' per item: order by (stratum, seeded random key), every k-th item to test.

    Exactly floor(n * test_fraction) items go to test, spread evenly over the strata.
    """
    by_name = sorted(range(len(names)), key=lambda i: names[i])
    key = np.empty(len(names))
    key[by_name] = np.random.default_rng(seed).random(len(names))
    order = sorted(range(len(names)), key=lambda i: (strata[i], key[i]))
    f = fractions.Fraction(test_fraction).limit_denominator(10_000)
    splits = ["train"] * len(names)
    for rank, i in enumerate(order):
        if (rank + 1) * f // 1 > rank * f // 1:
            splits[i] = "test"
    return splits


def collect(root: str, test_fraction: float, seed: int) -> tuple[list[common.Job], list[common.Skip]]:
    """Jobs and skips for every annotated Messidor image under root."""
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
    strata = []
    for _, cell, _ in rows:
        try:
            strata.append(parse_grade(cell))
        except ValueError:
            strata.append(-1)
    splits = assign_splits([r[0] for r in rows], strata, test_fraction, seed)
    # A spreadsheet that cannot be read has no rows to split: report it with the training split.
    skips = [common.Skip("train", "", p, problem) for p, problem in file_skips]
    jobs = []
    images, seen = index_images(root), {}
    for (name, cell, where), split in zip(rows, splits):
        stem = os.path.splitext(name)[0]
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
        jobs.append(common.Job(split, stem, paths[0], grade, -1))
    return jobs, skips


def _fraction(text: str) -> float:
    value = float(fractions.Fraction(text))
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: parse ``argv`` (default sys.argv[1:]), prepare train and test, return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m data_prep.messidor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="the Messidor folder (spreadsheets and images, any depth)")
    parser.add_argument("--test-fraction", type=_fraction, default=1 / 6,
                        help="share of images in the test split (default 1/6: 200 of 1200); '1/6' is accepted")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split's random order")
    common.add_arguments(parser, num_shards=4)
    args = parser.parse_args(argv)
    if not os.path.isdir(args.root):
        parser.error(f"--root {args.root}: no such folder (it should hold Annotation_Base*.xls and the .tif images)")
    try:
        jobs, skips = collect(args.root, args.test_fraction, args.seed)
    except common.PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    extra = {"split_rule": "stratified by grade, every k-th of a seeded order",
             "test_fraction": args.test_fraction, "seed": args.seed}
    return common.run(args, SOURCE, jobs, skips, extra_manifest=extra)


if __name__ == "__main__":
    sys.exit(main())
