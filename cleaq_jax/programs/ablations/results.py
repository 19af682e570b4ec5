"""The study's output: what the study was (command, data, schedule, machine) and its results.json,
results.md and figures in the workdir, drawn from the runs' own files."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from cleaq_jax.data import records
from cleaq_jax.data import shards
from cleaq_jax.programs.ablations.collect import collect_results
from cleaq_jax.programs.ablations.figures import enhancement_examples_figure, per_quality_kappa_figure
from cleaq_jax.programs.ablations.plan import VARIANTS, config_path, load_config, typed_command
from cleaq_jax.programs.ablations.run_files import eval_json_path, write_json
from cleaq_jax.programs.ablations.tables import results_markdown
from cleaq_jax.runtime import storage


def describe_study(args: argparse.Namespace, data_dir: str, overrides: Mapping[str, str], seeds: Sequence[int],
                   runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What results.md states about the study: command, data, schedule, machine."""
    cfg = load_config(config_path(runs[0]["variant"]), overrides)
    splits = shards.read_manifest(data_dir)["splits"]
    data = {name: {"num_records": s.get("num_records"),
                   "quality": {q: s.get("counts", {}).get(q, {}).get("all", 0) for q in records.QUALITY_NAMES}}
            for name, s in sorted(splits.items())}
    generator = splits.get(cfg.data.train_split, {}).get("generator")
    return {"command": "python -m cleaq_jax.programs.ablations " + shlex.join(args.argv), "preset": args.preset,
            "overrides": dict(overrides), "data_dir": data_dir, "data": data, "generator": generator,
            "eval_split": cfg.data.eval_split,
            "num_epochs": int(cfg.num_epochs), "seeds": list(seeds), "variants": sorted({r["variant"] for r in runs},
                                                                                       key=list(VARIANTS).index),
            "shared_pretraining": sorted({(r["variant"], r["pretrained"]) for r in runs if r["pretrained"] != r["variant"]}),
            "jobs": args.jobs, "machine": f"{os.cpu_count()}-core {platform.machine()} CPU ({platform.system()})",
            "example_command": typed_command(runs[-1]["command"])}


def keep_training_study(study: dict[str, Any], previous: Mapping[str, Any] | None) -> dict[str, Any]:
    """A --tabulate-only pass reports the command, wall time and load of the study that trained the runs
    (from the previous results.json), and names itself as what re-tabulated them."""
    before = (previous or {}).get("study", {})
    if "tabulate-only" in before.get("command", "") or "wall_s" not in before:
        return study
    kept = {k: before[k] for k in ("command", "wall_s", "load_average", "jobs") if k in before}
    return {**study, **kept, "tabulated_by": study["command"]}


def write_results(workdir: str, study: dict[str, Any], runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """results.json, results.md and the figures into workdir, from the runs' own files."""
    results = {"study": study, **collect_results(runs)}
    write_json(storage.join(workdir, "results.json"), results)
    storage.atomic_file(storage.join(workdir, "results.md"), results_markdown(results))
    if results["dr"]:
        per_quality_kappa_figure(results, storage.join(workdir, "per_quality_kappa.png"))
    joint = [r for r in runs if r["variant"] == "cleaq_dr" and storage.exists(eval_json_path(r))]
    if joint:
        enhancement_examples_figure(storage.join(joint[0]["dir"], joint[0]["stage"]),
                                    storage.join(workdir, "enhancement_examples.png"))
    return results
