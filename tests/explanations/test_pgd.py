"""The one set of PGD helpers: projections onto the l_inf / l2 ball and [0, 1], seeded starts."""

from __future__ import annotations

import pytest
import torch

from explanations.pgd import project, project_delta, random_start, uniform_in_ball


def _data(b: int = 5):
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, 3, 6, 6, generator=g, dtype=torch.float64), g


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projections_land_in_the_ball_and_the_box(norm):
    x, g = _data()
    far = x + 3 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    eps = 0.1 if norm == "linf" else 0.5
    p = project(far, x, eps, norm)
    d = project_delta(far - x, x, eps, norm)
    for delta in (p - x, d):
        size = delta.flatten(1).abs().amax(1) if norm == "linf" else delta.flatten(1).norm(dim=1)
        assert (size <= eps + 1e-12).all()
        assert ((x + delta) >= 0).all() and ((x + delta) <= 1).all()
    inside = x + 0.5 * project_delta(far - x, x, eps, norm)
    torch.testing.assert_close(project(inside.clamp(0, 1), x, eps, norm), inside.clamp(0, 1))  # a point inside stays
    unclipped = project(far, x, 0.1, "linf", clip=False)
    assert (unclipped < 0).any() or (unclipped > 1).any()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_seeded_random_start_is_per_sample_and_in_the_ball(norm):
    x, _ = _data(6)
    ids = torch.tensor([9, 2, 5, 0, 7, 3])
    eps = 0.05 if norm == "linf" else 0.3
    batched = random_start(x, eps, norm, ids=ids, seed=11, stream=2)
    singles = torch.cat([random_start(x[i : i + 1], eps, norm, ids=ids[i : i + 1], seed=11, stream=2) for i in range(6)])
    torch.testing.assert_close(batched, singles, rtol=0, atol=0)
    size = batched.flatten(1).abs().amax(1) if norm == "linf" else batched.flatten(1).norm(dim=1)
    assert (size <= eps + 1e-12).all() and (size > 0).all()
    assert not torch.equal(batched, random_start(x, eps, norm, ids=ids, seed=11, stream=3))


def test_generator_start_and_uniform_in_ball_are_the_previous_draws():
    x, _ = _data(4)
    got = random_start(x, 0.1, "linf", torch.Generator().manual_seed(3))
    want = ((torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) * 2 - 1) * 0.1).to(x.dtype)
    torch.testing.assert_close(got, (x + want).clamp(0, 1) - x)
    from explanations.explainers import seeded_uniform

    u = seeded_uniform(torch.arange(4), (3, 6, 6), 5, 1, x.dtype)
    torch.testing.assert_close(uniform_in_ball(x, 0.2, None, 5, stream=1), (x + 0.2 * (2 * u - 1)).clamp(0, 1))
