"""The ablation study's pre-declared test: `statistics.paired_interval` against hand arithmetic and scipy's
quantiles."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from cleaq_jax.programs.ablations import statistics

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

