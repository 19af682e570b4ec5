"""Write synthetic fundus shards (and pictures of them).

    python -m data_prep.synthetic --out DIR --num N --size S --seed K \\
        [--splits train=0.7,val=0.1,test=0.2] [--workers W] [--num-shards M]
    python -m data_prep.synthetic --grid PNG [--size S] [--seed K]
    python -m data_prep.synthetic --qt-examples PNG [--size S] [--seed K]

Examples (seed, index) are split by fractions in index order: the first train fraction of indices
is train, and so on, so a split never changes when another grows. Every shard and the manifest are
written in a hidden temporary directory and moved into DIR at the end, the manifest last: a DIR
with a manifest.json is complete. Grade and quality follow the generator's default priors
(`cleaq_jax.data.synthetic.GRADE_PRIORS`, `QUALITY_PRIORS`).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cleaq_jax.data import records
from cleaq_jax.data import synthetic

NAME = "synthetic"
DEFAULT_SPLITS = {"train": 0.7, "val": 0.1, "test": 0.2}
GENERATOR_VERSION = 1  # bump when the generator's pixels change, so stale shard sets are rebuilt


def parse_splits(text: str) -> dict[str, float]:
    """"train=0.8,test=0.2" -> {"train": 0.8, "test": 0.2}; fractions must be positive and sum to 1."""
    splits: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        if not sep or not name.strip() or fraction <= 0 or name.strip() in splits:
            raise ValueError(f"--splits {text!r}: write NAME=FRACTION pairs with distinct names and positive "
                             "fractions, e.g. train=0.7,val=0.1,test=0.2")
        splits[name.strip()] = fraction
    _check_fractions(splits, f"--splits {text!r}")
    return splits


def _check_fractions(splits: Mapping[str, float], what: str) -> None:
    if not splits or abs(sum(splits.values()) - 1.0) > 1e-6:
        raise ValueError(f"{what}: the split fractions must sum to 1 (got {sum(splits.values()):.4f})")


def split_counts(num: int, splits: Mapping[str, float]) -> dict[str, int]:
    """Records per split: floor(num * fraction), the remainder to the largest fractional parts."""
    exact = {k: num * f for k, f in splits.items()}
    counts = {k: int(math.floor(v)) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[: num - sum(counts.values())]:
        counts[k] += 1
    return counts


def _use_cpu() -> None:
    """Worker processes generate on the CPU: never grab an accelerator the parent may be using."""
    import jax

    jax.config.update("jax_platforms", "cpu")


def _encode(job: tuple[int, int, int, float]) -> bytes:
    seed, index, size, lesion_scale = job
    return records.encode_record(synthetic.generate_example(seed, index, size, lesion_scale=lesion_scale))


class _Progress:
    """One stderr line, rewritten at most twice a second: done/total, rate, ETA."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.stream = total, 0, stream or sys.stderr
        self.start = self.last = time.monotonic()

    def step(self, what: str) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last < 0.5 and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = int((self.total - self.done) / rate)
        self.stream.write(f"\r{NAME} {what}: {self.done}/{self.total} ({100 * self.done / self.total:.0f}%) "
                          f"{rate:.1f} img/s, ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}  ")
        if self.done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def _generator_info(num: int, size: int, seed: int, splits: Mapping[str, float],
                    lesion_scale: float = 1.0) -> dict[str, Any]:
    info = {"name": NAME, "version": GENERATOR_VERSION, "num": num, "size": size, "seed": seed,
            "splits": dict(splits)}
    if lesion_scale != 1.0:  # recorded only when set, so sets built before the option keep their identity
        info["lesion_scale"] = float(lesion_scale)
    return {"generator": info}


def _is_built(out: str, info: Mapping[str, Any]) -> bool:
    """True when ``out`` already holds the complete shard set these arguments would write."""
    if not os.path.exists(os.path.join(out, records.MANIFEST)):
        return False
    manifest = records.read_manifest(out)
    built = manifest.get("splits", {})
    return set(built) == set(info["generator"]["splits"]) and all(
        s.get("generator") == info["generator"] for s in built.values())


def _default_workers(num: int) -> int:
    # A worker costs seconds to start (JAX import, QT compile): one per 256 images, at most one per core.
    return max(1, min(os.cpu_count() or 1, num // 256))


def build_synthetic(out: str, num: int, size: int = 512, seed: int = 0,
                    splits: Mapping[str, float] | None = None, workers: int | None = None,
                    num_shards: int | None = None, overwrite: bool = False,
                    lesion_scale: float = 1.0) -> dict[str, Any]:
    """Write ``num`` synthetic examples of ``size`` px into ``out`` as split shards + manifest.json.

    Args:
      out: directory (created if needed).
      num, size, seed: how many examples, their side in px, and the seed (ids are unique per seed).
      splits: {split: fraction}, fractions summing to 1 (default train 0.7, val 0.1, test 0.2).
      workers: processes generating in parallel (default: one per 256 examples, at most one per core).
      num_shards: shards per split (default: one per 1024 records, at least 2 when there are 2 records).
      overwrite: rebuild even when ``out`` already holds this exact set (otherwise it is kept).
      lesion_scale: multiplier on every lesion's size (``synthetic.generate_example``): 1 keeps a 512 px
        photograph's lesion sizes, which are sub-pixel below 128 px; 4 makes them visible at 64 px.
    Returns: the manifest dict.
    """
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    _check_fractions(splits, "splits")
    if num < len(splits) or size < 16:
        raise ValueError(f"need num >= {len(splits)} (one example per split) and size >= 16, got num={num}, "
                         f"size={size}")
    if not lesion_scale > 0:
        raise ValueError(f"lesion_scale must be > 0, got {lesion_scale}")
    info = _generator_info(num, size, seed, splits, lesion_scale)
    if not overwrite and _is_built(out, info):
        return records.read_manifest(out)
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=out, prefix=".build-")
    try:
        _write_splits(tmp, num, size, seed, splits, workers or _default_workers(num), num_shards, info, lesion_scale)
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return records.read_manifest(out)


def _write_splits(tmp: str, num: int, size: int, seed: int, splits: Mapping[str, float], workers: int,
                  num_shards: int | None, info: Mapping[str, Any], lesion_scale: float = 1.0) -> None:
    progress = _Progress(num)
    pool = None
    if workers > 1:
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_use_cpu)
    try:
        start = 0
        for split, count in split_counts(num, splits).items():
            jobs = [(seed, i, size, float(lesion_scale)) for i in range(start, start + count)]
            start += count
            shards = num_shards or min(count, max(2, math.ceil(count / 1024)))
            with records.ShardWriter(tmp, NAME, split, num_shards=shards, extra_manifest=info) as writer:
                encoded = pool.imap(_encode, jobs, chunksize=4) if pool else map(_encode, jobs)
                for data in encoded:  # imap keeps index order, so shards do not depend on workers
                    writer.write(data)
                    progress.step(split)
    finally:
        if pool is not None:
            pool.terminate()


def _move_into_place(tmp: str, out: str) -> None:
    """Shards first, manifest last; shards of an older set in ``out`` are removed first."""
    old = os.path.join(out, records.MANIFEST)
    if os.path.exists(old):
        for split in records.read_manifest(out).get("splits", {}).values():
            for shard in split.get("shards", []):
                if os.path.exists(os.path.join(out, shard)):
                    os.remove(os.path.join(out, shard))
        os.remove(old)
    for name in sorted(os.listdir(tmp)):
        if name != records.MANIFEST and not name.startswith("."):
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
    os.replace(os.path.join(tmp, records.MANIFEST), old)


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
    """RGB uint8 -> PNG at ``path``, written to a temporary name and renamed when complete.

    Pictures keep ``bits`` per channel (rounded): at 6 the documentation figures shrink by a third,
    and the 4-level steps do not show in photographs.
    """
    import cv2

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    step = 2 ** (8 - bits)
    image = np.minimum(255, np.round(image.astype(np.float32) / step) * step).astype(np.uint8)
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(buf.tobytes())
    os.replace(tmp, path)


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
    p = argparse.ArgumentParser(prog="python -m data_prep.synthetic", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
        splits = parse_splits(args.splits) if args.splits else None
    except ValueError as e:
        parser.error(str(e))
    if args.grid:
        write_grid(args.grid, size=args.size or 144, seed=args.seed)
    if args.qt_examples:
        write_qt_examples(args.qt_examples, size=args.size or 256, seed=args.seed)
    if args.out:
        manifest = build_synthetic(args.out, args.num, size=args.size or 512, seed=args.seed, splits=splits,
                                   workers=args.workers, num_shards=args.num_shards, overwrite=args.overwrite,
                                   lesion_scale=args.lesion_scale)
        counts = {k: v["num_records"] for k, v in manifest["splits"].items()}
        print(f"{args.out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
