"""Property-based tests (hypothesis) of the framework-free core.

- P@k is in [0, 1], symmetric in its two maps, 1 for identical maps;
- top-k is stable under ties: the k largest entries, ties broken by the lower index, whatever the
  values' dtype, and equal to a brute-force stable sort;
- the kept-pair fraction (the thickness integrand) equals a brute-force pair count and is in
  [0, 1]; the Monte-Carlo thickness of random models is in [0, 1];
- every registered attack (sign and l2 steps, random start or not, where it takes them) returns finite images
  inside the eps-ball and [0, 1] for random models and inputs;
- PSE categories partition the samples: exactly one category each, matching the definitions.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from explanations.attacks import ATTACKS, build_attack
from explanations.pse import (
    BALANCED, CATEGORIES, CUTOFF_TOLERANCE, INEFFECTIVE, PROMOTION, SUPPRESSION, categorize, pse_from_logits,
)
from explanations.ranking_metrics import kept_pair_fraction, precision_at_k, topk_thickness
from explanations.saliency import ranking, topk_indices, topk_mask

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@st.composite
def saliency_pairs(draw, max_n: int = 24):
    """Two (B, n) maps with many ties (values from a small set, zeros included) and a k in [1, n]."""
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, max_n))
    levels = draw(st.sampled_from([2, 4, 1000]))
    values = st.integers(0, levels - 1)
    a = torch.tensor(draw(st.lists(values, min_size=b * n, max_size=b * n)), dtype=torch.float32).view(b, n)
    c = torch.tensor(draw(st.lists(values, min_size=b * n, max_size=b * n)), dtype=torch.float32).view(b, n)
    k = draw(st.integers(1, n))
    return a / levels, c / levels, k


@FAST
@given(saliency_pairs())
def test_precision_at_k_range_symmetry_identity(pair):
    a, b, k = pair
    p = precision_at_k(a, b, k)
    assert p.shape == (a.shape[0],)
    assert ((p >= 0) & (p <= 1)).all()
    assert torch.equal(p, precision_at_k(b, a, k))
    assert torch.equal(precision_at_k(a, a, k), torch.ones_like(p))
    assert torch.equal(precision_at_k(a, b, a.shape[1]), torch.ones_like(p))  # k = n
    # multiples of 1/k
    assert torch.allclose(p * k, (p * k).round())


@FAST
@given(saliency_pairs(), st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_topk_is_stable_under_ties(pair, dtype):
    s, _, k = pair
    s = s.to(dtype)
    top = topk_indices(s, k)
    for row, idx in zip(s.tolist(), top.tolist()):
        expected = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
        assert idx == expected
    order = ranking(s)
    assert torch.equal(order.sort(1).values, torch.arange(s.shape[1]).expand_as(order))  # a permutation
    assert torch.equal(topk_mask(s, k).sum(1), torch.full((s.shape[0],), k))
    # scaling by a positive factor or adding a constant does not change a stable ranking (in float64,
    # where s * 3 + 1 is exact; in bf16 it can round distinct values into ties)
    assert torch.equal(topk_indices(s.double() * 3 + 1, k), top)


def _brute_kept(s_row, top_row):
    order = sorted(range(len(s_row)), key=lambda i: (-s_row[i], i))
    pos = {f: r for r, f in enumerate(order)}
    ins = [i for i, t in enumerate(top_row) if t]
    outs = [j for j, t in enumerate(top_row) if not t]
    if not ins or not outs:
        return 1.0
    return sum(pos[i] < pos[j] for i in ins for j in outs) / (len(ins) * len(outs))


@FAST
@given(saliency_pairs(max_n=16), st.data())
def test_kept_pair_fraction_matches_brute_force_and_is_in_unit_interval(pair, data):
    s, _, _ = pair
    n = s.shape[1]
    bits = data.draw(st.lists(st.booleans(), min_size=s.numel(), max_size=s.numel()))
    top = torch.tensor(bits).view_as(s)
    kept = kept_pair_fraction(s, top)
    assert ((kept >= 0) & (kept <= 1)).all()
    for row, t, value in zip(s.tolist(), top.tolist(), kept.tolist()):
        assert value == pytest.approx(_brute_kept(row, t), abs=1e-6)
    # the map's own top-k always keeps every pair
    k = max(1, n // 2)
    assert torch.equal(kept_pair_fraction(s, topk_mask(s, k)), torch.ones(s.shape[0]))


def tiny_model(seed: int, activation: str) -> nn.Module:
    torch.manual_seed(seed)
    act = nn.Softplus(beta=2.0) if activation == "softplus" else nn.ReLU()
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), act, nn.Conv2d(4, 4, 3, padding=1, stride=2), act,
        nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    )


@st.composite
def model_and_images(draw):
    seed = draw(st.integers(0, 2**16))
    model = tiny_model(seed, draw(st.sampled_from(["softplus", "relu"])))
    b = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["uniform", "black", "white", "binary"]))
    g = torch.Generator().manual_seed(seed)
    x = {
        "uniform": lambda: torch.rand(b, 3, 8, 8, generator=g),
        "black": lambda: torch.zeros(b, 3, 8, 8),
        "white": lambda: torch.ones(b, 3, 8, 8),
        "binary": lambda: (torch.rand(b, 3, 8, 8, generator=g) > 0.5).float(),
    }[kind]()
    labels = torch.randint(0, 3, (b,), generator=g)
    return model, x, labels


@FAST
@given(
    model_and_images(),
    st.sampled_from(list(ATTACKS)),
    st.floats(0.0, 16 / 255, exclude_min=True),  # eps = 0 and steps = 0 are refused (no attack)
    st.integers(1, 3),
    st.sampled_from(["sign", "l2"]),
    st.booleans(),
    st.sampled_from([1, 8, 0.25, 64]),
)
def test_attack_outputs_stay_in_eps_ball_and_unit_box(case, name, eps, steps, step, random_start, k):
    model, x, labels = case
    model.train()  # the attack must switch to eval and restore the mode
    attack = build_attack(name, model, dict(eps=eps, steps=steps, step=step, random_start=random_start, k=k))
    x_adv = attack(x, labels)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert torch.isfinite(x_adv).all()
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


@FAST
@given(model_and_images(), st.floats(0.0, 16 / 255, exclude_min=True), st.sampled_from([1, 5, 0.5, 64]))
def test_topk_thickness_in_unit_interval(case, eps, k):
    model, x, labels = case
    t = topk_thickness(model, x, labels, k, eps=eps, num_samples=2, num_points=2)
    assert t.shape == (x.shape[0],) and torch.isfinite(t).all()
    assert ((t >= 0) & (t <= 1)).all()


finite = st.floats(-5, 5, allow_nan=False, width=32)


@FAST
@given(
    st.integers(1, 6).flatmap(lambda b: st.tuples(
        st.just(b), st.lists(finite, min_size=b * 3, max_size=b * 3), st.lists(finite, min_size=b * 3, max_size=b * 3),
        st.lists(st.integers(0, 2), min_size=b, max_size=b), st.lists(st.integers(0, 2), min_size=b, max_size=b),
    )),
    st.floats(0, 1).flatmap(lambda lo: st.tuples(st.just(lo), st.floats(lo, 1))),
)
def test_pse_categories_partition_the_samples(data, cutoffs):
    b, clean, adv, labels, targets = data
    clean = torch.tensor(clean).view(b, 3)
    adv = torch.tensor(adv).view(b, 3)
    out = pse_from_logits(clean, adv, torch.tensor(labels), torch.tensor(targets), cutoffs)
    cat = out.category
    assert cat.shape == (b,)
    one_hot = torch.stack([cat == c for c in range(len(CATEGORIES))], 1)
    assert torch.equal(one_hot.sum(1), torch.ones(b, dtype=torch.long))  # exactly one category each
    assert sum(int((cat == c).sum()) for c in range(len(CATEGORIES))) == b
    lo, hi = cutoffs
    for s, p, phi, c in zip(out.S.tolist(), out.P.tolist(), out.phi.tolist(), cat.tolist()):
        if s <= 0 and p <= 0:
            assert c == INEFFECTIVE and math.isnan(phi)
        elif p <= 0 < s:
            assert c == SUPPRESSION and phi == 0.0
        elif s <= 0 < p:
            assert c == PROMOTION and phi == 1.0
        else:
            assert 0.0 <= phi <= 1.0
            # phi within CUTOFF_TOLERANCE of a cut-off is balanced (categorize's documented rule)
            tol = CUTOFF_TOLERANCE
            assert c == (SUPPRESSION if phi < lo - tol else PROMOTION if phi > hi + tol else BALANCED)
    # group-shaped inputs (B, G) partition the same way
    grouped = categorize(out.S[:, None].expand(b, 4), out.P[:, None].expand(b, 4), cutoffs)
    assert torch.equal(grouped, cat[:, None].expand(b, 4))
