"""DR kappa per quality level, enhancement and IQA kappa of trained runs on a held-out shard set, mean ± sd over
seeds and paired differences between methods.

    python -m cleaq_jax.data_prep.synthetic --out HELDOUT --num 1200 --size 64 --seed 1 --lesion-scale 4 --splits test=1.0
    python bench/heldout.py --data HELDOUT \
        --method "DR alone=RUNS/dr20/seed{seed}/stage1" \
        --method "CLEQ-DR=RUNS/cleq_dr/seed{seed}/stage3" [--seeds 0,1,2] [--split test] [--json OUT.json]

A synthetic study's test split holds 160 images at 800 (42 of them reject-quality), too few to rank
methods per quality level: one seed's DR-alone reject kappa there moved between 0.16 and 0.53. Shards
built with another generator seed are images none of the runs has seen, from the same distribution, and
as many as evaluating can afford. Each ``--method NAME=PATTERN`` names a stage directory per seed
(``{seed}`` is replaced); every checkpoint is evaluated as `cleaq_jax.programs.evaluate` would
(``python -m cleaq_jax.main --config=configs/eval.py`` gives the same figures, one checkpoint at a time):
a stage-3 model grades IQE's enhancement, a stage-1 DR the raw image. Prints one line per checkpoint,
then the tables; differences are paired by seed against the first method that has the metric (so list
DR alone first for kappa, and the stage 1 a joint run started from before it for PSNR / SSIM).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cleaq_jax.evaluation import restore  # noqa: E402
from cleaq_jax.programs import evaluate  # noqa: E402
from cleaq_jax.programs.ablations import statistics  # noqa: E402
from cleaq_jax.programs.ablations.tables import format_mean_sd  # noqa: E402
from cleaq_jax.runtime import parallel, storage  # noqa: E402
from cleaq_jax.training import stages  # noqa: E402

LEVELS = ("all", "good", "usable", "reject")


def scores(path: str, data: str, split: str, mesh) -> dict[str, float]:
    """kappa_<level> and, for a model with IQE, psnr_<level> / ssim_<level> of the enhancement."""
    r = restore.load_checkpoint(path, mesh, "latest")
    cfg = r.config
    cfg.data.dir = data
    stage = stages.Stage.from_config(cfg, r.stage, steps_per_epoch=0, data_dir=data)
    s = evaluate.summarise(evaluate.collect(cfg, stage, r.state, r.models, mesh, split, show_progress=False))
    row: dict[str, float] = {}
    for task, keys in (("dr", (("kappa", "kappa"),)), ("enhancement", (("psnr", "psnr_enhanced"),
                                                                        ("ssim", "ssim_enhanced")))):
        if task in s:
            tables = {"all": s[task]["overall"], **s[task]["per_quality"]}
            for name, key in keys:
                row.update({f"{name}_{level}": tables[level][key] for level in LEVELS if level in tables})
    if "iqa" in s:
        row["iqa_all"] = s["iqa"]["overall"]["kappa"]  # per level IQA kappa is undefined (one true class)
    return row


def mean_sd(values: list[float | None]) -> str:
    """The study's "mean ± sample std" over the defined values (`statistics.mean_sd`, `format_mean_sd`)."""
    return format_mean_sd(statistics.mean_sd(values))


def main() -> None:
    p = argparse.ArgumentParser(prog="python bench/heldout.py", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="held-out shard directory (data_prep output)")
    p.add_argument("--method", action="append", required=True, help='"NAME=stage directory pattern with {seed}"')
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--split", default="test")
    p.add_argument("--json", default="", help="also write every value here")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m.split("=", 1) for m in args.method]
    for name, pattern in methods:
        for seed in seeds:
            if not os.path.isdir(pattern.format(seed=seed)):
                sys.exit(f"--method {name}: {pattern.format(seed=seed)} is not a directory")
    mesh = parallel.make_mesh(-1, 1)
    values: dict[str, list[dict[str, float]]] = {}
    for name, pattern in methods:
        for seed in seeds:
            row = scores(pattern.format(seed=seed), args.data, args.split, mesh)
            values.setdefault(name, []).append(row)
            print(f"{name} seed {seed}: " + " ".join(f"{k}={v if v is None else round(v, 3)}" for k, v in row.items()), flush=True)
    for metric, levels in (("kappa", LEVELS), ("psnr", LEVELS), ("ssim", LEVELS), ("iqa", ("all",))):
        keys = [f"{metric}_{level}" for level in levels]
        rows = [(n, v) for n, v in values.items() if keys[0] in v[0]]
        if not rows:
            continue
        (first, base), *others = rows
        print(f"\n{metric} | " + " | ".join(levels))
        for name, runs in rows:
            print(f"{name} | " + " | ".join(mean_sd([r[k] for r in runs]) for k in keys))
        for name, runs in others:
            print(f"{name} - {first} (paired by seed) | " + " | ".join(
                mean_sd([None if None in (r[k], b[k]) else r[k] - b[k] for r, b in zip(runs, base)]) for k in keys))
    if args.json:
        storage.atomic_file(args.json, json.dumps({"data": args.data, "split": args.split, "seeds": seeds,
                                                   "methods": dict(methods), "values": values}, indent=1))


if __name__ == "__main__":
    main()
