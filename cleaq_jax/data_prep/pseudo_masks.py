"""Write pseudo vessel masks into a shard set: the CE-Net teacher's (paper III-C) or a classical filter's.

    python -m cleaq_jax.data_prep.pseudo_masks --shards data/eyeq --teacher runs/teacher/teacher_b --out data/eyeq_vessels
    python -m cleaq_jax.data_prep.pseudo_masks --shards data/eyeq --method frangi --out data/eyeq_vessels

Every record of every split in ``--shards`` is written to ``--out`` under the same shard name with its
``vessel`` field set; every other field (image and mask PNG bytes, labels, id, source) is copied byte for
byte. Methods:

- ``teacher`` (default): the vessel teacher trained with configs/vessel_teacher.py (a teacher_b or
  teacher_a stage directory, or its checkpoints/), restored onto every local device; records go through
  it ``--batch-size`` at a time, resized to the teacher's training size and back when they differ, and
  pixels whose vessel probability exceeds ``--threshold`` become vessels.
- ``frangi`` / ``matched``: the classical fallback of `cleaq_jax.data.vesselness` (no teacher, no DRIVE),
  spread over ``--workers`` processes. Its masks are worse (docs/vessel_masks.md says by how much).

The pass is resumable and idempotent: each output shard is written under a hidden temporary name,
renamed when complete and then marked done (``.<shard>.done.json``, with the settings it was made with
and its counts). A rerun with the same settings skips finished shards and redoes any other one whole,
so an interrupted pass never leaves a duplicate or half-written shard. The manifest (the input's, with
``with_vessel_mask`` counted again and a ``vessel_masks`` entry naming the method, teacher checkpoint
and step, threshold and input directory) is written last, after the input's sidecar files (each split's
``*.labels.json``, which class-balanced loaders read, and ``skipped-<split>.txt``) are copied: an
output directory with a manifest.json is complete.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any, Callable

import cv2
import msgpack
import numpy as np

from cleaq_jax import errors
from cleaq_jax.data import records, vesselness
from cleaq_jax.data import shards
from cleaq_jax.evaluation import restore
from cleaq_jax.runtime import cli, console, storage
from cleaq_jax.data_prep.common import positive_int

METHODS = ("teacher",) + vesselness.METHODS
# A masker maps record payloads (decode_record(..., decode_images=False)) to HxW uint8 {0, 1} masks.
Masker = Callable[[Sequence[dict[str, Any]]], list[np.ndarray]]


class PseudoMaskError(errors.UserError):
    """A problem that stops the pass; the message names the file or option and what to do."""


# --------------------------------------------------------------------------- maskers
def _decode(payload: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    return (records.decode_png(payload["image"], color=True),
            (records.decode_png(payload["mask"], color=False) > 127).astype(np.uint8))


def _resize(array: np.ndarray, size: int) -> np.ndarray:
    if array.shape[:2] == (size, size):
        return array
    shrink = array.shape[0] > size
    return cv2.resize(array, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def teacher_masker(teacher, threshold: float, batch_size: int) -> Masker:
    """Masks from a restored `cleaq_jax.runtime.restore.Teacher`: probability > threshold, inside the mask.

    Batches of up to ``batch_size`` records run as one compiled program (shorter ones are padded)."""
    from cleaq_jax.evaluation import (
        inference,  # JAX only for the teacher: the filter methods' workers stay light
    )

    size = teacher.image_size

    def masks(payloads: Sequence[dict[str, Any]]) -> list[np.ndarray]:
        decoded = [_decode(p) for p in payloads]
        images = np.stack([_resize(image, size) for image, _ in decoded])
        fovs = np.stack([(_resize(mask * 255, size) > 127).astype(np.uint8) for _, mask in decoded])
        probs = inference.predict_vessels(teacher, images, fovs, batch_size)
        return [((_resize(p, mask.shape[0]) > threshold) & (mask > 0)).astype(np.uint8)
                for p, (_, mask) in zip(probs, decoded)]

    return masks


def _filter_one(job: tuple[bytes, bytes, str, str]) -> np.ndarray:
    image_png, mask_png, method, name = job
    image, mask = _decode({"image": image_png, "mask": mask_png})
    return vesselness.vessel_mask(image, mask, method, name=name)


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one OpenCV thread per process: the pool is the parallelism


class FilterMasker:
    """Masks from a classical vesselness filter, computed by a pool of ``workers`` processes."""

    def __init__(self, method: str, workers: int):
        self.method = method
        self._pool = (multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker)
                      if workers > 1 else None)

    def __call__(self, payloads: Sequence[dict[str, Any]]) -> list[np.ndarray]:
        jobs = [(p["image"], p["mask"], self.method, f"record {p['id']!r}") for p in payloads]
        return self._pool.map(_filter_one, jobs) if self._pool else [_filter_one(j) for j in jobs]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()


# --------------------------------------------------------------------------- one shard
def _with_vessel(payload: dict[str, Any], vessel: np.ndarray) -> bytes:
    """The record re-packed with a new vessel PNG; every other value is the very same bytes object."""
    return msgpack.packb({**payload, "vessel": records.encode_png(vessel * 255, "vessel")}, use_bin_type=True)


def _marker(out: str, shard: str) -> str:
    return os.path.join(out, f".{shard}.done.json")


def _source_stamp(path: str) -> dict[str, int]:
    stat = os.stat(path)
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def finished(out: str, shard: str, src: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The done marker of an output shard made from this very source with these settings, else None."""
    marker = _marker(out, shard)
    if not (os.path.exists(marker) and os.path.exists(os.path.join(out, shard))):
        return None
    with open(marker) as f:
        done = json.load(f)
    return done if done.get("settings") == settings and done.get("source") == _source_stamp(src) else None


def _masked_records(reader, shard: str, masker: Masker, batch_size: int, keep_existing: bool, progress):
    """(record bytes with a vessel mask, whether the record's own mask was kept), in shard order,
    reading and masking ``batch_size`` records at a time."""
    for start in range(0, reader.num_records(), batch_size):
        raw = shards.read_records(reader, shard, list(range(start, min(start + batch_size, reader.num_records()))))
        payloads = [records.decode_record(d, decode_images=False) for d in raw]
        todo = [i for i, p in enumerate(payloads) if not (keep_existing and p["vessel"])]
        vessels = dict(zip(todo, masker([payloads[i] for i in todo]) if todo else []))
        for i, data in enumerate(raw):
            yield (_with_vessel(payloads[i], vessels[i]), False) if i in vessels else (data, True)
        if progress is not None:
            progress.update(len(raw))


def write_shard(src: str, out: str, masker: Masker, settings: dict[str, Any], batch_size: int,
                keep_existing: bool, progress=None) -> dict[str, Any]:
    """Mask every record of the shard file ``src`` into ``out/<same name>``, atomically, then mark it done.

    Returns the marker dict: settings, source stamp, records, with_vessel, kept (records whose own mask
    was kept with ``keep_existing``, copied unchanged).
    """
    from array_record.python import array_record_module

    shard = os.path.basename(src)
    counted = {"records": 0, "kept": 0}

    def write(tmp: str) -> None:
        writer = array_record_module.ArrayRecordWriter(tmp, shards.WRITER_OPTIONS)
        try:
            for data, own in _masked_records(reader, src, masker, batch_size, keep_existing, progress):
                writer.write(data)
                counted["records"] += 1
                counted["kept"] += own
        except BaseException:
            with contextlib.suppress(Exception):  # interrupted: atomic_file drops the partial file
                writer.close()
            raise
        writer.close()

    with shards.open_shard(src) as reader:
        storage.atomic_file(os.path.join(out, shard), write)
    done = {"settings": settings, "source": _source_stamp(src), "records": counted["records"],
            "with_vessel": counted["records"], "kept": counted["kept"]}
    shards.write_json(_marker(out, shard), done)
    return done


def sidecar_files(shard_dir: str, manifest: dict[str, Any]) -> list[str]:
    """Files beside the shards that belong to the set: each split's labels file and skip report."""
    names = [entry["labels"] for entry in manifest["splits"].values()]
    names += [f"skipped-{split}.txt" for split in manifest["splits"]]
    return sorted(n for n in set(names) if os.path.isfile(os.path.join(shard_dir, n)))


def copy_sidecars(shard_dir: str, out: str, manifest: dict[str, Any]) -> list[str]:
    """Copy `sidecar_files` from ``shards`` to ``out`` (records keep their order, so they stay true),
    each through a hidden temporary name; returns the names copied."""
    names = sidecar_files(shard_dir, manifest)
    for name in names:
        storage.atomic_file(os.path.join(out, name), functools.partial(shutil.copyfile, os.path.join(shard_dir, name)))
    return names


# --------------------------------------------------------------------------- the pass
def _progress(total: int, method: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"vessel masks ({method})", unit="img", file=sys.stderr, dynamic_ncols=True)


def run_pass(shard_dir: str, out: str, masker: Masker, settings: dict[str, Any], *, batch_size: int = 16,
             keep_existing: bool = False) -> dict[str, Any]:
    """Mask every shard of every split of ``shard_dir`` into ``out``; returns the new manifest.

    Finished shards (`finished`) are skipped and partial ones of an earlier, killed pass removed; the
    manifest is written when every shard is done.
    settings: what the masks are made with (method, teacher, step, threshold), kept in markers and manifest.
    """
    manifest = shards.read_manifest(shard_dir)
    storage.require_local(out, "--out")
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):  # partial shards of a killed pass (one pass per --out at a time)
        if name.startswith(".") and ".array_record-" in name and ".tmp-" in name:
            os.remove(os.path.join(out, name))
    # Every input shard opens before any is masked: a damaged one is named now, not after hours of masking.
    jobs = [(split, path) for split in sorted(manifest["splits"]) for path in shards.check_shards(shard_dir, split)]
    total = sum(manifest["splits"][s]["num_records"] for s in manifest["splits"])
    results: dict[str, list[dict[str, Any]]] = {split: [] for split in manifest["splits"]}
    with _progress(total, settings["method"]) as bar:
        for split, path in jobs:
            done = finished(out, os.path.basename(path), path, settings)
            if done is None:
                done = write_shard(path, out, masker, settings, batch_size, keep_existing, bar)
            else:
                bar.update(done["records"])
            results[split].append(done)
    copy_sidecars(shard_dir, out, manifest)
    for split, entry in manifest["splits"].items():
        entry["with_vessel_mask"] = sum(d["with_vessel"] for d in results[split])
        entry["vessel_masks"] = {**settings, "kept_existing": sum(d["kept"] for d in results[split]),
                                 "input": os.path.abspath(shard_dir)}
    shards.write_manifest(out, manifest)
    return manifest


# --------------------------------------------------------------------------- command line
def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.parser("python -m cleaq_jax.data_prep.pseudo_masks", __doc__)
    parser.add_argument("--shards", required=True, help="input shard directory (holds manifest.json)")
    parser.add_argument("--out", required=True, help="output directory (not the input one)")
    parser.add_argument("--method", choices=METHODS, default="teacher", help="where the masks come from")
    parser.add_argument("--teacher", help="teacher checkpoint: <workdir>/teacher_b (or teacher_a) or its checkpoints/")
    parser.add_argument("--step", type=int, help="teacher checkpoint step (default: the latest)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="records per teacher batch")
    parser.add_argument("--threshold", type=_probability, default=0.5, help="teacher vessel probability cut")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help="processes for the frangi/matched filters (default: all cores)")
    parser.add_argument("--keep-existing", action="store_true",
                        help="keep the vessel masks records already carry (e.g. DRIVE's manual ones)")
    args = parser.parse_args(argv)
    if args.method == "teacher" and not args.teacher:
        parser.error("--method teacher needs --teacher <workdir>/teacher_b (train it with configs/vessel_teacher.py), "
                     "or choose --method frangi when no DRIVE-trained teacher is at hand")
    if args.method != "teacher" and args.teacher:
        parser.error(f"--teacher is only used by --method teacher, not {args.method}")
    if os.path.realpath(args.out) == os.path.realpath(args.shards):
        parser.error(f"--out {args.out} is the input directory: write the masked shards to a new directory")
    return args


def _make_masker(args: argparse.Namespace) -> tuple[Masker, dict[str, Any], Callable[[], None]]:
    """(masker, settings for markers and manifest, close function)."""
    if args.method != "teacher":
        masker = FilterMasker(args.method, args.workers)
        return masker, {"method": args.method}, masker.close

    restored = restore.restore_teacher(args.teacher, step=args.step)
    settings = {"method": "teacher", "teacher": restored.directory, "teacher_step": restored.step,
                "teacher_stage": restored.config.stage, "threshold": args.threshold}
    return teacher_masker(restored, args.threshold, args.batch_size), settings, lambda: None


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: parse ``argv`` (default sys.argv[1:]), run the pass, return the exit code."""
    args = parse_args(argv)
    console.setup(args.verbose)
    return errors.reported(lambda: _mask(args), args.verbose)


def _mask(args: argparse.Namespace) -> None:
    """The pass the command line asks for; raises `errors.UserError` for what stops it."""
    shards.read_manifest(args.shards)
    masker, settings, close = _make_masker(args)
    settings["keep_existing"] = bool(args.keep_existing)
    try:
        manifest = run_pass(args.shards, args.out, masker, settings, batch_size=args.batch_size,
                            keep_existing=args.keep_existing)
    except records.RecordError as e:
        raise PseudoMaskError(f"{e} (the shards finished so far are kept; rerun to resume)") from e
    finally:
        close()
    for split, entry in sorted(manifest["splits"].items()):
        print(f"{split}: {entry['with_vessel_mask']}/{entry['num_records']} records with a vessel mask "
              f"({settings['method']}) in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
