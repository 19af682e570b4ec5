"""Loader benchmark: decode + augment throughput of the training pipeline, in images/s per core.

    python bench/loader.py                      # builds 256 fundus-like 512 px records in a temp dir
    python bench/loader.py --data DIR --split train --workers 2 --threads 2
    python bench/loader.py --image-codec png1 --bilevel-masks   # what other record encodings give

Prints one JSON line per setting: a per-stage profile of one example (CPU milliseconds), the bare
decode + augment function, and the grain train loader in this process, with read threads and with
``--workers`` worker processes. ``images_per_s_per_core`` is images per CPU-second spent by this
process and its workers (user + system time from /proc), so it stays meaningful on a machine
shared with other work; ``images_per_s`` is wall-clock throughput. OpenCV's own thread pool is
pinned to 1 thread so that a CPU-second is one core's work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import cv2
import grain
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cleaq_jax.data import decode, pipeline, records  # noqa: E402
from cleaq_jax.data import shards  # noqa: E402


# --------------------------------------------------------------------------- data
def fundus_like(rng: np.random.Generator, base: np.ndarray, size: int) -> dict:
    """A fundus-like example: the one real fundus photograph scikit-image ships, randomly rotated,
    flipped, zoomed and colour-shifted, with sensor-like noise (so PNG sizes are realistic), plus a
    retinal mask and a black-hat vessel mask."""
    h = base.shape[0]
    matrix = cv2.getRotationMatrix2D((h / 2, h / 2), rng.uniform(0, 360), rng.uniform(0.95, 1.1))
    image = cv2.warpAffine(base, matrix, (h, h))
    if rng.random() < 0.5:
        image = image[:, ::-1]
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    image = image * rng.uniform(0.7, 1.2, 3) + rng.normal(0, 2.0, image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)
    mask = cv2.erode((image.max(-1) > 15).astype(np.uint8), np.ones((5, 5), np.uint8))
    image[mask == 0] = 0
    green = cv2.GaussianBlur(image[..., 1], (3, 3), 0)
    tophat = cv2.morphologyEx(green, cv2.MORPH_BLACKHAT, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (15, 15)))
    return {"image": image, "mask": mask, "vessel": ((tophat > 10) & (mask > 0)).astype(np.uint8)}


# Image encodings to compare with the records' own (stored PNG inside zstd-compressed ArrayRecord);
# the loader decodes any of them.
IMAGE_CODECS = {"png": None, "png1": (".png", [cv2.IMWRITE_PNG_COMPRESSION, 1]),
                "jpeg95": (".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95])}


def reencode(record: bytes, image_codec: str, bilevel_masks: bool) -> bytes:
    """A record with its image re-encoded by ``image_codec`` and, optionally, 1-bit PNG masks."""
    import msgpack

    payload = msgpack.unpackb(record, raw=False)
    if IMAGE_CODECS[image_codec] is not None:
        ext, params = IMAGE_CODECS[image_codec]
        bgr = cv2.imdecode(np.frombuffer(payload["image"], np.uint8), cv2.IMREAD_COLOR)
        payload["image"] = cv2.imencode(ext, bgr, params)[1].tobytes()
    for key in ("mask", "vessel") if bilevel_masks else ():
        if payload[key]:
            gray = cv2.imdecode(np.frombuffer(payload[key], np.uint8), cv2.IMREAD_GRAYSCALE)
            payload[key] = cv2.imencode(".png", gray, [cv2.IMWRITE_PNG_BILEVEL, 1])[1].tobytes()
    return msgpack.packb(payload, use_bin_type=True)


def build_shards(out_dir: str, num: int, size: int, *, source: str = "retina", image_codec: str = "png",
                 bilevel_masks: bool = False, seed: int = 0) -> str:
    """Write ``num`` records as split "train" of ``out_dir``; returns out_dir.

    source "retina": `fundus_like` variants of a real photograph (realistic noise, so realistic PNG
    sizes and decode times); "synthetic": `cleaq_jax.data.synthetic` (smoother, so more compressible).
    """
    rng = np.random.default_rng(seed)
    if source == "retina":
        from skimage import data as skdata

        base = skdata.retina()
    else:
        from cleaq_jax.data import synthetic
    with shards.ShardWriter(out_dir, "bench", "train", num_shards=4) as writer:
        for i in range(num):
            if source == "retina":
                example = {**fundus_like(rng, base, size), "dr_grade": int(rng.integers(0, 5)),
                           "quality": int(rng.integers(0, 3)), "id": f"bench_{i:05d}", "source": "bench"}
            else:
                example = synthetic.generate_example(seed, i, size)
            writer.write(reencode(records.encode_record(example), image_codec, bilevel_masks))
    return out_dir


# --------------------------------------------------------------------------- timing
def _record_bytes(data_dir: str, split: str, limit: int) -> list[bytes]:
    source = grain.sources.ArrayRecordDataSource(shards.split_shards(data_dir, split))
    return [source[i] for i in range(min(limit, len(source)))]


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live descendants (Linux /proc)."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            continue  # a worker that just exited
    return total


def _descendants(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(name))
    found, todo = [], [root]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def profile(blobs: list[bytes], size: int) -> dict:
    """CPU milliseconds per example of each stage of `decode.decode_example` (with augmentation)."""
    # decode_masks: the retinal and vessel masks and the clean reference, where the record has them.
    stages = {"unpack": 0.0, "decode_image": 0.0, "decode_masks": 0.0, "augment": 0.0, "total": 0.0}
    rng = np.random.default_rng(0)
    clock = time.thread_time
    for blob in blobs:
        t0 = clock()
        payload = records.decode_record(blob, decode_images=False)
        t1 = clock()
        bgr = cv2.imdecode(np.frombuffer(payload["image"], np.uint8), cv2.IMREAD_COLOR)
        t2 = clock()
        mask = cv2.imdecode(np.frombuffer(payload["mask"], np.uint8), cv2.IMREAD_GRAYSCALE)
        vessel = cv2.imdecode(np.frombuffer(payload["vessel"], np.uint8), cv2.IMREAD_GRAYSCALE) \
            if payload["vessel"] else None
        reference = cv2.imdecode(np.frombuffer(payload["reference"], np.uint8), cv2.IMREAD_COLOR) \
            if payload.get("reference") else None
        t3 = clock()
        decode.warp_fields(bgr, mask, vessel, reference, decode.augment_matrix(rng, size))
        t4 = clock()
        decode.decode_example(blob, image_size=size, rng=rng)
        t5 = clock()
        for key, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            stages[key] += dt
    return {k: round(1e3 * v / len(blobs), 3) for k, v in stages.items()}


def time_function(blobs: list[bytes], size: int, seconds: float) -> tuple[int, float, float]:
    """Images, wall seconds and CPU seconds of `decode_example` with augmentation, in one thread."""
    rng = np.random.default_rng(0)
    done, start, cpu = 0, time.perf_counter(), cpu_seconds()
    while time.perf_counter() - start < seconds:
        for blob in blobs:
            decode.decode_example(blob, image_size=size, rng=rng)
        done += len(blobs)
    return done, time.perf_counter() - start, cpu_seconds() - cpu


def time_loader(data_dir: str, split: str, batch: int, workers: int, threads: int, seconds: float
                ) -> tuple[int, float, float]:
    """Images, wall seconds and CPU seconds of the train loader after its first batches (start-up
    and the workers' first fill excluded)."""
    loader = pipeline.train_loader(data_dir, split, global_batch_size=batch, sampling=pipeline.EpochSampling(seed=0),
                                   reading=pipeline.RecordReading(process_index=0, process_count=1,
                                                                  worker_count=workers, read_threads=threads))
    try:
        for _ in range(max(1, workers) * 2):
            next(loader)
        done, start, cpu = 0, time.perf_counter(), cpu_seconds()
        while time.perf_counter() - start < seconds:
            done += next(loader)["image"].shape[0]
        return done, time.perf_counter() - start, cpu_seconds() - cpu
    finally:
        if hasattr(loader, "close"):
            loader.close()


def report(setting: str, images: int, seconds: float, cpu: float, size: int, **extra) -> None:
    print(json.dumps({"setting": setting, "image_size": size, "images": images, "seconds": round(seconds, 2),
                      "cpu_seconds": round(cpu, 2), "images_per_s": round(images / seconds, 1),
                      "images_per_s_per_core": round(images / cpu, 1),
                      "machine": f"{os.cpu_count()}-core {platform.machine()} CPU", **extra}), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="shard directory (default: build fundus-like shards in a temp dir)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num", type=int, default=256, help="records to build when --data is not given")
    parser.add_argument("--source", choices=("retina", "synthetic"), default="retina",
                        help="what to build: variants of a real photograph, or cleaq_jax.data.synthetic fundi")
    parser.add_argument("--size", type=int, default=512, help="image side of built records")
    parser.add_argument("--image-codec", choices=sorted(IMAGE_CODECS), default="png",
                        help="image encoding of built records (png: the records' own)")
    parser.add_argument("--bilevel-masks", action="store_true", help="store built masks as 1-bit PNG")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="grain worker processes for the last setting")
    parser.add_argument("--threads", type=int, default=2, help="read threads for the threaded setting")
    parser.add_argument("--seconds", type=float, default=10.0, help="time per setting")
    args = parser.parse_args(argv)

    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    cv2.setNumThreads(1)
    tmp = None
    if args.data is None:
        tmp = tempfile.TemporaryDirectory(prefix="cleaq-bench-")
        args.data = build_shards(tmp.name, args.num, args.size, source=args.source,
                                 image_codec=args.image_codec, bilevel_masks=args.bilevel_masks)
    size = shards.read_manifest(args.data)["splits"][args.split]["image_size"][0]
    blobs = _record_bytes(args.data, args.split, 64)
    paths = shards.split_shards(args.data, args.split)
    disk_kib = sum(map(os.path.getsize, paths)) / len(grain.sources.ArrayRecordDataSource(paths)) / 1024
    built = f"built {args.source}: image {args.image_codec}, bilevel masks {args.bilevel_masks}"
    print(json.dumps({"setting": "profile_cpu_ms_per_example", "image_size": size,
                      "data": args.data if tmp is None else built, "kib_per_record_on_disk": round(disk_kib, 1),
                      **profile(blobs, size)}), flush=True)
    report("decode_augment_function", *time_function(blobs, size, args.seconds), size)
    settings = [(0, 0), (0, args.threads)] + ([(args.workers, 0)] if args.workers > 0 else [])
    for workers, threads in settings:
        report(f"loader_workers{workers}_threads{threads}",
               *time_loader(args.data, args.split, args.batch, workers, threads, args.seconds), size,
               batch=args.batch)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
