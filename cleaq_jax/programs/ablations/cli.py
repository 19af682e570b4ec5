"""The study's command line: parse the flags, plan the runs, run the unfinished ones, write the results.

Exit status: 0 when every run finished, 1 when some failed (the results of the others are written), 2 for
bad arguments or data (nothing is run). The workdir may be a bucket (``gs://...``); the data must be local
(ArrayRecord reads local files only).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from cleaq_jax import errors
from cleaq_jax.data import location
from cleaq_jax.programs import ablations
from cleaq_jax.programs.ablations import sweep
from cleaq_jax.programs.ablations.execution import check_same_settings, run_unfinished
from cleaq_jax.programs.ablations.plan import (VARIANTS, config_path, flag_value, parse_overrides, plan_runs,
                                               preset_settings)
from cleaq_jax.programs.ablations.results import describe_study, keep_training_study, write_results
from cleaq_jax.programs.ablations.run_files import read_json
from cleaq_jax.programs.ablations.shards import SyntheticSet, prepare_shards
from cleaq_jax.runtime import cli, console, storage


def _parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m cleaq_jax.programs.ablations", ablations.__doc__,
                   epilog="Further arguments --config.KEY=VALUE override every run's config.")
    p.add_argument("--data", required=True, help="local shard directory (data_prep output) shared by every run")
    p.add_argument("--workdir", required=True,
                   help="study directory, local or gs://: <variant>/seed<k>/ runs and the results")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3): FIRST..FIRST+N-1")
    p.add_argument("--first-seed", type=int, default=0, metavar="FIRST",
                   help="the first seed (default 0); a new study takes seeds no earlier one used")
    p.add_argument("--sweep", action="store_true",
                   help="instead of the study, the guidance sweep on the validation split (sweep.py): one stage 3 "
                        "per guidance setting from shared pre-training, tabulated with the point its rule chooses")
    p.add_argument("--size", type=int, default=None, help="image size in px (default: the shards' size)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of the variants (default: all, {','.join(VARIANTS)})")
    p.add_argument("--preset", default="full", help="size preset: tiny, bench, study or full (configs/ablations/presets.py)")
    p.add_argument("--build-synthetic", type=int, default=0, metavar="N",
                   help="when --data has no shards yet, build N synthetic examples there first")
    p.add_argument("--synthetic-seed", type=int, default=0, help="generator seed for --build-synthetic")
    p.add_argument("--lesion-scale", type=float, default=None,
                   help="lesion size multiplier for --build-synthetic (default: the preset's; 1 = 512 px sizes)")
    p.add_argument("--splits", default=None, metavar="NAME=FRACTION,...",
                   help="split fractions for --build-synthetic (default: the preset's, else train=0.7,val=0.1,test=0.2)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1: a run uses every core)")
    p.add_argument("--tabulate-only", action="store_true", help="start no run; tabulate the finished ones")
    p.add_argument("--separate-pretraining", action="store_true",
                   help="every joint variant trains its own stages 1 and 2 (default: CLEAQ, CLEQ-DR and CLEAQ-DR "
                        "to_good start stage 3 from CLEAQ-DR's stage-1/2 checkpoints of the same seed)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = _parser().parse_known_args(argv)
    args.argv = argv
    console.setup(args.verbose)
    return errors.reported(lambda: _study(args, rest), args.verbose)


def _study(args: argparse.Namespace, rest: list[str]) -> int:
    """Plan the runs (every check before any work), run the unfinished ones, write the results."""
    argv = args.argv
    t0, load0 = time.time(), os.getloadavg()[0]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    [config_path(v) for v in variants]  # noqa: B018  (unknown names fail before any work)
    if args.seeds < 1:
        raise errors.ConfigError(f"--seeds {args.seeds}: need at least 1")
    storage.require_local(args.data, "--data")
    workdir, data_dir = storage.absolute(args.workdir), os.path.abspath(args.data)
    chosen = preset_settings(args.preset)
    overrides = {k: flag_value(v) for k, v in chosen["overrides"].items()}
    synthetic = SyntheticSet(
        num=args.build_synthetic, seed=args.synthetic_seed, size=chosen["data"]["size"],
        lesion_scale=chosen["data"].get("lesion_scale", 1.0) if args.lesion_scale is None else args.lesion_scale,
        splits=location.parse_splits(args.splits) if args.splits else chosen["data"].get("splits"))
    size = prepare_shards(data_dir, args.size, synthetic)
    overrides.update({"data.dir": data_dir, "data.image_size": str(size), "data.synthetic.num": "0"})
    overrides.update(parse_overrides(rest))
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    runs = (sweep.plan_sweep(workdir, overrides, sys.executable) if args.sweep else
            plan_runs(workdir, variants, seeds, overrides, not args.separate_pretraining))
    for run in runs:
        check_same_settings(run)
    storage.makedirs(workdir)
    failed = [] if args.tabulate_only else run_unfinished(runs, workdir, args.jobs)
    if args.sweep:
        chosen = sweep.write_sweep(workdir, runs, "python -m cleaq_jax.programs.ablations " + " ".join(argv))
        print(f"[ablations] sweep in {storage.join(workdir, 'sweep', 'sweep.md')}; chosen: {chosen}", flush=True)
        return 1 if failed else 0
    study = describe_study(args, data_dir, overrides, seeds, runs)
    study.update(wall_s=time.time() - t0, load_average=[load0, os.getloadavg()[0]])
    if args.tabulate_only:
        study = keep_training_study(study, read_json(storage.join(workdir, "results.json")))
    write_results(workdir, study, runs)
    print(f"[ablations] results in {storage.join(workdir, 'results.md')}", flush=True)
    if failed:
        print(f"[ablations] {len(failed)} run(s) failed: " + ", ".join(f"{r['variant']} seed {r['seed']}"
                                                                      for r in failed), file=sys.stderr)
    return 1 if failed else 0
