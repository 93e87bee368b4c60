import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from explanations.ranking_metrics import (
    kept_pair_fraction,
    localization_share,
    precision_at_k,
    prediction_flips,
    rank_correlation,
    topk_thickness,
    union_values,
)
from explanations.saliency import topk_mask


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is fastest and does not stall when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_precision_at_k_by_hand():
    s0 = torch.tensor([[9.0, 8, 7, 6, 5, 4], [1, 2, 3, 4, 5, 6]])
    s1 = torch.tensor([[9.0, 1, 7, 6, 5, 4], [6, 5, 4, 3, 2, 1]])
    torch.testing.assert_close(precision_at_k(s0, s1, 3), torch.tensor([2 / 3, 0.0]))
    torch.testing.assert_close(precision_at_k(s0, s0, 0.5), torch.ones(2))
    with pytest.raises(ValueError, match="same shape"):
        precision_at_k(s0, s1[:, :5], 2)


def _avg_ranks(v):
    return [sum(u < x for u in v) + (sum(u == x for u in v) + 1) / 2 for x in v]


def _spearman_ref(a, b):
    ra, rb = _avg_ranks(a), _avg_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return num / den if den > 0 else float("nan")


def _kendall_ref(a, b):
    c = n1 = n2 = n0 = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        sa = (a[i] > a[j]) - (a[i] < a[j])
        sb = (b[i] > b[j]) - (b[i] < b[j])
        n0 += 1
        c += sa * sb
        n1 += sa == 0
        n2 += sb == 0
    den = math.sqrt((n0 - n1) * (n0 - n2))
    return c / den if den > 0 else float("nan")


values = st.lists(st.integers(0, 6), min_size=12, max_size=12)


@settings(max_examples=40, deadline=None)
@given(a=values, b=values, k=st.integers(1, 6))
def test_union_correlations_match_reference(a, b, k):
    s0 = torch.tensor([a], dtype=torch.float64) + torch.arange(12) * 1e-3  # top-k well defined
    s1 = torch.tensor([b], dtype=torch.float64)
    a_u, b_u, valid = union_values(s0, s1, k)
    union = (topk_mask(s0, k) | topk_mask(s1, k))[0]
    idx = union.nonzero().flatten().tolist()
    assert int(valid.sum()) == len(idx)
    ra, rb = [s0[0, i].item() for i in idx], [s1[0, i].item() for i in idx]
    for method, ref in (("spearman", _spearman_ref), ("kendall", _kendall_ref)):
        got = rank_correlation(s0, s1, k, method).item()
        want = ref(ra, rb)
        if math.isnan(want):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(want, abs=1e-9)


def test_correlation_extremes_and_batch_shape():
    s = torch.rand(5, 30, generator=torch.Generator().manual_seed(0))
    for method in ("spearman", "kendall"):
        torch.testing.assert_close(rank_correlation(s, s, 4, method), torch.ones(5))
        assert rank_correlation(s, -s, 4, method).max() < 0
    with pytest.raises(ValueError, match="rank correlation"):
        rank_correlation(s, s, 4, "pearson")


def test_prediction_flips():
    a = torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, 0.0]])
    b = torch.tensor([[2.0, 3.0], [0.0, 1.0], [3.0, 0.0]])
    torch.testing.assert_close(prediction_flips(a, b), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(prediction_flips(torch.tensor([0, 1]), torch.tensor([0, 0])), torch.tensor([0.0, 1.0]))


@settings(max_examples=40, deadline=None)
@given(v=st.lists(st.integers(0, 5), min_size=2, max_size=15), data=st.data())
def test_kept_pair_fraction_matches_brute_force(v, data):
    n = len(v)
    top = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    s = torch.tensor([v], dtype=torch.float64)
    t = torch.tensor([top])
    # brute force with the stable tie-break: i above j iff s_i > s_j or (s_i == s_j and i < j)
    pairs = [(i, j) for i in range(n) for j in range(n) if top[i] and not top[j]]
    kept = sum(v[i] > v[j] or (v[i] == v[j] and i < j) for i, j in pairs)
    want = kept / len(pairs) if pairs else 1.0
    assert kept_pair_fraction(s, t).item() == pytest.approx(want)


def test_thickness_is_one_when_saliency_does_not_depend_on_the_input():
    # two-class linear model: g = (p_1 - y_1)(W_1 - W_0) is a positive multiple of a fixed map
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 2, (6,))
    thick = topk_thickness(model, x, y, k=8, eps=32 / 255, num_samples=3, num_points=3)
    torch.testing.assert_close(thick, torch.ones(6))
    thick_logit = topk_thickness(model, x, None, k=8, eps=1e-3, num_samples=2, num_points=2, target="logit")
    torch.testing.assert_close(thick_logit, torch.ones(6))


class Fragile(nn.Module):
    """Logit 0 = 0.5 * sum(x^2): the saliency is sum_c |x_c|, its ranking is the pixel order."""

    def forward(self, x):
        z = 0.5 * x.pow(2).flatten(1).sum(1)
        return torch.stack([z, torch.zeros_like(z)], 1)


def test_thickness_is_clearly_lower_for_a_fragile_ranking():
    g = torch.Generator().manual_seed(0)
    x = 0.5 + 0.01 * torch.rand(4, 3, 8, 8, generator=g)  # nearly flat images: a fragile order
    thick = topk_thickness(Fragile(), x, None, k=8, eps=8 / 255, num_samples=4, num_points=4, target="logit")
    assert thick.max() < 0.85
    robust = topk_thickness(Fragile(), x, None, k=8, eps=1e-5, num_samples=2, num_points=2, target="logit")
    assert robust.min() > thick.max()


def test_thickness_batched_equals_per_sample_and_restores_mode():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus(beta=5.0), nn.Flatten(), nn.Linear(256, 3)
    ).double().train()
    x, y = torch.rand(5, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (5,))
    ids = torch.tensor([7, 3, 11, 0, 2])
    kw = dict(k=6, eps=16 / 255, num_samples=2, num_points=3, ids=ids, seed=4)
    batched = topk_thickness(model, x, y, **kw)
    assert model.training
    singles = torch.cat([topk_thickness(model, x[i : i + 1], y[i : i + 1], **{**kw, "ids": ids[i : i + 1]}) for i in range(5)])
    torch.testing.assert_close(batched, singles)
    assert (batched <= 1).all() and (batched > 0.5).all()
    assert all(p.grad is None for p in model.parameters())


def test_localization_share():
    s = torch.tensor([[4.0, 3.0, 2.0, 1.0]])  # a 2 x 2 map
    mask = torch.tensor([[[True, False], [False, True]]])
    torch.testing.assert_close(localization_share(s, mask, 2), torch.tensor([0.5]))
    torch.testing.assert_close(localization_share(s, mask, 2, weighted=True), torch.tensor([4 / 7]))
    torch.testing.assert_close(localization_share(s, mask, 4), torch.tensor([0.5]))
    # pooled: a 4 x 4 mask with the top-left 2 x 2 cell fully inside, the next half inside
    s4 = torch.tensor([[1.0, 0.5, 0.1, 0.0]])
    m4 = torch.zeros(1, 4, 4, dtype=torch.bool)
    m4[0, :2, :2] = True
    m4[0, :2, 2] = True
    torch.testing.assert_close(localization_share(s4, m4, 2, pool=2), torch.tensor([0.75]))
    with pytest.raises(ValueError, match="features"):
        localization_share(s4, m4, 2)
