"""CAM / Grad-CAM maps, default layers, regions and perturbation-energy shares."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from explanations.cam import (
    activation_maps,
    capture_output,
    class_activation_map,
    default_cam_layer,
    energy_by_category,
    energy_share_in_region,
    grad_cam,
    resolve_layer,
    top_region,
)
from lightning_modules.backbones import build_backbone


class GapNet(nn.Module):
    """conv -> softplus -> conv (the CAM layer) -> global average pool -> linear."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Softplus())
        self.features = nn.Conv2d(6, 5, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(self.stem(x))).flatten(1))


def test_grad_cam_equals_cam_over_area_for_gap_linear_head():
    model = GapNet()
    model.train()
    x = torch.rand(3, 3, 8, 8)
    classes = torch.tensor([[0, 1], [2, 3], [1, 1]])
    gc = grad_cam(model, x, classes, "features")
    cam = class_activation_map(model, x, classes, "features", head=model.fc)
    assert gc.shape == cam.shape == (3, 2, 4, 4)
    torch.testing.assert_close(gc, cam / 16, atol=1e-6, rtol=1e-5)
    assert model.training and model.stem[1].training
    assert all(p.grad is None for p in model.parameters())


def test_maps_are_batched_and_upsampled():
    model = GapNet()
    x = torch.rand(4, 3, 8, 8)
    classes = torch.tensor([0, 1, 2, 3])
    maps = activation_maps(model, x, classes, "features", method="gradcam")
    assert maps.shape == (4, 1, 8, 8)
    single = torch.cat([activation_maps(model, x[i : i + 1], classes[i : i + 1], "features") for i in range(4)])
    torch.testing.assert_close(maps, single, atol=1e-6, rtol=1e-5)


def test_grad_cam_works_with_frozen_parameters():
    model = GapNet()
    for p in model.parameters():
        p.requires_grad_(False)
    maps = grad_cam(model, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), "features")
    assert maps.abs().sum() > 0


def test_default_layers():
    resnet = timm.create_model("resnet10t", num_classes=3)
    assert default_cam_layer(resnet) == "layer4"
    model = build_backbone("resnet9", num_classes=3, width=8)
    name = default_cam_layer(model)
    assert name == "backbone." + model.backbone.feature_info[-1]["module"]
    _, module = resolve_layer(model, name)
    x = torch.rand(2, 3, 16, 16)
    model.eval()
    with torch.no_grad(), capture_output(module) as store:
        model(x)
        expected = model.backbone.forward_features(model.normalize(x))
    torch.testing.assert_close(store["out"], expected)
    # names are also tried under backbone.
    assert resolve_layer(model, name.removeprefix("backbone."))[0] == name
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten())
    assert default_cam_layer(plain) == "2"
    with pytest.raises(ValueError, match="not a submodule"):
        resolve_layer(plain, "nope")


def test_non_map_layer_is_refused():
    model = GapNet()
    with pytest.raises(ValueError, match="feature map"):
        grad_cam(model, torch.rand(1, 3, 8, 8), torch.tensor([0]), "fc")


def test_top_region_and_energy_shares():
    maps = torch.arange(16.0).view(1, 1, 4, 4).repeat(1, 2, 1, 1)
    maps[0, 1] = -maps[0, 1]
    region = top_region(maps, 0.25)
    assert region.sum(dim=(2, 3)).tolist() == [[4, 4]]
    assert region[0, 0, 3].all() and region[0, 1, 0].all()
    delta = torch.zeros(1, 3, 4, 4)
    delta[0, :, 3, 0] = 1.0  # energy 3, inside region 0
    delta[0, 0, 0, 0] = 1.0  # energy 1, inside region 1
    torch.testing.assert_close(energy_share_in_region(delta, region), torch.tensor([[0.75, 0.25]]))
    cats = torch.zeros(1, 4, 4, dtype=torch.long)
    cats[0, 0] = 2
    total, inside = energy_by_category(delta, cats, region, 4)
    torch.testing.assert_close(total, torch.tensor([[3.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(inside, torch.tensor([[[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]]))
    with pytest.raises(ValueError, match="cam_quantile"):
        top_region(maps, 0.0)
