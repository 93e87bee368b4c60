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
    THICKNESS_PAIR_SETS,
    thickness_estimates,
    topk_thickness,
    union_values,
)
from explanations.saliency import topk_mask
from explanations.streams import THICKNESS_STREAM


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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


# ------------------------------------------------------------------ trapezoid and boundary thickness
class Quadratic(nn.Module):
    """Logit 0 = 0.5 * sum_p w_p x_p^2 on a one-channel image: saliency s_p = |w_p x_p|."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone(), requires_grad=False)

    def forward(self, x):
        z = 0.5 * (self.w * x.pow(2).sum(1)).flatten(1).sum(1)
        return torch.stack([z, torch.zeros_like(z)], 1)


def _brute_thickness(model, x, k, eps, num_samples, num_points, seed, ids, pairs):
    """The definition, one image, draw and point at a time, with the Quadratic model's saliency in
    closed form (s_p = w_p x_p, ties by index): end point d of image i is clip(x_i + U(-eps, eps))
    on stream THICKNESS_STREAM + d; f(t) = the share of (top-k, other) pairs of the clean ranking
    still in order at x_i + t (end - x_i); the trapezoid rule over t = j / m; the mean over draws."""
    from explanations.pgd import uniform_in_ball

    w = model.w[0].flatten().tolist()

    def order(image):  # features by decreasing saliency w_p x_p
        s = [wp * xp for wp, xp in zip(w, image[0, 0].flatten().tolist())]
        return sorted(range(len(s)), key=lambda p: (-s[p], p))

    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        order0 = order(xi)
        top = order0[:k]
        others = order0[k:] if pairs == "all" else order0[k : 2 * k]
        total = 0.0
        for draw in range(num_samples):
            end = uniform_in_ball(xi, eps, ids[i : i + 1], seed, stream=THICKNESS_STREAM + draw)
            f = []
            for j in range(num_points + 1):
                pos = {p: r for r, p in enumerate(order(xi + (j / num_points) * (end - xi)))}
                kept = sum(pos[a] < pos[b] for a in top for b in others)
                f.append(kept / (len(top) * len(others)))
            total += sum((f[j] + f[j + 1]) / 2 for j in range(num_points)) / num_points
        out.append(total / num_samples)
    return torch.tensor(out, dtype=torch.float64)


def test_thickness_estimates_equal_the_definition_for_both_pair_sets():
    g = torch.Generator().manual_seed(3)
    model = Quadratic(torch.rand(1, 4, 4, generator=g, dtype=torch.float64) + 0.5)
    x = 0.5 + 0.05 * torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64)
    ids = torch.tensor([4, 0, 9])
    kw = dict(k=3, eps=0.1, num_samples=2, num_points=3, seed=7)
    both = thickness_estimates(model, x, None, target="logit", ids=ids, **kw)  # one set of passes
    assert set(both) == set(THICKNESS_PAIR_SETS)
    for pairs in THICKNESS_PAIR_SETS:
        want = _brute_thickness(model, x, ids=ids, pairs=pairs, **kw)
        assert (want < 1).any()  # the case is not trivially 1
        torch.testing.assert_close(both[pairs], want)
        torch.testing.assert_close(topk_thickness(model, x, None, target="logit", ids=ids, pairs=pairs, **kw), want)


def test_boundary_thickness_separates_a_fragile_from_a_robust_model():
    n, k = 64, 8
    x = torch.full((4, 1, 8, 8), 0.5, dtype=torch.float64)
    x += 0.02 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # fragile: weights fall off slowly, so ranks k and k+1 are close; robust: a wide gap after rank k
    fragile = Quadratic(torch.linspace(1.0, 0.85, n, dtype=torch.float64).view(1, 8, 8))
    robust_w = torch.linspace(1.0, 0.85, n, dtype=torch.float64)
    robust_w[:k] += 1.0
    robust = Quadratic(robust_w.view(1, 8, 8))
    kw = dict(k=k, eps=8 / 255, num_samples=4, num_points=4, target="logit")
    est = {name: thickness_estimates(m, x, None, **kw) for name, m in (("fragile", fragile), ("robust", robust))}
    f_b, r_b = est["fragile"]["boundary"].mean(), est["robust"]["boundary"].mean()
    f_a, r_a = est["fragile"]["all"].mean(), est["robust"]["all"].mean()
    assert r_b == 1.0 and r_a == 1.0
    assert f_b < r_b - 0.15, (f_b, r_b)
    assert (r_b - f_b) > 3 * (r_a - f_a), (f_b, f_a)  # the boundary pairs carry the difference
    with pytest.raises(ValueError, match="pairs"):
        topk_thickness(fragile, x, None, pairs="next", **kw)


def test_metrics_compute_in_float32_for_bf16_inputs():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 20, generator=g).bfloat16()
    b = (a.float() + 0.1 * torch.rand(3, 20, generator=g)).bfloat16()
    assert precision_at_k(a, b, 5).dtype == torch.float32
    assert rank_correlation(a, b, 5).dtype == torch.float32
    assert kept_pair_fraction(a, topk_mask(a, 5)).dtype == torch.float32
    torch.testing.assert_close(precision_at_k(a, b, 5), precision_at_k(a.float(), b.float(), 5))
