"""How good are the pseudo vessel masks? The CE-Net teacher against the classical fallbacks, scored
against the true vessels of synthetic fundus images (a stand-in for DRIVE in the same prep layout).

    python bench/vessel_masks.py --workdir /tmp/vessel_bench
    python bench/vessel_masks.py --workdir W --size 256 --num 400 --epochs 40 --width 0.5
    python bench/vessel_masks.py --workdir W --data data/drive --size 512 --width 1 --encoder-stages 3 4 6 3

1. Builds ``--num`` synthetic images at ``--size`` px (train 80% / test 20%; image, field-of-view mask
   and true vessel mask in every record, like `python -m cleaq_jax.data_prep.drive` writes DRIVE), or takes the
   shards of ``--data`` (DRIVE itself: then the scores are against its manual masks).
2. Trains the teacher with configs/vessel_teacher.py on the train split: teacher_a, then teacher_b on
   QT-degraded copies, ``--epochs`` each (skipped when ``<workdir>/teacher_b`` holds a finished run).
3. Runs the mask pass of `cleaq_jax.data_prep.pseudo_masks` over the held-out test images with the teacher and
   with the frangi and matched fallbacks, and scores each, with an all-field-of-view mask as the
   trivial baseline: Dice pooled over the pixels inside the field of view, mean Dice per image,
   precision and recall, overall and per quality level (good / usable / reject), and the wall-clock
   seconds per image of each pass on this machine.
4. Times the two fallbacks on ``--time-size`` px images (512: the record size of a real run).

Prints a Markdown table and writes ``<workdir>/vessel_masks.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import msgpack
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cleaq_jax.data import records, synthetic, vesselness  # noqa: E402
from cleaq_jax.data import shards  # noqa: E402
from cleaq_jax.evaluation import restore  # noqa: E402
from cleaq_jax.data_prep import pseudo_masks  # noqa: E402

BATCH = 16  # records per mask-pass batch


def build_data(workdir: str, args: argparse.Namespace) -> tuple[str, str]:
    """(shards with train and test splits, a copy of the test split alone under workdir): ``args.data``
    when given (e.g. DRIVE from cleaq_jax.data_prep.drive), else synthetic images built into workdir."""
    from cleaq_jax.data.location import build_synthetic

    data, held_out = args.data or os.path.join(workdir, "data"), os.path.join(workdir, "held_out")
    if not args.data:
        build_synthetic(data, num=args.num, size=args.size, seed=args.seed, splits={"train": 0.8, "test": 0.2})
    if not os.path.exists(os.path.join(held_out, shards.MANIFEST)):
        with shards.ShardWriter(held_out, "synthetic", "test", num_shards=1) as w:
            for payload in shards.iter_records(data, "test", decode_images=False):
                w.write(msgpack.packb(payload, use_bin_type=True))
    return data, held_out


def train_teacher(workdir: str, data: str, args: argparse.Namespace) -> str:
    """Both teacher stages with configs/vessel_teacher.py at the bench's size; returns teacher_b's directory."""
    from absl import flags, logging

    from cleaq_jax.programs import pipeline
    from cleaq_jax.configs import vessel_teacher

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain reads absl flags
    logging.set_verbosity(logging.INFO)  # the training loop's progress lines
    cfg = vessel_teacher.get_config()
    cfg.data.dir, cfg.data.image_size = data, args.size
    cfg.model.width, cfg.model.encoder_stages = args.width, tuple(args.encoder_stages)
    cfg.batch_size = cfg.eval_batch_size = args.batch_size
    cfg.num_epochs, cfg.optim.constant_epochs = args.epochs, args.epochs
    cfg.optim.learning_rate = args.learning_rate
    cfg.checkpoint_every_steps, cfg.log_every_steps = 10_000, 50
    pipeline.run(cfg, workdir)
    return os.path.join(workdir, "teacher_b")


def score(out_dir: str, truth: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Dice (pooled), mean Dice per image, precision, recall of a masked shard set, overall and per quality."""
    sums: dict[str, list] = {}
    for r in shards.iter_records(out_dir, "test"):
        fov = r["mask"] > 0
        pred, true = (r["vessel"] > 0) & fov, (truth[r["id"]] > 0) & fov
        tp, fp, fn = int((pred & true).sum()), int((pred & ~true).sum()), int((~pred & true).sum())
        quality = records.QUALITY_NAMES[r["quality"]] if r["quality"] >= 0 else "unknown"
        for group in ("all", quality):
            sums.setdefault(group, []).append((tp, fp, fn))
    table = {}
    for group, rows in sums.items():
        tp, fp, fn = np.sum(rows, axis=0)
        table[group] = {"images": len(rows), "dice": 2 * tp / max(2 * tp + fp + fn, 1),
                        "mean_image_dice": float(np.mean([2 * a / max(2 * a + b + c, 1) for a, b, c in rows])),
                        "precision": tp / max(tp + fp, 1), "recall": tp / max(tp + fn, 1)}
    return table


def all_fov_masker(payloads):
    """The trivial baseline: every pixel of the field of view is a vessel."""
    return [(records.decode_png(p["mask"], color=False) > 127).astype(np.uint8) for p in payloads]


def run_methods(workdir: str, held_out: str, teacher_dir: str, workers: int) -> dict[str, dict]:
    from cleaq_jax.evaluation import inference

    restored = restore.restore_teacher(teacher_dir)
    truth = {r["id"]: r["vessel"] for r in shards.iter_records(held_out, "test")}
    maskers = {"teacher": pseudo_masks.teacher_masker(restored, 0.5, BATCH),
               "frangi": pseudo_masks.FilterMasker("frangi", workers),
               "matched": pseudo_masks.FilterMasker("matched", workers), "all_fov": all_fov_masker}
    results = {}
    for name, masker in maskers.items():
        out = os.path.join(workdir, f"masks_{name}")
        if name == "teacher":  # compile outside the timing
            size = restored.image_size
            fov = np.ones((1, size, size), np.uint8)
            inference.predict_vessels(restored, np.zeros((1, size, size, 3), np.uint8), fov, BATCH)
        start = time.perf_counter()
        pseudo_masks.run_pass(held_out, out, masker, {"method": name, "run": time.time()}, batch_size=BATCH)
        seconds = (time.perf_counter() - start) / len(truth)
        results[name] = {"seconds_per_image": seconds, **score(out, truth)}
        getattr(masker, "close", lambda: None)()
    return results


def time_fallbacks(size: int, n: int = 4) -> dict[str, float]:
    """Seconds per image of each fallback at ``size`` px (one process, good-quality synthetic images)."""
    examples = [synthetic.generate_example(7, i, size, quality=0) for i in range(n)]
    timing = {}
    for method in vesselness.METHODS:
        start = time.perf_counter()
        for ex in examples:
            vesselness.vessel_mask(ex["image"], ex["mask"], method)
        timing[method] = (time.perf_counter() - start) / n
    return timing


def markdown(results: dict[str, dict]) -> str:
    lines = ["| method | Dice | mean Dice / image | precision | recall | Dice good | Dice usable | Dice reject "
             "| s / image |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        per = [f"{r[q]['dice']:.3f}" if q in r else "-" for q in records.QUALITY_NAMES]
        a = r["all"]
        lines.append(f"| {name} | {a['dice']:.3f} | {a['mean_image_dice']:.3f} | {a['precision']:.3f} | "
                     f"{a['recall']:.3f} | {' | '.join(per)} | {r['seconds_per_image']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data", help="score on these shards (train/test splits with vessel masks, e.g. DRIVE) "
                        "instead of synthetic images; --size must match them")
    parser.add_argument("--size", type=int, default=128, help="image side (a multiple of 32)")
    parser.add_argument("--num", type=int, default=300, help="synthetic images (80%% train, 20%% test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30, help="epochs of each teacher stage")
    parser.add_argument("--width", type=float, default=0.25, help="CE-Net channel multiplier")
    parser.add_argument("--encoder-stages", type=int, nargs=4, default=(1, 1, 1, 1))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for the filters")
    parser.add_argument("--time-size", type=int, default=512, help="image side for the fallbacks' timing")
    args = parser.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    data, held_out = build_data(args.workdir, args)
    start = time.perf_counter()
    teacher_dir = train_teacher(args.workdir, data, args)
    train_seconds = time.perf_counter() - start
    results = run_methods(args.workdir, held_out, teacher_dir, args.workers)
    report = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores", "settings": vars(args),
              "train_seconds": train_seconds, "results": results,
              f"fallback_seconds_per_image_at_{args.time_size}px": time_fallbacks(args.time_size)}
    shards.write_json(os.path.join(args.workdir, "vessel_masks.json"), report)
    print(markdown(results))
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
