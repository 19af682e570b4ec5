"""Where a run's data lives, and the synthetic shard set built there on first use.

`data_dir` / `ensure_data` resolve config.data.dir (or ``<workdir>/data`` for configured synthetic
data), build the synthetic set when it is missing, and refuse to go on without shards, naming the
command that makes them. `build_synthetic` writes a synthetic set (`cleaq_jax.data.synthetic`'s
generator) as split shards plus manifest.json; ``python -m cleaq_jax.data_prep.synthetic`` is its command line.

Examples (seed, index) are split by fractions in index order: the first train fraction of indices
is train, and so on, so a split never changes when another grows. Every shard and the manifest are
written in a hidden temporary directory and moved into place at the end, the manifest last: a
directory with a manifest.json is complete. Grade and quality follow the generator's default priors
(`cleaq_jax.data.synthetic.GRADE_PRIORS`, `QUALITY_PRIORS`).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from cleaq_jax import errors
from cleaq_jax.data import records, synthetic
from cleaq_jax.data import shards
from cleaq_jax.runtime import console, parallel, storage

NAME = "synthetic"
DEFAULT_SPLITS = {"train": 0.7, "val": 0.1, "test": 0.2}
# Bump when the generator's records change, so stale shard sets are rebuilt (2: records carry the clean
# reference image).
GENERATOR_VERSION = 2


# --------------------------------------------------------------------------- a run's data
def data_dir(data: ml_collections.ConfigDict, workdir: str) -> str:
    """config.data.dir, or <workdir>/data when it is empty and synthetic data is configured (data:
    the config's data block)."""
    if data.dir:
        return data.dir
    if data.synthetic.num > 0:
        return os.path.join(workdir, "data")
    raise errors.ConfigError("config.data.dir is empty: point it at shards written by data_prep "
                             "(e.g. `python -m cleaq_jax.data_prep.eyeq ... --out DIR`, then --config.data.dir=DIR)")


def ensure_data(data: ml_collections.ConfigDict, workdir: str) -> str:
    """Check the shards of the config's data block exist (building the synthetic set on first use when
    configured); returns their directory. Every process calls it; process 0 builds, the others wait."""
    path = data_dir(data, workdir)
    storage.require_local(path, "config.data.dir" if data.dir else "the synthetic shard directory <workdir>/data")
    manifest = os.path.join(path, shards.MANIFEST)
    if not os.path.exists(manifest) and data.synthetic.num > 0:
        splits = {k: float(v) for k, v in data.synthetic.splits.items() if v > 0}
        check_fractions(splits, "config.data.synthetic.splits")
        if jax.process_index() == 0:
            console.say("building %d synthetic fundus images at %d px into %s", data.synthetic.num,
                        data.image_size, path)
            build_synthetic(path, num=int(data.synthetic.num), size=int(data.image_size),
                            seed=int(data.synthetic.seed), splits=splits,
                            lesion_scale=float(data.synthetic.lesion_scale))
        parallel.barrier("synthetic-data")
    if not os.path.exists(manifest):
        raise errors.MissingError(
            f"no shards at config.data.dir={path} ({shards.MANIFEST} missing). Build them first, e.g. "
            f"`python -m cleaq_jax.data_prep.synthetic --out {path} --size {data.image_size}` or the data_prep "
            f"CLI for your dataset (docs/data.md)")
    size = shards.read_manifest(path)["splits"].get(data.train_split, {}).get("image_size")
    if size and size[0] != data.image_size:
        raise errors.ConfigError(
            f"config.data.image_size={data.image_size} but the shards in {path} are "
            f"{size[0]} px: set --config.data.image_size={size[0]} or re-run data_prep with --size")
    return path


# --------------------------------------------------------------------------- the synthetic set
def check_fractions(splits: Mapping[str, float], what: str) -> None:
    if not splits or abs(sum(splits.values()) - 1.0) > 1e-6:
        raise errors.ConfigError(f"{what}: the split fractions must sum to 1 (got {sum(splits.values()):.4f})")


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
            raise errors.ConfigError(f"--splits {text!r}: write NAME=FRACTION pairs with distinct names and positive "
                                     "fractions, e.g. train=0.7,val=0.1,test=0.2")
        splits[name.strip()] = fraction
    check_fractions(splits, f"--splits {text!r}")
    return splits


def split_counts(num: int, splits: Mapping[str, float]) -> dict[str, int]:
    """Records per split: floor(num * fraction), the remainder to the largest fractional parts."""
    exact = {k: num * f for k, f in splits.items()}
    counts = {k: int(math.floor(v)) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[: num - sum(counts.values())]:
        counts[k] += 1
    return counts


def _use_cpu() -> None:
    """Worker processes generate on the CPU: never grab an accelerator the parent may be using."""
    jax.config.update("jax_platforms", "cpu")


def _encode(job: tuple[int, int, int, float]) -> bytes:
    seed, index, size, lesion_scale = job
    example = synthetic.generate_example(seed, index, size, population=synthetic.Population(lesion_scale=lesion_scale))
    # Every quality level keeps the image before QT, so enhancement is scored against the clean eye.
    return records.encode_record({**example, "reference": example["clean"]})


def _generator_info(num: int, size: int, seed: int, splits: Mapping[str, float],
                    lesion_scale: float = 1.0) -> dict[str, Any]:
    info = {"name": NAME, "version": GENERATOR_VERSION, "num": num, "size": size, "seed": seed,
            "splits": dict(splits)}
    if lesion_scale != 1.0:  # recorded only when set, so sets built before the option keep their identity
        info["lesion_scale"] = float(lesion_scale)
    return {"generator": info}


def _is_built(out: str, info: Mapping[str, Any]) -> bool:
    """True when ``out`` already holds the complete shard set these arguments would write."""
    if not os.path.exists(os.path.join(out, shards.MANIFEST)):
        return False
    manifest = shards.read_manifest(out)
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
      lesion_scale: multiplier on every lesion's size (``synthetic.Population``): 1 keeps a 512 px
        photograph's lesion sizes, which are sub-pixel below 128 px; 4 makes them visible at 64 px.
    Returns: the manifest dict.
    """
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    check_fractions(splits, "splits")
    if num < len(splits) or size < 16:
        raise errors.ConfigError(f"need num >= {len(splits)} (one example per split) and size >= 16, got num={num}, "
                                 f"size={size}")
    if not lesion_scale > 0:
        raise errors.ConfigError(f"lesion_scale must be > 0, got {lesion_scale}")
    storage.require_local(out, "the synthetic shard directory")
    info = _generator_info(num, size, seed, splits, lesion_scale)
    if not overwrite and _is_built(out, info):
        return shards.read_manifest(out)
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=out, prefix=".build-")
    try:
        _write_splits(tmp, num, size, seed, splits, workers or _default_workers(num), num_shards, info, lesion_scale)
        _replace_set(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return shards.read_manifest(out)


def _write_splits(tmp: str, num: int, size: int, seed: int, splits: Mapping[str, float], workers: int,
                  num_shards: int | None, info: Mapping[str, Any], lesion_scale: float = 1.0) -> None:
    progress = console.bar(num, f"{NAME} images", unit="img")
    pool = None
    if workers > 1:
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_use_cpu)
    try:
        start = 0
        for split, count in split_counts(num, splits).items():
            jobs = [(seed, i, size, float(lesion_scale)) for i in range(start, start + count)]
            start += count
            parts = num_shards or min(count, max(2, math.ceil(count / 1024)))
            with shards.ShardWriter(tmp, NAME, split, num_shards=parts, extra_manifest=info) as writer:
                encoded = pool.imap(_encode, jobs, chunksize=4) if pool else map(_encode, jobs)
                for data in encoded:  # imap keeps index order, so shards do not depend on workers
                    writer.write(data)
                    progress.update(1)
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()


def _replace_set(tmp: str, out: str) -> None:
    """Shards first, manifest last; shards of an older set in ``out`` are removed first."""
    old = os.path.join(out, shards.MANIFEST)
    if os.path.exists(old):
        for split in shards.read_manifest(out).get("splits", {}).values():
            for shard in split.get("shards", []):
                if os.path.exists(os.path.join(out, shard)):
                    os.remove(os.path.join(out, shard))
        os.remove(old)
    for name in sorted(os.listdir(tmp)):
        if name != shards.MANIFEST and not name.startswith("."):
            storage.move_into_place(os.path.join(tmp, name), os.path.join(out, name))
    storage.move_into_place(os.path.join(tmp, shards.MANIFEST), old)
