"""Paired bootstrap statistics (explanations/statistics.py): the study's comparisons and the report comparison."""

from __future__ import annotations

import math

import pytest
import torch

from explanations.statistics import (
    Curve,
    PairedDiff,
    interpolate_curve,
    matched_bootstrap,
    paired_bootstrap,
    rank_correlation,
    seeds_agree,
)


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


# ---------------------------------------------------------------- matched accuracy
def _flat(acc_by_setting, value_by_setting, n=50, seeds=(0, 1)):
    """A curve whose every image has the same value per setting, identical over seeds."""
    return Curve([{s: a for s in seeds} for a in acc_by_setting],
                 [{s: torch.full((n,), v, dtype=torch.float64) for s in seeds} for v in value_by_setting])


def test_matched_interpolation_known_answer():
    # a: 0.9 -> 0.2, 0.8 -> 0.6: at 0.85 halfway, 0.4. b: 0.95 -> 0.1, 0.75 -> 0.5: at 0.85 halfway, 0.3
    a = _flat([0.9, 0.8], [0.2, 0.6])
    b = _flat([0.95, 0.75], [0.1, 0.5])
    res = matched_bootstrap(a, b, accuracy=0.85, resamples=500)
    assert res.value_a == pytest.approx(0.4) and res.value_b == pytest.approx(0.3)
    assert res.paired_diff == pytest.approx(0.1)
    assert res.ci_low == pytest.approx(0.1) and res.ci_high == pytest.approx(0.1)  # no noise: a point
    assert res.defined == 1.0 and res.bracket_a == (0, 1) and res.bracket_b == (0, 1)
    assert set(res.per_seed) == {0, 1} and res.seeds_agree and res.sign == 1
    # at 0.82 a is 0.8 of the way (0.52), b 0.65 of the way (0.36)
    assert matched_bootstrap(a, b, accuracy=0.82, resamples=10).paired_diff == pytest.approx(0.52 - 0.36)
    # outside a curve's accuracies there is no comparison
    assert matched_bootstrap(a, b, accuracy=0.93, resamples=10) is None
    # an anchor (one setting) is compared at its own accuracy
    anchor = _flat([0.85], [0.25])
    res = matched_bootstrap(a, anchor, resamples=100)
    assert res.accuracy == pytest.approx(0.85) and res.paired_diff == pytest.approx(0.4 - 0.25)
    assert res.bracket_b == (0,)


def test_matched_interpolation_per_image_and_first_crossing():
    # per image: image i has value i/10 at the weak setting and 1 at the strong one
    n = 10
    weak = torch.arange(n, dtype=torch.float64) / 10
    a = Curve([{0: 0.9}, {0: 0.7}, {0: 0.8}], [{0: weak}, {0: torch.ones(n)}, {0: torch.zeros(n)}])
    acc, val = torch.tensor([[0.9], [0.7], [0.8]], dtype=torch.float64), torch.stack([weak, torch.ones(n), torch.zeros(n)])[:, None]
    v, ok, seg = interpolate_curve(acc, val, torch.tensor([0.75], dtype=torch.float64))
    # 0.75 lies on segment 0 (0.9 -> 0.7, t = 0.75) and on segment 1 (0.7 -> 0.8): the first one counts
    assert bool(ok[0]) and int(seg[0]) == 0
    torch.testing.assert_close(v[0], weak + 0.75 * (1 - weak))
    assert matched_bootstrap(a, _flat([0.75], [0.0], n=n, seeds=(0,)), resamples=10).paired_diff == pytest.approx(
        float((weak + 0.75 * (1 - weak)).mean()))


def test_matched_bootstrap_samples_the_training_seeds():
    """Seeds that disagree widen the interval; images are resampled in pairs; the result is seeded."""
    g = torch.Generator().manual_seed(0)
    n = 200
    difficulty = torch.rand(n, generator=g, dtype=torch.float64)

    def curve(offsets, gain):
        # two settings; seed s shifts every image by offsets[s]
        return Curve([{s: 0.9 for s in range(len(offsets))}, {s: 0.8 for s in range(len(offsets))}],
                     [{s: difficulty + o for s, o in enumerate(offsets)},
                      {s: difficulty + gain + o for s, o in enumerate(offsets)}])

    b = curve([0.0, 0.0], 0.0)
    calm = matched_bootstrap(curve([0.05, 0.05], 0.1), b, accuracy=0.85, resamples=2000)
    noisy = matched_bootstrap(curve([0.0, 0.1], 0.1), b, accuracy=0.85, resamples=2000)
    assert calm.paired_diff == pytest.approx(0.1) and noisy.paired_diff == pytest.approx(0.1)
    # paired over images: the shared difficulty cancels, so without seed noise the interval is a point
    assert calm.ci_high - calm.ci_low < 1e-9
    # seed noise: a replicate draws seed 0 twice (diff 0.05), seed 1 twice (0.15) or one each (0.1)
    assert noisy.ci_low == pytest.approx(0.05) and noisy.ci_high == pytest.approx(0.15)
    assert noisy.per_seed[0].paired_diff == pytest.approx(0.05) and noisy.per_seed[1].paired_diff == pytest.approx(0.15)
    assert noisy == matched_bootstrap(curve([0.0, 0.1], 0.1), b, accuracy=0.85, resamples=2000)
    # accuracies redrawn with the seeds: a seed whose accuracy misses the target leaves replicates out
    shaky = Curve([{0: 0.9, 1: 0.86}, {0: 0.8, 1: 0.84}], [{0: difficulty, 1: difficulty}, {0: difficulty, 1: difficulty}])
    res = matched_bootstrap(shaky, b, accuracy=0.87, resamples=1000)
    assert 0.5 < res.defined < 1.0  # the replicates drawing seed 1 twice (~1/4 per setting) miss 0.87
    assert 1 not in res.per_seed and 0 in res.per_seed and not res.seeds_agree  # one seed alone never agrees
    with pytest.raises(ValueError, match="needs b with one setting"):
        matched_bootstrap(b, b)
    with pytest.raises(ValueError, match="seeds \\[0\\] of the accuracies and \\[1\\]"):
        Curve([{0: 0.9}], [{1: difficulty}])


def test_a_setting_both_curves_share_is_redrawn_once():
    """Two curves that start at the same runs (keys) differ by exactly 0 there, in every replicate."""
    g = torch.Generator().manual_seed(0)
    start = {s: torch.rand(30, generator=g, dtype=torch.float64) for s in range(3)}
    acc = {0: 0.91, 1: 0.91, 2: 0.91}  # the start at 0.91 in every replicate: t = 0 there
    a = Curve([acc, {0: 0.8, 1: 0.8, 2: 0.8}], [start, {s: torch.ones(30) for s in range(3)}], keys=["sp", "a1"])
    b = Curve([acc, {0: 0.7, 1: 0.7, 2: 0.7}], [start, {s: torch.zeros(30) for s in range(3)}], keys=["sp", "b1"])
    at_start = matched_bootstrap(a, b, accuracy=0.91, resamples=500)
    assert at_start.paired_diff == pytest.approx(0.0) and at_start.ci_low == at_start.ci_high == pytest.approx(0.0)
    unnamed = matched_bootstrap(Curve(a.accuracy, a.values), Curve(b.accuracy, b.values), accuracy=0.91, resamples=500)
    assert unnamed.ci_high - unnamed.ci_low > 0.05  # drawn independently, the shared runs look like noise
