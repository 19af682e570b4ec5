"""The shard set every run of the study shares: checked, or built synthetic where there is none, and its
image size."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from cleaq_jax import errors
from cleaq_jax.data import location
from cleaq_jax.data import shards


@dataclasses.dataclass(frozen=True)
class SyntheticSet:
    """What ``--build-synthetic`` builds where the data directory has no shards yet."""

    num: int  # examples; 0 builds none
    seed: int = 0  # generator seed
    size: int = 512  # px, unless --size gives one
    lesion_scale: float = 1.0  # lesion size multiplier (1: the 512 px sizes)
    splits: Mapping[str, float] | None = None  # split fractions (None: the generator's default)


def prepare_shards(data_dir: str, size: int | None, synthetic: SyntheticSet) -> int:
    """Check the shards in ``data_dir`` (building ``synthetic`` there when there are none and it asks for
    examples) against ``size``; returns their image size."""
    if not os.path.exists(os.path.join(data_dir, shards.MANIFEST)):
        if not synthetic.num:
            raise errors.MissingError(
                f"--data {data_dir}: no {shards.MANIFEST} there. Prepare shards with data_prep (docs/data.md), "
                "or pass --build-synthetic N (and --size S) to build a synthetic set there")
        location.build_synthetic(data_dir, num=synthetic.num, size=size or synthetic.size, seed=synthetic.seed,
                                  lesion_scale=synthetic.lesion_scale, splits=synthetic.splits)
    splits = shards.read_manifest(data_dir)["splits"]
    sizes = {tuple(s["image_size"]) for s in splits.values() if s.get("image_size")}
    built = next(iter(sizes))[0] if len(sizes) == 1 else None
    if size is not None and built is not None and size != built:
        raise errors.ConfigError(f"--size {size}, but the shards in {data_dir} are {built} px: pass --size {built} "
                                 "or another --data")
    if size is None and built is None:
        raise errors.ConfigError(f"--data {data_dir}: the manifest gives no single image size; pass --size S")
    return int(size or built)
