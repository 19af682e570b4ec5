"""The ablation study's pre-declared test: `statistics.paired_interval` against hand arithmetic and scipy's
quantiles, the comparisons `collect` gathers from hand-made eval.json dicts, and their table in results.md.

No run is trained here: every eval.json is written out below.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from cleaq_jax.programs.ablations import collect, plan, statistics, tables

RTOL = 1e-9


# --------------------------------------------------------------------------- paired_interval
def test_paired_interval_of_a_hand_computed_case():
    # diffs 1, 2, 3, 4: mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, sd = sqrt(5 / 3);
    # se = sd / sqrt(4) = sd / 2; t_{0.975, 3} = 3.18244630528371 (Student's t table); interval 2.5 ± t * se,
    # about [0.4457, 4.5543], which excludes 0.
    r = statistics.paired_interval([1, 2, 3, 4])
    sd, t975 = math.sqrt(5 / 3), 3.18244630528371
    assert (r["mean"], r["n"], r["n_expected"], r["values"]) == (2.5, 4, 4, [1.0, 2.0, 3.0, 4.0])
    assert r["sd"] == pytest.approx(sd, rel=RTOL)
    assert r["t_low"] == pytest.approx(2.5 - t975 * sd / 2, rel=RTOL)
    assert r["t_high"] == pytest.approx(2.5 + t975 * sd / 2, rel=RTOL)
    assert r["detected"] is True


def test_undefined_differences_are_left_out_and_counted():
    r = statistics.paired_interval([0.1, None, 0.3, float("nan")])
    assert (r["n"], r["n_expected"], r["values"]) == (2, 4, [0.1, 0.3])
    assert r["mean"] == pytest.approx(0.2, rel=RTOL) and r["sd"] == pytest.approx(math.sqrt(0.02), rel=RTOL)


@pytest.mark.parametrize("diffs", [[0.3], [0.3, None], [], [None]])
def test_fewer_than_two_seeds_give_no_interval_and_no_verdict(diffs):
    r = statistics.paired_interval(diffs)
    assert r["n"] == len([d for d in diffs if d is not None]) and r["n_expected"] == len(diffs)
    assert r["mean"] == (0.3 if r["n"] else None) and r["sd"] is None
    for key in ("t_low", "t_high", "boot_low", "boot_high", "detected", "smallest_detectable"):
        assert r[key] is None, key


def test_bootstrap_interval_contains_the_mean_and_is_the_same_for_the_same_seed():
    diffs = [0.12, -0.03, 0.25, 0.08, 0.31, 0.02]
    r = statistics.paired_interval(diffs, seed=7)
    assert min(diffs) <= r["boot_low"] <= r["mean"] <= r["boot_high"] <= max(diffs)
    again = statistics.paired_interval(diffs, seed=7)
    assert (again["boot_low"], again["boot_high"]) == (r["boot_low"], r["boot_high"])
    other = statistics.paired_interval(diffs, seed=8)
    assert (other["boot_low"], other["boot_high"]) != (r["boot_low"], r["boot_high"])
    assert (other["t_low"], other["t_high"]) == (r["t_low"], r["t_high"])


def test_an_interval_containing_zero_is_not_detected_whatever_the_bootstrap_says():
    # diffs -1, 1, 2: mean 2/3, sd = sqrt(7/3) ≈ 1.528, t_{0.975, 2} ≈ 4.303: 2/3 ± 3.795 contains 0.
    r = statistics.paired_interval([-1, 1, 2])
    assert r["t_low"] < 0 < r["t_high"] and r["detected"] is False
    below = statistics.paired_interval([-1, -2, -3, -4])
    assert below["t_high"] < 0 and below["detected"] is True


def test_an_interval_at_another_confidence_uses_that_quantile():
    r = statistics.paired_interval([0.1, 0.2, 0.4], confidence=0.9)
    se = np.std([0.1, 0.2, 0.4], ddof=1) / math.sqrt(3)
    assert r["t_high"] - r["mean"] == pytest.approx(stats.t.ppf(0.95, 2) * se, rel=RTOL)


@pytest.mark.parametrize("power", [0.8, 0.9])
def test_smallest_detectable_difference_is_the_sum_of_the_two_quantiles_times_the_standard_error(power):
    diffs = [0.05, 0.11, -0.02, 0.07, 0.04]
    r = statistics.paired_interval(diffs, power=power)
    se = np.std(diffs, ddof=1) / math.sqrt(len(diffs))
    expected = (stats.t.ppf(0.975, len(diffs) - 1) + stats.t.ppf(power, len(diffs) - 1)) * se
    assert r["smallest_detectable"] == pytest.approx(expected, rel=RTOL) and r["power"] == power


# --------------------------------------------------------------------------- comparisons
def _eval(kappa, psnr=None, dice=None):
    """An eval.json dict: DR kappa on all / usable / reject; with psnr, the enhancement's PSNR and SSIM
    (SSIM = PSNR / 100) on usable / reject; with dice = (input, enhanced), the vessel block's Dice of
    each on usable / reject."""
    e = {"dr": {"overall": {"n": 9, "kappa": kappa}, "per_quality": {q: {"n": 3, "kappa": kappa} for q in
                                                                    ("usable", "reject")}}}
    if psnr is not None:
        e["enhancement"] = {"overall": {"n": 9, "psnr_enhanced": psnr, "ssim_enhanced": psnr / 100},
                            "per_quality": {q: {"n": 3, "psnr_enhanced": psnr, "ssim_enhanced": psnr / 100}
                                            for q in ("usable", "reject")}}
    if dice is not None:
        kinds = {"input": {"n": 3, "dice": dice[0]}, "enhanced": {"n": 3, "dice": dice[1]}}
        e["vessels"] = {"segmenter": "test", "overall": kinds, "per_quality": {"usable": kinds, "reject": kinds}}
    return e


def _by_key(entries):
    return {(c["a"], c["b"], c["metric"], c["subset"]): c for c in entries}


EVALS = {  # three seeds of three variants; dr_frozen_iqe and dr_qt are not in this study
    "cleaq_dr": {0: _eval(0.60, 30.0, (0.40, 0.50)), 1: _eval(0.55, 31.0, (0.42, 0.49)),
                 2: _eval(0.62, 29.0, (0.41, 0.47))},
    "cleq_dr": {0: _eval(0.50, 29.0, (0.40, 0.45)), 1: _eval(0.52, 30.5, (0.42, 0.46)), 2: None},
    "dr_only": {0: _eval(0.45), 1: _eval(0.50), 2: _eval(0.40)},
}


def test_each_declared_comparison_present_in_both_variants_is_a_paired_interval_of_the_seeds_differences():
    got = _by_key(collect.comparisons(EVALS))
    kappa = got[("cleaq_dr", "cleq_dr", "kappa", "reject")]
    assert kappa["values"] == pytest.approx([0.10, 0.03], rel=RTOL) and kappa["n_expected"] == 3
    assert kappa | {"values": None} == statistics.paired_interval([0.60 - 0.50, 0.55 - 0.52, None]) | {
        "a": "cleaq_dr", "b": "cleq_dr", "task": "dr", "metric": "kappa", "subset": "reject", "values": None}
    assert got[("cleaq_dr", "dr_only", "kappa", "all")]["values"] == pytest.approx([0.15, 0.05, 0.22], rel=RTOL)
    assert got[("cleaq_dr", "cleq_dr", "psnr_enhanced", "usable")]["values"] == pytest.approx([1.0, 0.5], rel=RTOL)
    gain = got[("cleaq_dr", "cleq_dr", plan.VESSEL_DICE_GAIN, "usable")]  # (0.10 - 0.05), (0.07 - 0.04)
    assert gain["values"] == pytest.approx([0.05, 0.03], rel=RTOL) and gain["task"] == "vessels"


def test_comparisons_whose_metric_or_variant_is_absent_are_left_out_and_the_rest_keep_the_declared_order():
    entries = collect.comparisons(EVALS)
    pairs = [(c["a"], c["b"]) for c in entries if c["b"] is not None]
    assert list(dict.fromkeys(pairs)) == [("cleaq_dr", "cleq_dr"), ("cleaq_dr", "dr_only"), ("cleq_dr", "dr_only")]
    assert {(c["metric"], c["subset"]) for c in entries if c["b"] == "dr_only"} == {
        ("kappa", s) for s in ("usable", "reject", "all")}  # DR alone has no enhancement and no vessels
    assert [(c["metric"], c["subset"]) for c in entries if (c["a"], c["b"]) == ("cleaq_dr", "cleq_dr")] == [
        (m, s) for _, m, subsets in plan.COMPARISON_METRICS for s in subsets]


def test_each_variant_with_vessels_reports_its_own_dice_gain_over_seeds():
    got = _by_key(collect.comparisons(EVALS))
    own = got[("cleaq_dr", None, plan.VESSEL_DICE_GAIN, "reject")]
    assert own["values"] == pytest.approx([0.10, 0.07, 0.06], rel=RTOL)
    assert (own["n"], own["n_expected"]) == (3, 3) and own["detected"] is True
    assert got[("cleq_dr", None, plan.VESSEL_DICE_GAIN, "usable")]["n_expected"] == 3
    assert not any(c["a"] == "dr_only" and c["b"] is None for c in got.values())


# --------------------------------------------------------------------------- results.md
def test_the_comparisons_table_states_the_rule_and_a_verdict_per_row(monkeypatch):
    # dr_qt enters plan.VARIANTS with the study's other controls; its title is set here so that this test
    # does not depend on them.
    monkeypatch.setitem(plan.VARIANTS, "dr_qt", "DR alone, QT and stage-3 schedule")
    evals = {**EVALS, "dr_qt": {0: _eval(0.60), 1: _eval(0.50), 2: _eval(0.60)}}
    lines = tables.comparisons_section(collect.comparisons(evals))
    assert lines[0] == "## Pre-declared comparisons (paired by seed, 95% intervals)"
    assert "excludes 0" in lines[2] and "95%" in lines[2] and "80%" in lines[2]
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[:3]): line for line in lines[6:-1]}
    assert lines[4].startswith("| A − B | metric | subset | seeds (n) | mean difference |")
    detected = rows[("CLEAQ-DR", "vessel Dice, enhanced − input", "reject")]
    c = _by_key(collect.comparisons(evals))[("cleaq_dr", None, plan.VESSEL_DICE_GAIN, "reject")]
    assert detected.endswith("| detected |") and f"[{c['t_low']:.3f}, {c['t_high']:.3f}]" in detected
    assert f"[{c['boot_low']:.3f}, {c['boot_high']:.3f}]" in detected and f"{c['smallest_detectable']:.3f}" in detected
    assert rows[("DR alone, QT and stage-3 schedule − DR grading", "DR kappa", "all")].endswith(
        "| not detected at this power |")
    assert "| 2 of 3 |" in rows[("CLEAQ-DR − CLEQ-DR", "DR kappa", "usable")]
    assert "| 2 of 3 |" in rows[("CLEAQ-DR − CLEQ-DR", "PSNR enhanced (dB)", "usable")]
    assert tables.comparisons_section([]) == []


def _study():
    return {"command": "python -m cleaq_jax.programs.ablations", "data_dir": "/d", "eval_split": "test",
            "data": {"test": {"num_records": 9, "quality": {"good": 3, "usable": 3, "reject": 3}}},
            "overrides": {}, "preset": "tiny", "num_epochs": 1, "seeds": [0, 1, 2], "machine": "test", "jobs": 1,
            "load_average": [0.0, 0.0], "wall_s": 1.0, "example_command": "python -m cleaq_jax.main"}


def test_results_md_opens_with_the_comparisons_read_from_the_runs_eval_json(tmp_path):
    runs = plan.plan_runs(str(tmp_path), ["dr_only", "cleq_dr", "cleaq_dr"], range(3), {"data.dir": "/d"})
    for run in runs:
        e = EVALS[run["variant"]][run["seed"]]
        if e is not None:
            os.makedirs(os.path.join(run["dir"], run["stage"], "eval"))
            with open(os.path.join(run["dir"], run["stage"], "eval", "eval.json"), "w") as f:
                json.dump(e, f)
    collected = collect.collect_results(runs)
    assert collected["comparisons"] == collect.comparisons(EVALS)
    text = tables.results_markdown({"study": _study(), **collected})
    assert text.index("## Pre-declared comparisons") < text.index("## DR grading")
    assert "| CLEAQ-DR − CLEQ-DR | DR kappa | usable | 2 of 3 |" in text
