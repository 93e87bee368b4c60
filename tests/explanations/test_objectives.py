import pytest
import torch
from torch import nn

from explanations.objectives import OBJECTIVES, ThicknessSurrogate, build_objective


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus(beta=2.0), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)
    )


class CountForwards(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.mark.parametrize(
    "name, forwards, keys",
    [
        ("vanilla", 1, {"ce"}),
        ("r2et", 2, {"ce", "gap", "topk_margin", "lambda_gap", "curvature", "lambda_curvature", "loss"}),
        ("r2et_noh", 1, {"ce", "gap", "topk_margin", "lambda_gap", "loss"}),
        ("r2et_mm", 2, {"ce", "gap", "topk_margin", "lambda_gap", "curvature", "lambda_curvature", "loss"}),
        ("r2et_mm_noh", 1, {"ce", "gap", "topk_margin", "lambda_gap", "loss"}),
        ("est_h", 2, {"ce", "curvature", "lambda_curvature", "loss"}),
        ("grad_norm", 1, {"ce", "grad_norm", "loss"}),
    ],
)
def test_objectives_share_forward_passes_and_log_terms(name, forwards, keys):
    model = CountForwards(make_model()).train()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    out = build_objective(name, k=8)(model, x, y)
    assert model.calls == forwards
    assert set(out.terms) == keys
    assert out.logits.shape == (4, 5)
    assert torch.isfinite(out.loss)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in model.parameters())


def test_adaptive_weights_balance_terms_against_ce():
    model = make_model().train()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    out = build_objective("r2et", k=8, weight=0.5)(model, x, y)
    ce = out.terms["ce"].item()
    balanced = (out.terms["lambda_gap"] * out.terms["gap"].abs()).item()
    assert balanced == pytest.approx(0.5 * (ce + 1), rel=1e-5)
    fixed = build_objective("r2et", k=8, adaptive=False, weight_gap=2.0, weight_curvature=3.0)(model, x, y)
    assert fixed.terms["lambda_gap"].item() == 2.0 and fixed.terms["lambda_curvature"].item() == 3.0
    expected = fixed.terms["ce"] + 2.0 * fixed.terms["gap"] + 3.0 * fixed.terms["curvature"]
    assert fixed.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_pair_set_forced_for_minmax_objectives():
    assert build_objective("r2et_mm", pair_set="boundary").pair_set == "minmax"
    assert build_objective("r2et", pair_set="all").pair_set == "all"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(pair_set="nope"), "pair_set='nope'"),
        (dict(weight=-1.0), "weight=-1.0"),
        (dict(h=0.0), "h=0.0"),
        (dict(target="prob"), "target='prob'"),
        (dict(gap=False, curvature=False), "needs the gap term"),
    ],
)
def test_bad_configuration_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ThicknessSurrogate(**kwargs)


def test_unknown_objective_lists_valid_names():
    with pytest.raises(ValueError, match="objective='r3et'.*r2et"):
        build_objective("r3et")
    assert {"vanilla", "r2et", "r2et_noh", "r2et_mm", "est_h", "grad_norm"} <= set(OBJECTIVES)


def test_k_out_of_range_fails_early_with_value():
    model = make_model()
    with pytest.raises(ValueError, match="k=65"):
        build_objective("r2et_noh", k=65)(model, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_registered_objective_trains_and_its_metadata_holds(name, monkeypatch):
    """Each registry entry: a finite loss with finite parameter gradients; ``double_backprop`` is
    true exactly when the loss is built from a graph-carrying input gradient; ``uses_k`` exactly
    when ``k`` changes the loss (its ``k_option``, when it has one, too)."""
    entry = OBJECTIVES[name]
    x, y = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3])
    create_graph: list[bool] = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **kw: create_graph.append(bool(kw.get("create_graph"))) or grad(*a, **kw))

    def loss(**config):
        model = make_model().train()
        torch.manual_seed(1)  # the curvature term's random direction
        out = build_objective(name, steps=1, **config)(model, x, y)  # (steps: the AT attack's option)
        assert torch.isfinite(out.loss) and out.logits.shape == (4, 5) and "ce" in out.terms
        assert all(torch.isfinite(g).all() for g in grad(out.loss, list(model.parameters()), allow_unused=True) if g is not None)
        return out.loss.detach()

    base = loss(k=8, adaptive=False)  # (adaptive weights make l_G R_G independent of |R_G|)
    assert any(create_graph) == entry.double_backprop, create_graph
    assert build_objective(name).double_backprop == entry.double_backprop
    assert (not torch.equal(loss(k=24, adaptive=False), base)) == entry.uses_k
    if entry.k_option is not None:
        assert not torch.equal(loss(k=8, adaptive=False, **{entry.k_option: 24}), base)
