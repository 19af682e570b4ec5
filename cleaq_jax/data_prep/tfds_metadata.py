"""Write the TensorFlow Datasets metadata (dataset_info.json, features.json) beside an existing shard set.

Every data_prep command writes it already; this is for shard sets built before it existed, or after
copying shards by hand. It reads manifest.json only::

    python -m cleaq_jax.data_prep.tfds_metadata --shards data/eyeq
    python -c "import tensorflow_datasets as tfds; print(tfds.builder_from_directory('data/eyeq').info.splits)"
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from cleaq_jax import errors
from cleaq_jax.data import tfds_metadata
from cleaq_jax.data import shards
from cleaq_jax.runtime import cli, console


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.parser("python -m cleaq_jax.data_prep.tfds_metadata", __doc__)
    parser.add_argument("--shards", required=True, help="shard directory (holds manifest.json)")
    args = parser.parse_args(argv)
    console.setup(args.verbose)
    return errors.reported(lambda: _write(args.shards), args.verbose)


def _write(shard_dir: str) -> None:
    """Rewrite the manifest of ``shard_dir`` with its TFDS metadata beside it."""
    manifest = shards.read_manifest(shard_dir)
    missing = [s for e in manifest.get("splits", {}).values() for s in e["shards"]
               if not os.path.exists(os.path.join(shard_dir, s))]
    if missing:
        raise errors.MissingError(f"manifest lists shards that are missing: {missing[:3]}; rebuild {shard_dir}")
    shards.write_manifest(shard_dir, manifest)
    for split, entry in sorted(manifest["splits"].items()):
        print(f"{tfds_metadata.dataset_name(manifest)}/{split}: {entry['num_records']} records in "
              f"{len(entry['shards'])} shard(s)", file=sys.stderr)
    print(f"wrote {tfds_metadata.DATASET_INFO} and {tfds_metadata.FEATURES} in {shard_dir}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
