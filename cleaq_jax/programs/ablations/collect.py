"""Collecting the study's results: every table's numbers, from the trained runs' eval.json and run.json.

Rows are named by variant; rows named "<variant>@stageN" hold a joint variant's own pre-trained
subnetworks, read from its earlier stages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cleaq_jax.programs.ablations.plan import (BASELINES, COMPARISON_METRICS, COMPARISONS, PAIRS, VARIANTS,
                                               VESSEL_DICE_GAIN, typed_command)
from cleaq_jax.programs.ablations.run_files import eval_json_path, read_json, read_run_record
from cleaq_jax.programs.ablations.statistics import (has_metric, mean_sd_per_subset, metric_value, paired_difference,
                                                     paired_interval, seed_differences)
from cleaq_jax.runtime import storage

CLASSIFICATION = ("accuracy", "kappa", "precision", "f1")
ENHANCEMENT = ("psnr_input", "psnr_enhanced", "ssim_input", "ssim_enhanced")


def _pretraining_stages(run: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(row name, eval.json) of a joint run's pre-training stages: stage 1 trains IQE and DR alone and
    stage 2 IQA alone, the models stage 3 starts from (the cleanest baseline for what joint training adds).
    A run that shares its base's pre-training reads (and names) the base's rows."""
    if run["stage"] != "stage3":
        return []
    source = run.get("after", run["dir"])
    return [(f"{run.get('pretrained', run['variant'])}@{s}", storage.join(source, s, "eval", "eval.json"))
            for s in ("stage1", "stage2")]


def comparisons(evals: Mapping[str, Mapping[int, Mapping[str, Any] | None]]) -> list[dict[str, Any]]:
    """The pre-declared test: for each `plan.COMPARISONS` pair and `plan.COMPARISON_METRICS` (task, metric,
    subset) both variants report, {a, b, task, metric, subset, **paired_interval of the per-seed a - b};
    then, for each variant whose runs scored vessels (in the paper's order), its own per-seed vessel Dice
    gain (enhanced - input, b None) on the vessel subsets. ``evals`` is {row: {seed: eval.json dict or None}}."""
    declared = [(a, b, task, metric, subset) for a, b in COMPARISONS for task, metric, subsets in COMPARISON_METRICS
                for subset in subsets]
    out = [{"a": a, "b": b, "task": task, "metric": metric, "subset": subset,
            **paired_interval(seed_differences(evals, a, b, task, metric, subset))}
           for a, b, task, metric, subset in declared
           if has_metric(evals.get(a, {}), task, metric, subset) and has_metric(evals.get(b, {}), task, metric, subset)]
    vessel_subsets = [s for task, _, subsets in COMPARISON_METRICS if task == "vessels" for s in subsets]
    order = list(VARIANTS)
    for v in sorted((v for v in evals if "@" not in v), key=lambda v: order.index(v) if v in order else len(order)):
        for subset in [s for s in vessel_subsets if has_metric(evals[v], "vessels", VESSEL_DICE_GAIN, s)]:
            gains = [metric_value(e, "vessels", VESSEL_DICE_GAIN, subset) for _, e in sorted(evals[v].items())]
            out.append({"a": v, "b": None, "task": "vessels", "metric": VESSEL_DICE_GAIN, "subset": subset,
                        **paired_interval(gains)})
    return out


def collect_results(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every table of the study from the finished runs' eval.json files (and their run.json): "runs" (one
    line per run), per task {row: {subset: {metric: mean_sd}}} under "dr", "iqa", "iqa_enhanced" and
    "enhancement", the paired differences "dr_kappa_differences" and "enhancement_differences", and the
    pre-declared test's intervals "comparisons" (`comparisons`)."""
    evals: dict[str, dict[int, dict[str, Any] | None]] = {}
    listed = []
    for run in runs:
        record = read_run_record(run) or {}
        done = storage.exists(eval_json_path(run))
        for name, path in [(run["variant"], eval_json_path(run))] + _pretraining_stages(run):
            if done or run["seed"] not in evals.get(name, {}):
                evals.setdefault(name, {})[run["seed"]] = read_json(path) if done else None
        listed.append({k: run[k] for k in ("variant", "seed", "dir", "stage")} | {
            "eval_json": eval_json_path(run), "status": "finished" if done else record.get("status", "not run"),
            "wall_s": record.get("wall_s"), "command": typed_command(record.get("command", run["command"]))})
    tables: dict[str, Any] = {"runs": listed}
    for task, metrics in (("dr", CLASSIFICATION), ("iqa", CLASSIFICATION), ("iqa_enhanced", CLASSIFICATION),
                          ("enhancement", ENHANCEMENT)):
        per_variant = {v: mean_sd_per_subset(list(by_seed.values()), task, metrics) for v, by_seed in evals.items()}
        tables[task] = {v: t for v, t in per_variant.items() if t is not None}
    pretrained = {r["variant"]: r.get("pretrained", r["variant"]) for r in runs}
    pairs = [(v, base) for v in tables["dr"] if "@" not in v for base in (*BASELINES, f"{pretrained[v]}@stage1")]
    pairs += [p for p in PAIRS if p[0] in tables["dr"]]
    tables["dr_kappa_differences"] = {f"{v} - {base}": paired_difference(evals, v, base) for v, base in pairs
                                      if base != v and base in tables["dr"]}
    tables["enhancement_differences"] = {
        f"{v} - {pretrained[v]}@stage1": {m: paired_difference(evals, v, f"{pretrained[v]}@stage1", m, "enhancement")
                                          for m in ("psnr_enhanced", "ssim_enhanced")}
        for v in tables["enhancement"] if "@" not in v and f"{pretrained[v]}@stage1" in tables["enhancement"]}
    tables["comparisons"] = comparisons(evals)
    return tables
