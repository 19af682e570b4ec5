"""Prepare EyeQ (EyePACS images with EyeQ quality labels) as ArrayRecord shards.

    python -m cleaq_jax.data_prep.eyeq --images EyePACS/train --labels Label_EyeQ_train.csv --split train --out data/eyeq
    python -m cleaq_jax.data_prep.eyeq --images EyePACS/test --labels Label_EyeQ_test.csv --split test --out data/eyeq

Label CSVs as published by EyeQ: columns ``,image,quality,DR_grade`` (an unnamed index first), image
like ``10009_left.jpeg``, quality 0 Good / 1 Usable / 2 Reject, DR_grade 0-4. Record id = image stem.
"""

from __future__ import annotations

import csv
import os
import re
import sys
from collections.abc import Sequence

from cleaq_jax import errors
from cleaq_jax.data_prep import common
from cleaq_jax.runtime import cli, console

SOURCE = "eyeq"
COLUMNS = ("image", "quality", "DR_grade")
QUALITY_RANGE = range(0, 3)
GRADE_RANGE = range(0, 5)


def _int_in(text: str, allowed: range, column: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{column} {text!r} is not an integer") from None
    if value not in allowed:
        raise ValueError(f"{column} {value} is out of range {allowed.start}-{allowed.stop - 1}")
    return value


def _header_problem(header: list[str]) -> str | None:
    missing = [c for c in COLUMNS if c not in header]
    if not missing:
        return None
    hint = (" (this is EyePACS' trainLabels.csv; EyeQ's Label_EyeQ_train.csv / Label_EyeQ_test.csv are needed)"
            if header[:2] == ["image", "level"] else "")
    return (f"header {','.join(header)!r} lacks column(s) {', '.join(missing)}: expected ',image,quality,DR_grade' "
            f"as in EyeQ's Label_EyeQ_train.csv{hint}")


def _find(image: str, image_dirs: Sequence[str]) -> str | None:
    for d in image_dirs:
        path = os.path.join(d, image)
        if os.path.exists(path) and not os.path.isdir(path):
            return path
    return None


def read_labels(path: str, image_dirs: Sequence[str], split: str) -> tuple[list[common.Job], list[common.Skip]]:
    """Parse one EyeQ label CSV into jobs (image found, labels valid) and skips (with the row and reason)."""
    jobs: list[common.Job] = []
    skips: list[common.Skip] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        return [], [common.Skip(split, "", path, f"cannot read the label file ({e})")]
    header = [c.strip() for c in rows[0]] if rows else []
    problem = _header_problem(header) if rows else "the label file is empty"
    if problem:
        return [], [common.Skip(split, "", path, problem)]
    col = {name: header.index(name) for name in COLUMNS}
    seen: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        image = row[col["image"]].strip() if len(row) > col["image"] else ""
        where = f"{path}:{line}"
        try:
            if len(row) < len(header):
                raise ValueError(f"row has {len(row)} fields, the header {len(header)}")
            quality = _int_in(row[col["quality"]], QUALITY_RANGE, "quality")
            grade = _int_in(row[col["DR_grade"]], GRADE_RANGE, "DR_grade")
            if not image:
                raise ValueError("empty image name")
            if image in seen:
                raise ValueError(f"duplicate of line {seen[image]}")
            seen[image] = line
            found = _find(image, image_dirs)
            if found is None:
                raise ValueError(f"image file {image} not found in {', '.join(image_dirs)}")
        except ValueError as e:
            skips.append(common.Skip(split, os.path.splitext(image)[0], where, str(e)))
            continue
        jobs.append(common.Job(split, os.path.splitext(image)[0], found, grade, quality))
    return jobs, skips


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: parse ``argv`` (default sys.argv[1:]), prepare the split, return the exit code."""
    parser = cli.parser("python -m cleaq_jax.data_prep.eyeq", __doc__)
    parser.add_argument("--images", required=True, nargs="+", help="folder(s) holding the EyePACS .jpeg files")
    parser.add_argument("--labels", required=True, help="EyeQ label CSV, e.g. Label_EyeQ_train.csv")
    parser.add_argument("--split", required=True, help="split name to write, e.g. train or test")
    common.add_arguments(parser, num_shards=16)
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9_]+", args.split):
        parser.error(f"--split {args.split!r}: use letters, digits and underscores only (it names the shards)")
    for d in args.images:
        if not os.path.isdir(d):
            parser.error(f"--images {d}: no such folder (it should hold the EyePACS images, e.g. 10009_left.jpeg)")
    if not os.path.isfile(args.labels):
        parser.error(f"--labels {args.labels}: no such file (EyeQ publishes Label_EyeQ_train.csv and "
                     "Label_EyeQ_test.csv)")
    console.setup(args.verbose)

    def prepare() -> int:
        jobs, skips = read_labels(args.labels, args.images, args.split)
        return common.run(args, SOURCE, jobs, skips, provenance=common.Provenance(
            command=common.command_line("cleaq_jax.data_prep.eyeq", argv),
            extra={"source_labels": os.path.basename(args.labels)}))

    return errors.reported(prepare, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
