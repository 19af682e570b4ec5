"""Statistics over seeds: mean and sample standard deviation of a metric, per quality subset, the
paired (same seed) difference of a metric between two variants, and the pre-declared test's interval of
such a difference (`paired_interval`).

An ``evals`` entry is a run's eval.json dict, or None for a run that did not finish; undefined values
(None or NaN, e.g. the kappa of a subset with one class) are left out and counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from cleaq_jax.data import records
from cleaq_jax.programs.ablations.plan import BASELINE, VESSEL_DICE_GAIN

# "all" (eval.json's "overall") and the quality levels of the original image ("per_quality").
SUBSETS = ("all",) + records.QUALITY_NAMES


def mean_sd(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1; None with one value) of the defined values; n counts
    them, n_expected counts every value given (undefined ones, e.g. kappa of one class, are left out)."""
    kept = _defined(values)
    if not kept:
        return {"mean": None, "std": None, "n": 0, "n_expected": len(values), "values": []}
    std = float(np.std(kept, ddof=1)) if len(kept) > 1 else None
    return {"mean": float(np.mean(kept)), "std": std, "n": len(kept), "n_expected": len(values), "values": kept}


def _defined(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def paired_interval(diffs: Sequence[float | None], confidence: float = 0.95, n_boot: int = 10000, seed: int = 0,
                    power: float = 0.8) -> dict[str, Any]:
    """The pre-declared test of one paired difference: ``diffs`` are per-seed differences a - b (None or NaN,
    e.g. a seed that did not finish, are left out and counted, as in `mean_sd`).

    Returns mean, sd (ddof=1), n, n_expected, values, confidence, power and
    - t_low, t_high: the paired t interval, mean -+ t_{(1+c)/2, n-1} * sd / sqrt(n);
    - boot_low, boot_high: the percentile bootstrap interval of the mean (n_boot resamples of the n values
      with replacement, numpy's default_rng(seed): the same numbers for the same seed), reported beside the
      t interval as a check that does not assume normal differences;
    - detected: the pre-declared rule, True exactly where the t interval excludes 0 (the bootstrap interval
      does not enter it);
    - smallest_detectable: the smallest true mean difference this test detects with probability ``power``,
      (t_{(1+c)/2, n-1} + t_{power, n-1}) * sd / sqrt(n), in the metric's units, so that "not detected"
      says how large a difference the seeds could have missed.
    With n < 2 the intervals, detected and smallest_detectable are None (sd and mean too where undefined).
    """
    kept = _defined(diffs)
    n = len(kept)
    out: dict[str, Any] = {"mean": float(np.mean(kept)) if kept else None, "sd": None, "n": n,
                           "n_expected": len(diffs), "values": kept, "confidence": confidence, "power": power,
                           "t_low": None, "t_high": None, "boot_low": None, "boot_high": None, "detected": None,
                           "smallest_detectable": None}
    if n < 2:
        return out
    sd = float(np.std(kept, ddof=1))
    se = sd / math.sqrt(n)
    t_c = float(stats.t.ppf((1 + confidence) / 2, n - 1))
    t_low, t_high = out["mean"] - t_c * se, out["mean"] + t_c * se
    rng = np.random.default_rng(seed)
    boot_means = np.asarray(kept)[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    boot_low, boot_high = np.percentile(boot_means, [50 * (1 - confidence), 50 * (1 + confidence)])
    return out | {"sd": sd, "t_low": t_low, "t_high": t_high, "boot_low": float(boot_low),
                  "boot_high": float(boot_high), "detected": bool(t_low > 0 or t_high < 0),
                  "smallest_detectable": (t_c + float(stats.t.ppf(power, n - 1))) * se}


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


def metric_value(e: Mapping[str, Any] | None, task: str, metric: str, subset: str) -> float | None:
    """One run's ``metric`` of ``task`` on ``subset`` from its eval.json (None where absent). Task "vessels"
    with `plan.VESSEL_DICE_GAIN` is the Dice of the segmented enhancement minus that of IQE's input, read
    from the block {'overall' / 'per_quality'[level]: {image kind: {n, dice, auc, accuracy}}}."""
    block = subset_metrics((e or {}).get(task, {}), subset)
    if task != "vessels":
        return block.get(metric)
    if metric != VESSEL_DICE_GAIN:
        raise ValueError(f"vessels metric {metric!r}: only {VESSEL_DICE_GAIN!r} is read")
    enhanced, given = block.get("enhanced", {}).get("dice"), block.get("input", {}).get("dice")
    return None if enhanced is None or given is None else enhanced - given


def has_metric(evals: Mapping[int, Mapping[str, Any] | None], task: str, metric: str, subset: str) -> bool:
    """Whether any of a variant's runs ({seed: eval.json or None}) reports ``metric`` on ``subset`` (the value
    may still be undefined there, e.g. the kappa of one class)."""
    blocks = [subset_metrics((e or {}).get(task, {}), subset) for e in evals.values()]
    if task == "vessels":
        return any("dice" in b.get("enhanced", {}) and "dice" in b.get("input", {}) for b in blocks)
    return any(metric in b for b in blocks)


def seed_differences(evals_by_seed: Mapping[str, Mapping[int, Mapping[str, Any] | None]], a: str, b: str,
                     task: str, metric: str, subset: str) -> list[float | None]:
    """Per seed (of either variant, in seed order): ``a``'s minus ``b``'s `metric_value`, None where either
    is undefined or its run did not finish; the input of `paired_interval`."""
    runs_a, runs_b = evals_by_seed.get(a, {}), evals_by_seed.get(b, {})
    diffs = []
    for seed in sorted(set(runs_a) | set(runs_b)):
        x, y = (metric_value(r.get(seed), task, metric, subset) for r in (runs_a, runs_b))
        diffs.append(None if x is None or y is None else x - y)
    return diffs
