"""Degenerate inputs never produce NaN/inf: zero saliency, ties, constant and all-black images,
k equal to the number of features, bf16 autocast. Regularizers/objectives must give finite losses
and finite parameter gradients; attacks finite images inside the eps-ball."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import explanations  # noqa: F401  (registers every objective, e.g. ``at``)
from explanations.attacks import ATTACKS, build_attack
from explanations.objectives import OBJECTIVES, build_objective
from explanations.ranking_metrics import kept_pair_fraction, precision_at_k, topk_thickness
from explanations.regularizers import adaptive_weight, gap_term
from lightning_modules.backbones import build_backbone

SIZE = 8
N = SIZE * SIZE


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class ConstantModel(nn.Module):
    """Logits do not depend on the input: every input gradient (saliency) is exactly zero."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.linspace(-1.0, 1.0, classes))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return (self.scale * self.bias).expand(x.shape[0], -1) + 0.0 * x.flatten(1).sum(1, keepdim=True)


class MeanModel(nn.Module):
    """Logits from the per-channel mean: the saliency map is constant (all n features tied)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(3, classes)

    def forward(self, x):
        return self.fc(torch.nn.functional.softplus(x.mean((2, 3)), beta=2.0))


def resnet(activation="softplus"):
    torch.manual_seed(0)
    return build_backbone("resnet9", num_classes=3, width=4, activation=activation, softplus_beta=2.0)


MODELS = {"constant": ConstantModel, "tied": MeanModel, "resnet9": resnet, "resnet9_relu": lambda: resnet("relu")}
IMAGES = {
    "black": lambda: torch.zeros(4, 3, SIZE, SIZE),
    "white": lambda: torch.ones(4, 3, SIZE, SIZE),
    "constant": lambda: torch.full((4, 3, SIZE, SIZE), 0.5),
    "random": lambda: torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)),
}
LABELS = torch.tensor([0, 1, 2, 0])
OBJECTIVE_NAMES = sorted(OBJECTIVES)


def _assert_finite_step(model, objective, x, autocast=False):
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = objective(model, x, LABELS)
    assert torch.isfinite(out.loss), {k: float(v) for k, v in out.terms.items()}
    assert all(torch.isfinite(v).all() for v in out.terms.values()), out.terms
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    bad = [i for i, g in enumerate(grads) if g is not None and not torch.isfinite(g).all()]
    assert not bad, f"non-finite parameter gradients in {len(bad)} tensors"
    return out


# (model, image) pairs: input-independent and fully tied saliency on any image; a real network
# (Softplus and ReLU) on all-black, all-white and constant-grey images.
DEGENERATE = [("constant", "random"), ("tied", "random"), ("resnet9", "black"), ("resnet9", "white"),
              ("resnet9", "constant"), ("resnet9_relu", "black")]


@pytest.mark.parametrize("name", OBJECTIVE_NAMES)
def test_objectives_finite_on_degenerate_inputs(name):
    objective = build_objective(name, k=N // 4, steps=1)
    for model_name, image in DEGENERATE:
        _assert_finite_step(MODELS[model_name](), objective, IMAGES[image]())


@pytest.mark.parametrize(
    "name, pair_set",
    [("r2et", "boundary"), ("r2et", "all"), ("r2et_mm", "minmax"), ("r2et_noh", "boundary"), ("est_h", "boundary"),
     ("grad_norm", "boundary"), ("at", "boundary")],
)
def test_k_equal_to_number_of_features(name, pair_set):
    objective = build_objective(name, k=N, pair_set=pair_set, steps=1)
    _assert_finite_step(resnet(), objective, IMAGES["random"]())


@pytest.mark.parametrize("name", ["r2et", "r2et_mm", "est_h", "grad_norm", "at"])
def test_bf16_autocast_gives_finite_loss_and_gradients(name):
    objective = build_objective(name, k=N // 4, steps=1)
    _assert_finite_step(resnet(), objective, IMAGES["black"](), autocast=True)


def test_zero_saliency_terms_are_zero_and_weights_finite():
    out = _assert_finite_step(ConstantModel(), build_objective("r2et", k=8), IMAGES["random"]())
    assert out.terms["gap"] == 0 and out.terms["curvature"] == 0
    # a term that is exactly zero gets no (1e12-sized) weight: its gradient must not be amplified
    assert out.terms["lambda_gap"] == 0 and out.terms["lambda_curvature"] == 0


def test_adaptive_weight_at_zero_and_tiny_terms():
    ce = torch.tensor(0.7)
    assert adaptive_weight(1.0, ce, torch.tensor(0.0)).item() == 0.0
    assert adaptive_weight(1.0, ce, torch.tensor(-0.0)).item() == 0.0
    assert torch.isfinite(adaptive_weight(1.0, ce, torch.tensor(1e-30)))
    assert adaptive_weight(1.0, ce, torch.tensor(-2.0)).item() == pytest.approx(0.85)


@pytest.mark.parametrize("pair_set", ["boundary", "all", "minmax"])
def test_gap_term_with_all_features_tied(pair_set):
    s = torch.full((3, N), 0.25, requires_grad=True)
    for k in (1, N // 2, N):
        r = gap_term(s, k, pair_set)
        (g,) = torch.autograd.grad(r.sum(), s)
        assert torch.isfinite(r).all() and torch.isfinite(g).all()
    assert gap_term(torch.zeros(2, N), N).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attacks_finite_and_in_ball_on_degenerate_inputs(name):
    eps = 8 / 255
    cases = [(m, i, "sign") for m, i in DEGENERATE] + [("constant", "black", "l2"), ("resnet9", "black", "l2")]
    for model_name, image, step in cases:
        x = IMAGES[image]()
        attack = build_attack(name, MODELS[model_name](), dict(eps=eps, steps=2, k=N, step=step))  # k = n as well
        x_adv = attack(x, LABELS)
        assert torch.isfinite(x_adv).all(), (model_name, image, step)
        assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attacks_under_bf16_autocast(name):
    eps = 4 / 255
    x = IMAGES["random"]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = build_attack(name, resnet(), dict(eps=eps, steps=2, k=N // 4))(x, LABELS)
    assert torch.isfinite(x_adv).all() and (x_adv - x).abs().max() <= eps + 1e-6


def test_ranking_metrics_on_zero_and_tied_maps():
    zero = torch.zeros(2, N)
    assert precision_at_k(zero, zero, N // 4).tolist() == [1.0, 1.0]
    assert precision_at_k(zero, torch.rand(2, N), N).tolist() == [1.0, 1.0]  # k = n
    top = torch.zeros(2, N, dtype=torch.bool)
    top[:, : N // 4] = True
    assert torch.isfinite(kept_pair_fraction(zero, top)).all()
    thick = topk_thickness(ConstantModel(), IMAGES["black"](), LABELS, k=N // 4, num_samples=2, num_points=2)
    assert torch.isfinite(thick).all() and ((0 <= thick) & (thick <= 1)).all()
