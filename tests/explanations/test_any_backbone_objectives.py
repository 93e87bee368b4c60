"""R2ET, Est-H and grad_norm on models other than the shipped ResNet-9 (small sizes, CPU)."""

import pytest
import torch

from explanations.objectives import build_objective
from lightning_modules.backbones import build_backbone
from tests.lightning_modules.tiny_nets import FunctionalReluNet


def _models():
    return {
        "user_functional_relu_sp": lambda: build_backbone(FunctionalReluNet(4, num_classes=3, drop=0.2), num_classes=3,
                                                          activation="softplus", softplus_beta=2.0),
        "vit_tiny": lambda: build_backbone("vit_tiny_patch16_224", num_classes=3, img_size=16, patch_size=8,
                                           depth=2, drop_path_rate=0.1),
        "convnext_atto": lambda: build_backbone("convnext_atto", num_classes=3, drop_path_rate=0.1),
    }


SIZES = {"user_functional_relu_sp": 8, "vit_tiny": 16, "convnext_atto": 32}


TIMM = [pytest.param(n, marks=pytest.mark.slow) for n in ("vit_tiny", "convnext_atto")]


@pytest.mark.parametrize("name", ["user_functional_relu_sp", *TIMM])
@pytest.mark.parametrize("objective", ["r2et", "est_h", "grad_norm"])
def test_objective_trains_on_backbone(name, objective):
    torch.manual_seed(0)
    model = _models()[name]().train()
    s = SIZES[name]
    x, y = torch.rand(2, 3, s, s), torch.tensor([0, 2])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    obj = build_objective(objective, k=0.25, h=1e-2)
    for _ in range(2):
        out = obj(model, x, y)
        assert torch.isfinite(out.loss), out.terms
        opt.zero_grad()
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        opt.step()
    if objective == "r2et":
        # the gap term alone has a non-zero parameter gradient
        x_ = x.detach().requires_grad_(True)
        from explanations.regularizers import gap_term
        from explanations.saliency import saliency_from_gradient
        loss = torch.nn.functional.cross_entropy(model(x_), y)
        (g,) = torch.autograd.grad(loss, x_, create_graph=True)
        r_g = gap_term(saliency_from_gradient(g), max(1, g[0, 0].numel() // 4)).mean()
        params = [p for p in model.parameters() if p.requires_grad]
        pg = torch.autograd.grad(r_g, params, allow_unused=True)
        assert sum(float(p.abs().sum()) for p in pg if p is not None) > 0


@pytest.mark.parametrize("name", ["user_functional_relu_sp", TIMM[1]])
def test_curvature_stable_across_h_in_train_mode(name):
    torch.manual_seed(0)
    model = _models()[name]().train()
    s = SIZES[name]
    x, y = torch.rand(2, 3, s, s), torch.tensor([0, 2])
    values = {}
    for h in (1e-3, 1e-2, 1e-1):
        torch.manual_seed(1)
        values[h] = build_objective("est_h", h=h)(model, x, y).terms["curvature"].item()
    assert all(v > 0 for v in values.values())
    assert max(values.values()) / min(values.values()) < 3.0, values
