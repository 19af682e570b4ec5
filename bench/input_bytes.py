"""Bytes one host reads per training epoch: measured here on 512 px shards, then scaled to EyeQ.

    python bench/input_bytes.py                       # builds its 512 px records in a temp dir
    python bench/input_bytes.py --num 32 --variants 16 --hosts 1 8 64 --batch 32 \
        --devices-per-host 4 --shards 16

Measured on this machine:

1. the mean bytes a record takes on disk at 512 px (ArrayRecord compresses records with zstd), for
   synthetic fundus images (`cleaq_jax.data.location.build_synthetic`) and for the real fundus photograph scikit-image
   ships, cropped and resized by EyeQ's preparation code (`fundus.preprocess`) in rotated and flipped
   variants, without and with a classical pseudo vessel mask (`vesselness.vessel_mask`), as records
   carry one after pseudo-mask preparation;
2. the bytes process 0 of P reads (Linux /proc/self/io, all system-call reads) when it builds its
   training loader and runs one epoch over the synthetic shard set, against the model below.

The model: a process reads its own records (``floor(E / G) * G / P`` of an epoch of E copies, global
batch G) once each, plus a fixed amount per shard when it opens the shard set (ArrayRecord reads up to
1 MiB of a shard's end to find its index, and grain opens every shard twice: to count its records and
to read them). With class_balance > 0 every process also reads the split's labels file
(`balance.split_labels`). The EyeQ table applies the model to 12,543
training images with the measured record sizes, the global batch raised to the device count where the
paper's 32 is too small. Prints JSON lines, then the table in Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile

import cv2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cleaq_jax.data import fundus, pipeline, vesselness  # noqa: E402
from cleaq_jax.data import shards  # noqa: E402

EYEQ_TRAIN = 12_543  # EyeQ training images (Label_EyeQ_train.csv)
FOOTER_PREFETCH = 2**20  # ArrayRecord's default footer_prefetch_bytes
OPENS_PER_SHARD = 2  # grain: once to count records, once to read


def bytes_read() -> int:
    """Bytes this process has read through system calls so far (Linux /proc/self/io rchar)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


# --------------------------------------------------------------------------- record sizes
def photo_shards(out: str, variants: int, size: int, with_vessel: bool) -> str:
    """scikit-image's fundus photograph, rotated and flipped, prepared as EyeQ's prep does, as split
    "train" of ``out`` (one shard)."""
    from skimage import data as skdata

    base = skdata.retina()
    h, w = base.shape[:2]
    with shards.ShardWriter(out, "photo", "train", num_shards=1) as writer:
        for i in range(variants):
            matrix = cv2.getRotationMatrix2D((w / 2, h / 2), 360.0 * i / variants, 1.0)
            photo = cv2.warpAffine(base, matrix, (w, h))
            photo = photo[:, ::-1].copy() if i % 2 else photo
            image, mask = fundus.preprocess(photo, size, name=f"retina-{i}")
            vessel = vesselness.vessel_mask(image, mask) if with_vessel else None
            writer.write({"image": image, "mask": mask, "vessel": vessel, "dr_grade": 0, "quality": 0,
                          "id": f"retina-{i}", "source": "bench"})
    return out


def synthetic_shards(out: str, num: int, size: int, shards: int) -> str:
    """``num`` synthetic examples at ``size`` px as split "train" of ``out`` in ``shards`` shards."""
    from cleaq_jax.data import location

    location.build_synthetic(out, num=num, size=size, seed=0, splits={"train": 1.0}, workers=1,
                             num_shards=shards)
    return out


def shard_sizes(data_dir: str) -> list[int]:
    return [os.path.getsize(p) for p in shards.split_shards(data_dir, "train")]


def bytes_per_record(data_dir: str) -> float:
    """Mean bytes a record takes on disk (ArrayRecord compresses each record with zstd)."""
    return sum(shard_sizes(data_dir)) / shards.read_manifest(data_dir)["splits"]["train"]["num_records"]


# --------------------------------------------------------------------------- per-host reads
def shard_open_bytes(data_dir: str) -> int:
    """Bytes one process reads to open the split's shards (the model's fixed part)."""
    return OPENS_PER_SHARD * sum(min(s, FOOTER_PREFETCH) for s in shard_sizes(data_dir))


def measure_process(data_dir: str, hosts: int, batch: int, class_balance: float) -> dict:
    """Bytes process 0 of ``hosts`` reads to build its loader and run one epoch, beside the model."""
    before = bytes_read()
    sampling = pipeline.EpochSampling(seed=0, class_balance=class_balance, augment=False)
    loader = pipeline.train_loader(data_dir, "train", global_batch_size=batch, sampling=sampling,
                                   reading=pipeline.RecordReading(process_index=0, process_count=hosts, read_threads=0))
    steps = pipeline.num_batches_per_epoch(data_dir, "train", global_batch_size=batch, sampling=sampling)
    for _ in range(steps):
        next(loader)
    read = bytes_read() - before
    loader.close()
    own = steps * batch // hosts * bytes_per_record(data_dir)
    labels = os.path.getsize(os.path.join(data_dir, shards.split_entry(data_dir, "train")["labels"])) \
        if class_balance > 0 else 0
    return {"hosts": hosts, "global_batch": batch, "class_balance": class_balance, "bytes_read": read,
            "model_bytes": int(own + shard_open_bytes(data_dir) + labels), "own_records_bytes": int(own),
            "shard_open_bytes": shard_open_bytes(data_dir), "labels_file_bytes": labels}


# --------------------------------------------------------------------------- EyeQ
def eyeq_batch(hosts: int, devices_per_host: int, batch: int) -> int:
    """The smallest global batch >= ``batch`` that splits evenly over every device of every host."""
    devices = hosts * devices_per_host
    return -(-max(batch, devices) // devices) * devices


def eyeq_rows(record_bytes: dict[str, float], hosts: list[int], devices_per_host: int, batch: int,
              shards: int) -> list[dict]:
    """The model at EyeQ size, per host: records and GB per epoch; fixed reads per process start."""
    rows = []
    for p in hosts:
        g = eyeq_batch(p, devices_per_host, batch)
        per_host = EYEQ_TRAIN // g * g // p
        row = {"hosts": p, "global_batch": g, "records_per_host": per_host,
               "shard_open_mib": OPENS_PER_SHARD * shards * FOOTER_PREFETCH / 2**20}
        for name, size in record_bytes.items():
            row[f"gb_per_epoch[{name}]"] = round(per_host * size / 1e9, 3)
        rows.append(row)
    return rows


def markdown(rows: list[dict], record_bytes: dict[str, float]) -> str:
    names = list(record_bytes)
    head = "| hosts | global batch | records / host / epoch | " + " | ".join(
        f"GB / host / epoch ({n}, {record_bytes[n] / 1e3:.0f} kB)" for n in names) + " |"
    lines = [head, "|" + " --- |" * (3 + len(names))]
    for r in rows:
        lines.append(f"| {r['hosts']} | {r['global_batch']} | {r['records_per_host']:,} | "
                     + " | ".join(f"{r[f'gb_per_epoch[{n}]']:.3f}" for n in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=32, help="synthetic records to build and read (a multiple of 8)")
    parser.add_argument("--variants", type=int, default=16, help="variants of the real photograph")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--hosts", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--batch", type=int, default=32,
                        help="EyeQ global batch (paper: 32); raised to the device count")
    parser.add_argument("--devices-per-host", type=int, default=4, help="accelerators per host (TPU v4/v5p: 4)")
    parser.add_argument("--shards", type=int, default=16, help="EyeQ training shards (cleaq_jax.data_prep.eyeq's default)")
    parser.add_argument("--work", default="", help="folder for the synthetic shards (default: a temp dir)")
    args = parser.parse_args(argv)
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain reads absl flags
    work = args.work or tempfile.mkdtemp(prefix="input_bytes-")
    data = synthetic_shards(os.path.join(work, "synthetic"), args.num, args.size, shards=2)
    record_bytes = {"synthetic": bytes_per_record(data)}
    for name, with_vessel in (("photo", False), ("photo+vessel", True)):
        photo = photo_shards(os.path.join(work, name), args.variants, args.size, with_vessel)
        record_bytes[name] = bytes_per_record(photo)
    machine = f"{platform.machine()} {os.cpu_count()}-core CPU, {platform.system()}"
    print(json.dumps({"record_bytes_at_px": args.size, "machine": machine, **record_bytes}))
    measure_process(data, 1, 8, 0.0)  # warm-up: first-use imports and set-up are not the loader's reads
    for hosts in (1, 2, 4, 8):
        for class_balance in (0.0, 0.5):
            print(json.dumps({"measured_on": "synthetic", **measure_process(data, hosts, 8, class_balance)}))
    rows = eyeq_rows(record_bytes, args.hosts, args.devices_per_host, args.batch, args.shards)
    for row in rows:
        print(json.dumps({"eyeq": True, **row}))
    print(markdown(rows, record_bytes))


if __name__ == "__main__":
    main()
