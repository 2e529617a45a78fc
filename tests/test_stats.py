"""The shared statistic (diffplug.evals.stats) against scipy's paired and Welch t statistics."""

import math

import numpy as np
import pytest
import torch
from scipy import stats as sp

from diffplug.evals.stats import gain, mean_se


def test_mean_se_matches_scipy_sem():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=57)
    m = mean_se(torch.tensor(x))
    assert m.n == 57 and m.mean == pytest.approx(x.mean()) and m.se == pytest.approx(sp.sem(x))


def test_paired_z_is_scipy_ttest_rel_and_two_sample_z_is_welch():
    rng = np.random.default_rng(1)
    base = rng.normal(size=200)  # the seed's effect dominates both models' scores
    tuned = base + 0.05 + 0.1 * rng.normal(size=200)
    g = gain(base, tuned)
    assert g.gain == pytest.approx(tuned.mean() - base.mean())
    assert g.z_paired == pytest.approx(sp.ttest_rel(tuned, base).statistic)
    assert g.z_two_sample == pytest.approx(sp.ttest_ind(tuned, base, equal_var=False).statistic)
    assert g.z_paired > 3 > g.z_two_sample  # pairing removes the seeds' spread


def test_n1_has_no_standard_error_and_mismatched_lengths_refuse():
    assert math.isnan(mean_se([2.0]).se) and math.isnan(gain([1.0], [2.0]).z_paired)
    with pytest.raises(ValueError, match="same seeds"):
        gain([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="not finite"):
        mean_se([1.0, float("nan")])
    with pytest.raises(ValueError, match="no values"):
        mean_se([])


def test_gain_round_trips_to_json_ready_dict():
    d = gain([0.0, 1.0, 2.0], [1.0, 2.0, 4.0]).as_dict()
    assert d["gain"] == pytest.approx(4 / 3) and d["base"]["n"] == 3 and set(d) >= {"paired_se", "two_sample_se", "z_paired"}
