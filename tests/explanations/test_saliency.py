import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explanations.saliency import (
    explained_scalar,
    input_gradient,
    num_features,
    ranking,
    resolve_k,
    saliency,
    saliency_from_gradient,
    topk_indices,
    topk_mask,
    unit_sign_direction,
)


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(beta=2.0), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    ).double()


@pytest.mark.parametrize("target", ["loss", "logit"])
def test_gradient_matches_finite_differences(target):
    model = small_model()
    x = torch.rand(3, 3, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 3, 4])
    grad = input_gradient(model, x, y, target).grad
    eps = 1e-6
    numeric = torch.zeros_like(x)
    flat = numeric.view(3, -1)
    for j in range(x[0].numel()):
        e = torch.zeros_like(x).view(3, -1)
        e[:, j] = eps
        e = e.view_as(x)
        with torch.no_grad():
            pred = model(x).argmax(1) if target == "logit" else None
            def scalar(z):
                logits = model(z)
                if target == "loss":
                    return F.cross_entropy(logits, y, reduction="none")
                return logits.gather(1, pred[:, None]).squeeze(1)
            flat[:, j] = (scalar(x + e) - scalar(x - e)) / (2 * eps)
    torch.testing.assert_close(grad, numeric, atol=1e-7, rtol=1e-5)
    s = saliency(model, x, y, target)
    torch.testing.assert_close(s, numeric.abs().sum(1).flatten(1), atol=1e-7, rtol=1e-5)


def test_saliency_pooling_and_shapes():
    g = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4) - 40
    s = saliency_from_gradient(g)
    assert s.shape == (2, 16)
    pooled = saliency_from_gradient(g, pool=2)
    assert pooled.shape == (2, 4)
    full = g.abs().sum(1)
    assert torch.isclose(pooled[0, 0], full[0, :2, :2].mean())
    assert num_features(4, 4, 2) == 4
    with pytest.raises(ValueError, match="pool=3"):
        saliency_from_gradient(g, pool=3)


def test_create_graph_switch():
    model = small_model()
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    y = torch.tensor([1, 2])
    assert not input_gradient(model, x, y).grad.requires_grad
    g = input_gradient(model, x, y, create_graph=True).grad
    assert g.requires_grad
    (second,) = torch.autograd.grad(g.abs().sum(), list(model.parameters())[0])
    assert second.abs().sum() > 0


def test_no_parameter_grad_written():
    model = small_model()
    saliency(model, torch.rand(2, 3, 6, 6, dtype=torch.float64), torch.tensor([0, 1]))
    assert all(p.grad is None for p in model.parameters())


def test_resolve_k():
    assert resolve_k(5, 100) == 5
    assert resolve_k(0.1, 100) == 10
    assert resolve_k(100.0, 100) == 100
    assert resolve_k(0.001, 100) == 1
    for bad in (0, -3, 101, 1.5, True, "10"):
        with pytest.raises(ValueError, match="k="):
            resolve_k(bad, 100)


def test_topk_is_stable_under_ties():
    s = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    assert topk_indices(s, 3).tolist() == [[1, 2, 4]]
    assert ranking(s).tolist() == [[1, 2, 4, 3, 0]]
    assert topk_mask(s, 2).tolist() == [[False, True, True, False, False]]
    flat = torch.zeros(1, 6)
    assert topk_indices(flat, 3).tolist() == [[0, 1, 2]]


def test_explained_scalar_errors():
    with pytest.raises(ValueError, match="target='bogus'"):
        explained_scalar(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), "bogus")
    with pytest.raises(ValueError, match="needs labels"):
        explained_scalar(torch.zeros(1, 2), None, "loss")


def test_unit_sign_direction_has_unit_length():
    g = torch.randn(4, 3, 5, 5)
    u = unit_sign_direction(g)
    torch.testing.assert_close(u.flatten(1).norm(dim=1), torch.ones(4))


def test_input_gradient_explains_given_classes_and_returns_zero_for_unused_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.rand(4, 3, 2, 2)
    classes = torch.tensor([2, 0, 1, 2])
    out = input_gradient(model, x, None, "logit", classes=classes)
    torch.testing.assert_close(out.grad, model[1].weight[classes].view(4, 3, 2, 2))
    torch.testing.assert_close(out.scalar, out.logits.gather(1, classes[:, None]).squeeze(1))
    ce = input_gradient(model, x, classes, "loss")
    torch.testing.assert_close(ce.scalar, F.cross_entropy(model(x), classes, reduction="none"))
    const = input_gradient(lambda t: torch.zeros(t.shape[0], 3, requires_grad=True), x, None, "logit")
    assert torch.equal(const.grad, torch.zeros_like(x))
