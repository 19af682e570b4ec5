"""Convert a torchvision ResNet state_dict into a pretrained directory that training configs name:

    python -m cleaq_jax.programs.import_weights --torchvision-file resnet50.npz --arch resnet50 --out DIR \
        [--width 1.0] [--stage-sizes 3,4,6,3]

The file is a state_dict exported once with PyTorch (docs/pretrained.md): ``.npz``, ``.safetensors``, or
``.pth`` / ``.pt`` where PyTorch is importable; it may be in a bucket (``gs://...``). DIR (local or gs://)
must not exist; it gets ``variables.msgpack``
({'params', 'batch_stats'}) and ``meta.json`` (arch, width, stage sizes, classes, source file name, its
sha256, parameter count), and the meta is printed. ``config.pretrained.dr = DIR`` (and ``c_iqa``,
``resnet34``) puts the weights into a stage that starts from scratch.

Exit status: 0 written; 2 for bad flags, an existing DIR, or weights that do not fit --arch (the message
lists every missing, unexpected and mismatched key).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from cleaq_jax import errors
from cleaq_jax.models import pretrained
from cleaq_jax.runtime import cli, console


def main(argv: Sequence[str] | None = None) -> int:
    """Convert a torchvision weight file into a pretrained directory; returns the exit status."""
    ap = cli.parser("python -m cleaq_jax.programs.import_weights", __doc__)
    ap.add_argument("--torchvision-file", required=True,
                    help="torchvision state_dict as .npz, .safetensors or .pth (needs PyTorch)")
    ap.add_argument("--arch", required=True, choices=sorted(pretrained.ARCHS))
    ap.add_argument("--out", required=True, help="directory to create, local or gs:// (must not exist)")
    ap.add_argument("--width", type=float, default=1.0, help="channel multiplier (1.0 for torchvision)")
    ap.add_argument("--stage-sizes", default="",
                    help="blocks per stage, e.g. 1,1,1,1 (default: the arch's 3,4,6,3)")
    args = ap.parse_args(argv)
    try:
        stages = [int(s) for s in args.stage_sizes.split(",")] if args.stage_sizes else None
    except ValueError:
        ap.error(f"--stage-sizes {args.stage_sizes!r}: expected comma-separated integers")
    console.setup(args.verbose)

    def convert() -> None:
        meta = pretrained.export(args.torchvision_file, args.out, args.arch, args.width, stages)
        print(json.dumps(meta, indent=2))

    return errors.reported(convert, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
