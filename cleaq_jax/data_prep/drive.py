"""Prepare DRIVE (vessel segmentation) as ArrayRecord shards with vessel and retinal masks.

    python -m cleaq_jax.data_prep.drive --root DRIVE --out data/drive

Expects DRIVE's published layout: ``training/images/21_training.tif``, ``training/1st_manual/21_manual1.gif``,
``training/mask/21_training_mask.gif`` and ``test/images/01_test.tif``, ``test/1st_manual/01_manual1.gif``,
``test/mask/01_test_mask.gif`` (565x584). Splits "train" and "test". The vessel mask comes from
1st_manual; the retinal mask is the published field-of-view mask, both cropped and resized exactly
like the image (vessels so that one-pixel vessels survive). Grade and quality are unknown (-1).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from cleaq_jax import errors
from cleaq_jax.data import fundus
from cleaq_jax.data_prep import common
from cleaq_jax.runtime import cli, console

SOURCE = "drive"
# DRIVE folder -> (split written, suffix of image and mask names)
FOLDERS = {"training": ("train", "training"), "test": ("test", "test")}


def collect(root: str) -> tuple[list[common.Job], list[common.Skip]]:
    """Jobs (image, FOV mask, manual vessel mask) and skips for DRIVE's training and test folders."""
    present = [f for f in FOLDERS if os.path.isdir(os.path.join(root, f, "images"))]
    if not present:
        raise common.PrepError(f"neither {root}/training/images nor {root}/test/images exists: point --root at "
                               "the unpacked DRIVE folder (the one holding training/ and test/)")
    jobs, skips = [], []
    for folder in present:
        split, suffix = FOLDERS[folder]
        base = os.path.join(root, folder)
        for name in sorted(os.listdir(os.path.join(base, "images"))):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in (".tif", ".tiff") or name.startswith("."):
                continue
            number = stem.split("_")[0]
            image = os.path.join(base, "images", name)
            fov = os.path.join(base, "mask", f"{number}_{suffix}_mask.gif")
            manual = os.path.join(base, "1st_manual", f"{number}_manual1.gif")
            missing = [p for p in (fov, manual) if not os.path.isfile(p)]
            if missing:
                skips.append(common.Skip(split, stem, image, f"missing {' and '.join(missing)}"))
                continue
            jobs.append(common.Job(split, stem, image, -1, -1, (fov, manual)))
    return jobs, skips


def encode_drive(job: common.Job, size: int) -> dict[str, Any]:
    """Job -> record dict: disc-cropped image, FOV mask and vessel mask cropped the same way."""
    image = fundus.load_image(job.image)
    fov_path, manual_path = job.extra
    fov, vessel = fundus.load_mask(fov_path), fundus.load_mask(manual_path)
    for path, m in ((fov_path, fov), (manual_path, vessel)):
        if m.shape != image.shape[:2]:
            raise ValueError(f"{path} is {m.shape[1]}x{m.shape[0]} px but its image {job.image} is "
                             f"{image.shape[1]}x{image.shape[0]}")
    disc = fundus.find_disc(image, name=job.image)
    mask = fundus.crop_mask(fov, disc, size)
    crop = fundus.crop_to_disc(image, disc, size) * mask[..., None]
    vessel = fundus.crop_mask(vessel, disc, size, keep_thin=True) & mask
    return {"image": crop, "mask": mask, "vessel": vessel, "dr_grade": -1, "quality": -1, "id": job.id}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: parse ``argv`` (default sys.argv[1:]), prepare train and test, return the exit code."""
    parser = cli.parser("python -m cleaq_jax.data_prep.drive", __doc__)
    parser.add_argument("--root", required=True, help="the DRIVE folder holding training/ and test/")
    common.add_arguments(parser, num_shards=1)
    args = parser.parse_args(argv)
    if not os.path.isdir(args.root):
        parser.error(f"--root {args.root}: no such folder (it should hold DRIVE's training/ and test/)")
    console.setup(args.verbose)

    def prepare() -> int:
        jobs, skips = collect(args.root)
        return common.run(args, SOURCE, jobs, skips, encoding=common.Encoding(encode=encode_drive),
                          provenance=common.Provenance(command=common.command_line("cleaq_jax.data_prep.drive", argv)))

    return errors.reported(prepare, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
