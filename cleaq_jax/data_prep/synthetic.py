"""Write synthetic fundus shards (and pictures of them): the command line of
`cleaq_jax.data.location.build_synthetic`.

    python -m cleaq_jax.data_prep.synthetic --out DIR --num N --size S --seed K \\
        [--splits train=0.7,val=0.1,test=0.2] [--workers W] [--num-shards M]
    python -m cleaq_jax.data_prep.synthetic --grid PNG [--size S] [--seed K]
    python -m cleaq_jax.data_prep.synthetic --qt-examples PNG [--size S] [--seed K]

Examples (seed, index) are split by fractions in index order: the first train fraction of indices
is train, and so on, so a split never changes when another grows. Every shard and the manifest are
written in a hidden temporary directory and moved into DIR at the end, the manifest last: a DIR
with a manifest.json is complete. Grade and quality follow the generator's default priors
(`cleaq_jax.data.synthetic.GRADE_PRIORS`, `QUALITY_PRIORS`). Every record stores the clean image
before the quality transform as its ``reference`` (for good records it equals the image).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np

from cleaq_jax import errors
from cleaq_jax.data import location, synthetic
from cleaq_jax.runtime import cli, console, storage


# --------------------------------------------------------------------------- pictures
def _real_photo(size: int) -> np.ndarray:
    """skimage's real fundus photograph, resized to size x size, RGB uint8."""
    import cv2
    import skimage.data

    return cv2.resize(skimage.data.retina(), (size, size), interpolation=cv2.INTER_AREA)


def _label(image: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.45) -> None:
    import cv2

    cv2.putText(image, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (235, 235, 235), 1, cv2.LINE_AA)


def _write_png(path: str, image: np.ndarray, bits: int = 6) -> None:
    """RGB uint8 -> PNG at ``path``, put there whole (`storage.atomic_file`).

    Pictures keep ``bits`` per channel (rounded): at 6 the documentation figures shrink by a third,
    and the 4-level steps do not show in photographs.
    """
    import cv2

    storage.makedirs(os.path.dirname(storage.absolute(path)))
    step = 2 ** (8 - bits)
    image = np.minimum(255, np.round(image.astype(np.float32) / step) * step).astype(np.uint8)
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    storage.atomic_file(path, buf.tobytes())


def _grade_row(size: int, seed: int, grade: int) -> np.ndarray:
    """One eye of this grade as good / usable / reject, then a 1:1 crop of the good one at 512 px."""
    cells = [synthetic.generate_example(seed, grade, size, grade=grade, quality=q)["image"] for q in range(3)]
    full = synthetic.generate_example(seed, grade, 512, grade=grade, quality=0)["image"]
    return np.concatenate(cells + [_macula_crop(full, size)], 1)


def _macula_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The size x size centre of an image (the macula, in a macula-centred photo)."""
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return image[top:top + size, left:left + size]


def write_grid(path: str, size: int = 144, seed: int = 0) -> None:
    """Picture: the real photo and its 1:1 crop at 512 px on top, then one row per DR grade: an eye as
    good / usable / reject (cells of ``size`` px) and a 1:1 crop of it at 512 px."""
    head, side = 22, 56
    real = np.concatenate([_real_photo(size), _macula_crop(_real_photo(512), size)], 1)
    grid = np.concatenate([_grade_row(size, seed, grade) for grade in range(5)], 0)
    canvas = np.zeros((size + head + grid.shape[0], side + grid.shape[1], 3), np.uint8)
    canvas[:size, side:side + real.shape[1]] = real
    canvas[size + head:, side:] = grid
    _label(canvas, "real", (6, size // 2))
    _label(canvas, "photo", (6, size // 2 + 16))
    _label(canvas, "<- skimage.data.retina():", (side + real.shape[1] + 8, size // 2 - 8), 0.4)
    _label(canvas, "resized, and 1:1 at 512 px", (side + real.shape[1] + 8, size // 2 + 10), 0.4)
    for j, text in enumerate(("good", "usable", "reject", "512 px, 1:1")):
        _label(canvas, text, (side + j * size + 6, size + head - 7))
    for i in range(5):
        _label(canvas, f"DR {i}", (8, size + head + i * size + size // 2))
    _write_png(path, canvas)


def write_qt_examples(path: str, size: int = 256, seed: int = 0, rows: int = 2) -> None:
    """Picture: the real photo (circular mask) clean / op1 / op2 under ``rows`` keys, cells of ``size`` px."""
    import jax

    from cleaq_jax.data import degrade

    image = _real_photo(size).astype(np.float32) / 255
    yy, xx = np.mgrid[:size, :size]
    mask = ((yy - (size - 1) / 2) ** 2 + (xx - (size - 1) / 2) ** 2 <= (0.49 * size) ** 2).astype(np.float32)
    image = image * mask[..., None]
    head = 22
    lines = []
    for r in range(rows):
        key = jax.random.fold_in(jax.random.key(seed), r)
        cells = [image, np.asarray(degrade.op1(image, mask, key)), np.asarray(degrade.op2(image, mask, key))]
        lines.append(np.concatenate(cells, 1))
    body = (np.clip(np.concatenate(lines, 0), 0, 1) * 255).round().astype(np.uint8)
    canvas = np.zeros((head + body.shape[0], body.shape[1], 3), np.uint8)
    canvas[head:] = body
    for j, text in enumerate(("clean", "QT op1", "QT op2")):
        _label(canvas, text, (j * size + 6, head - 7))
    _write_png(path, canvas)


# --------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m cleaq_jax.data_prep.synthetic", __doc__)
    p.add_argument("--out", help="directory for the shards and manifest.json")
    p.add_argument("--num", type=int, default=1000, help="number of examples (default 1000)")
    p.add_argument("--size", type=int, default=None, help="image side in px (default 512; pictures: cell size)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--lesion-scale", type=float, default=1.0,
                   help="multiply every lesion's size (default 1: a 512 px photograph's; 4 for 64 px benchmarks)")
    p.add_argument("--splits", default=None, help="NAME=FRACTION,... summing to 1 (default train=0.7,val=0.1,test=0.2)")
    p.add_argument("--workers", type=int, default=None,
                   help="generating processes (default: 1 per 256 images, at most 1 per core)")
    p.add_argument("--num-shards", type=int, default=None, help="shards per split (default: 1 per 1024 records, >= 2)")
    p.add_argument("--overwrite", action="store_true", help="rebuild even if --out holds this exact set")
    p.add_argument("--grid", metavar="PNG", help="write a picture: real photo, grade x quality grid, 512 px crops")
    p.add_argument("--qt-examples", metavar="PNG", help="write a picture: real photo clean / QT op1 / QT op2")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not (args.out or args.grid or args.qt_examples):
        parser.error("give --out DIR (shards), --grid PNG or --qt-examples PNG")
    try:
        splits = location.parse_splits(args.splits) if args.splits else None
    except errors.ConfigError as e:
        parser.error(str(e))
    console.setup(args.verbose)
    return errors.reported(lambda: _write(args, splits), args.verbose)


def _write(args: argparse.Namespace, splits: dict[str, float] | None) -> None:
    """The pictures and the shard set the command line asks for."""
    if args.grid:
        write_grid(args.grid, size=args.size or 144, seed=args.seed)
    if args.qt_examples:
        write_qt_examples(args.qt_examples, size=args.size or 256, seed=args.seed)
    if args.out:
        manifest = location.build_synthetic(args.out, args.num, size=args.size or 512, seed=args.seed, splits=splits,
                                            workers=args.workers, num_shards=args.num_shards,
                                            overwrite=args.overwrite, lesion_scale=args.lesion_scale)
        counts = {k: v["num_records"] for k, v in manifest["splits"].items()}
        print(f"{args.out}: {counts}")


if __name__ == "__main__":
    sys.exit(main())
