"""Statistics over seeds: mean and sample standard deviation of a metric, per quality subset, and the
paired (same seed) difference of a metric between two variants.

An ``evals`` entry is a run's eval.json dict, or None for a run that did not finish; undefined values
(None or NaN, e.g. the kappa of a subset with one class) are left out and counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cleaq_jax.data import records
from cleaq_jax.programs.ablations.plan import BASELINE

# "all" (eval.json's "overall") and the quality levels of the original image ("per_quality").
SUBSETS = ("all",) + records.QUALITY_NAMES


def mean_sd(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1; None with one value) of the defined values; n counts
    them, n_expected counts every value given (undefined ones, e.g. kappa of one class, are left out)."""
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not kept:
        return {"mean": None, "std": None, "n": 0, "n_expected": len(values), "values": []}
    std = float(np.std(kept, ddof=1)) if len(kept) > 1 else None
    return {"mean": float(np.mean(kept)), "std": std, "n": len(kept), "n_expected": len(values), "values": kept}


def subset_metrics(block: Mapping[str, Any], subset: str) -> Mapping[str, Any]:
    """One task's metrics of a subset in eval.json: "overall" for "all", else that quality level's."""
    return block.get("overall", {}) if subset == "all" else block.get("per_quality", {}).get(subset, {})


def mean_sd_per_subset(evals: Sequence[Mapping[str, Any] | None], task: str,
                       metrics: Sequence[str]) -> dict[str, Any] | None:
    """{subset: {metric: mean_sd}} over one variant's runs (eval.json dicts, None for a run not finished)
    for one task ("dr", "iqa", "iqa_enhanced", "enhancement"); subsets are "all" and the quality levels.
    None when no run evaluated the task. "examples" is the subset's number of test images."""
    if not any(e and task in e for e in evals):
        return None
    blocks = [(e or {}).get(task, {}) for e in evals]
    first = next(b for b in blocks if b)
    return {s: {m: {**mean_sd([subset_metrics(b, s).get(m) for b in blocks]),
                    "examples": subset_metrics(first, s).get("n", 0)}
                for m in metrics} for s in SUBSETS if any(subset_metrics(b, s) for b in blocks)}


def paired_difference(evals_by_seed: Mapping[str, Mapping[int, Mapping[str, Any] | None]], variant: str,
                      baseline: str = BASELINE, metric: str = "kappa", task: str = "dr") -> dict[str, Any]:
    """Per subset: mean_sd of (variant - baseline) ``metric`` of ``task`` (DR grading by default), paired
    by seed; ``evals_by_seed`` is {variant: {seed: eval.json dict or None}}."""
    out = {}
    for subset in SUBSETS:
        diffs = []
        for seed, e in evals_by_seed.get(variant, {}).items():
            base = evals_by_seed.get(baseline, {}).get(seed)
            a = subset_metrics(e.get(task, {}), subset).get(metric) if e else None
            b = subset_metrics(base.get(task, {}), subset).get(metric) if base else None
            diffs.append(None if a is None or b is None else a - b)
        out[subset] = mean_sd(diffs)
    return out
