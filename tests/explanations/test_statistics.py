"""Paired bootstrap statistics (explanations/statistics.py): the study's comparisons and the report comparison."""

from __future__ import annotations

import math

import pytest
import torch

from explanations.statistics import PairedDiff, paired_bootstrap, rank_correlation, seeds_agree


def test_paired_bootstrap_resolves_a_small_consistent_gain_that_unpaired_bands_miss():
    g = torch.Generator().manual_seed(0)
    difficulty = torch.rand(200, generator=g)  # per-image difficulty dominates the spread
    a = difficulty + 0.02 + 0.005 * torch.randn(200, generator=g)
    b = difficulty
    res = paired_bootstrap(a, b, resamples=4000, seed=1)
    assert res.n == 200 and res.sign == 1
    assert 0.018 < res.paired_diff < 0.022 and res.ci_low > 0.015 and res.ci_high < 0.025
    # unpaired 2-SE bands overlap: the per-method spread (~0.29) swamps the 0.02 gain
    se = math.sqrt(a.var().item() / 200 + b.var().item() / 200)
    assert 2 * se > 0.02


def test_paired_bootstrap_matches_normal_theory_and_is_seeded():
    g = torch.Generator().manual_seed(3)
    d = torch.randn(400, generator=g, dtype=torch.float64)
    res = paired_bootstrap(d, torch.zeros(400), resamples=8000, seed=0)
    half = 1.96 * d.std().item() / math.sqrt(400)
    assert abs((res.ci_high - res.ci_low) / 2 - half) < 0.1 * half
    assert res == paired_bootstrap(d, torch.zeros(400), resamples=8000, seed=0)
    assert res.sign == 0 or abs(res.paired_diff) > 0.05


def test_paired_bootstrap_drops_nan_pairs_and_refuses_bad_input():
    res = paired_bootstrap([1.0, float("nan"), 3.0, 4.0], [0.0, 0.0, 1.0, 1.0], resamples=100)
    assert res.n == 3 and res.paired_diff == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    with pytest.raises(ValueError, match="same images: got 3 and 2"):
        paired_bootstrap([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 2 images"):
        paired_bootstrap([1.0], [0.0])
    with pytest.raises(ValueError, match="level=1.5"):
        paired_bootstrap([1, 2], [0, 0], level=1.5)


def test_seeds_agree_needs_every_seed_resolved_on_one_side():
    up = PairedDiff(0.05, 0.01, 0.09, 200, 0.95)
    down = PairedDiff(-0.05, -0.09, -0.01, 200, 0.95)
    open_ = PairedDiff(0.02, -0.01, 0.05, 200, 0.95)
    assert seeds_agree([up, up, up]) and seeds_agree([down, down])
    assert not seeds_agree([up, up, open_]) and not seeds_agree([up, down]) and not seeds_agree([])


def test_rank_correlation():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, rel=1e-6)  # ties: average ranks
    assert math.isnan(rank_correlation([1, 2], [2, 1]))
    assert math.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))
