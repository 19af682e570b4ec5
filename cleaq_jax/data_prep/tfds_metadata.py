"""Write the TensorFlow Datasets metadata (dataset_info.json, features.json) beside an existing shard set.

Every data_prep command writes it already; this is for shard sets built before it existed, or after
copying shards by hand. It reads manifest.json only::

    python -m cleaq_jax.data_prep.tfds_metadata --shards data/eyeq
    python -c "import tensorflow_datasets as tfds; print(tfds.builder_from_directory('data/eyeq').info.splits)"
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from cleaq_jax.data import tfds_metadata
from cleaq_jax.data import shards


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cleaq_jax.data_prep.tfds_metadata", description=__doc__.split("\n")[0])
    parser.add_argument("--shards", required=True, help="shard directory (holds manifest.json)")
    args = parser.parse_args(argv)
    try:
        manifest = shards.read_manifest(args.shards)
        missing = [s for e in manifest.get("splits", {}).values() for s in e["shards"]
                   if not os.path.exists(os.path.join(args.shards, s))]
        if missing:
            raise FileNotFoundError(f"manifest lists shards that are missing: {missing[:3]}; rebuild {args.shards}")
        shards.write_manifest(args.shards, manifest)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for split, entry in sorted(manifest["splits"].items()):
        print(f"{tfds_metadata.dataset_name(manifest)}/{split}: {entry['num_records']} records in "
              f"{len(entry['shards'])} shard(s)", file=sys.stderr)
    print(f"wrote {tfds_metadata.DATASET_INFO} and {tfds_metadata.FEATURES} in {args.shards}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
