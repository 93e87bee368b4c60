import math

import pytest
import torch
from torch import nn

from explanations.regularizers import (
    adaptive_weight,
    curvature_term,
    frozen_batchnorm_stats,
    gap_term,
    grad_norm_term,
    safe_norm,
)
from explanations.saliency import input_gradient, saliency_from_gradient


def test_gap_term_hand_computed():
    s = torch.tensor([[5.0, 1.0, 4.0, 0.5, 3.0, 2.0]])  # order: 0(5) 2(4) 4(3) 5(2) 1(1) 3(0.5)
    # boundary, k=2: top {5,4} vs next {3,2}
    assert gap_term(s, 2, "boundary").item() == pytest.approx(-((5 + 4) - (3 + 2)))
    # all, k=2: mean top 4.5 vs mean rest (3+2+1+0.5)/4
    assert gap_term(s, 2, "all").item() == pytest.approx(-(4.5 - 6.5 / 4))
    # minmax, k=3, m=1: smallest top (3) vs largest rest (2)
    assert gap_term(s, 3, "minmax", m=1).item() == pytest.approx(-(3 - 2))
    # minmax with m=k equals boundary
    assert gap_term(s, 2, "minmax", m=2).item() == pytest.approx(gap_term(s, 2, "boundary").item())
    # next block shorter than k (2k > n) and k = n stay finite
    assert gap_term(s, 4, "boundary").item() == pytest.approx(-((5 + 4 + 3 + 2) - (1 + 0.5)))
    assert gap_term(s, 6, "all").item() == pytest.approx(-(15.5 / 6))
    assert torch.isfinite(gap_term(torch.zeros(2, 6), 6, "minmax")).all()


def test_gap_term_errors():
    s = torch.rand(2, 6)
    with pytest.raises(ValueError, match="pair_set='pairs'"):
        gap_term(s, 2, "pairs")
    with pytest.raises(ValueError, match="k=7"):
        gap_term(s, 7)
    with pytest.raises(ValueError, match="m=3"):
        gap_term(s, 2, "minmax", m=3)


def test_gap_gradient_flows_only_through_scores():
    s = torch.tensor([[5.0, 1.0, 4.0, 0.5, 3.0, 2.0]], requires_grad=True)
    (g,) = torch.autograd.grad(gap_term(s, 2).sum(), s)
    assert g.tolist() == [[-1.0, 0.0, -1.0, 0.0, 1.0, 1.0]]


class Quadratic(nn.Module):
    """logits = [0.5 * sum(a * x^2), 0]: input gradient a * x, known in closed form."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, x):
        z = 0.5 * (self.a * x * x).flatten(1).sum(1)
        return torch.stack([z, torch.zeros_like(z)], 1)


def test_curvature_term_hand_computed():
    torch.manual_seed(0)
    a = torch.rand(1, 2, 3, 3, dtype=torch.float64) + 0.5
    model = Quadratic(a).double()
    x = torch.rand(2, 2, 3, 3, dtype=torch.float64)
    g = input_gradient(model, x, None, "logit", create_graph=True).grad
    torch.testing.assert_close(g, a * x)
    h = 1e-3
    r_h = curvature_term(model, x, None, g, h, "logit")
    u = torch.sign(a * x) / math.sqrt(18)
    expected = (a * u).flatten(1).norm(dim=1)  # (g(x+hu) - g(x)) / h = a * u exactly
    torch.testing.assert_close(r_h, expected)
    (grad_a,) = torch.autograd.grad(r_h.sum(), model.a)
    assert grad_a.abs().sum() > 0


def test_curvature_zero_difference_has_finite_gradient():
    v = torch.zeros(2, 3, requires_grad=True)
    (g,) = torch.autograd.grad(safe_norm(v).sum(), v)
    assert torch.isfinite(g).all()
    with pytest.raises(ValueError, match="h=0"):
        curvature_term(nn.Identity(), torch.rand(1, 1, 2, 2), None, torch.rand(1, 1, 2, 2), h=0)


def test_grad_norm_and_adaptive_weight():
    g = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 3.0]]]])
    assert grad_norm_term(g).tolist() == [5.0, 9.0]
    lam = adaptive_weight(0.5, torch.tensor(1.0), torch.tensor(-4.0))
    assert lam.item() == pytest.approx(0.5 * 2.0 / 4.0)


def test_batchnorm_stats_frozen_for_extra_passes():
    bn = nn.BatchNorm2d(2).train()
    before = bn.running_mean.clone()
    with frozen_batchnorm_stats(bn):
        bn(torch.randn(4, 2, 3, 3) + 5)
    torch.testing.assert_close(bn.running_mean, before)
    assert bn.momentum == 0.1
    bn(torch.randn(4, 2, 3, 3) + 5)
    assert not torch.allclose(bn.running_mean, before)


def test_optimizing_gap_term_alone_widens_topk_margin():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Softplus(beta=2.0), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
    x = torch.rand(16, 3, 8, 8)
    y = torch.randint(0, 4, (16,))
    k = 6

    def margin():
        g = input_gradient(model, x, y, create_graph=True).grad
        return gap_term(saliency_from_gradient(g), k).mean()

    start = -margin().item()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        r_g = margin()
        r_g.backward()
        assert sum(p.grad.abs().sum() for p in model.parameters()) > 0
        opt.step()
    end = -margin().item()
    assert end > 1.5 * start, (start, end)
