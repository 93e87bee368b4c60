"""The default CAM layer is the map the classifier head reads, found by tracing, for any model."""

import pytest
import timm
import torch
from torch import nn

from explanations.cam import class_activation_map, default_cam_layer, grad_cam, trace_head_input
from lightning_modules.backbones import build_backbone
from tests.lightning_modules.tiny_nets import FunctionalReluNet


class UserNet(nn.Module):
    """F.relu inside, the head's map produced by a module (nn.ReLU), pooled functionally."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.classifier = nn.Linear(6, 3)

    def forward(self, x):
        x = self.act(self.conv2(torch.nn.functional.relu(self.conv1(x))))
        return self.classifier(x.mean((2, 3)))


def _head_map(model, x):
    base = model.backbone
    return base.forward_features(model.normalize(x))


def test_cifar_resnet20_default_is_layer3_not_last_conv():
    torch.manual_seed(0)
    model = build_backbone("resnet20", width=8).eval()
    x = torch.rand(2, 3, 32, 32)
    assert default_cam_layer(model, x) == "backbone.layer3"
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs[-1] == "backbone.layer3.2.conv2"
    classes = torch.tensor([1, 2])
    cam = class_activation_map(model, x, classes)
    # CAM on the head's map: its spatial mean is the logit minus the bias (global average pooling)
    logits = model(x)
    expected = logits.gather(1, classes[:, None]) - model.backbone.fc.bias[classes][:, None]
    torch.testing.assert_close(cam.mean((2, 3)), expected, rtol=1e-4, atol=1e-5)
    # the last Conv2d (before BN, the residual add and the ReLU) has the same shape but is wrong
    with pytest.raises(ValueError, match=r"layer3.2.conv2.*not the feature map the head reads.*backbone.layer3.*\(1, 32, 8, 8\)"):
        class_activation_map(model, x, classes, "backbone.layer3.2.conv2")
    # Grad-CAM may use any map, and defaults to the head's map too
    torch.testing.assert_close(grad_cam(model, x, classes), cam / 64, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "name,kwargs,layer,size",
    [("resnet9", dict(width=4), "backbone.res2", 32), ("resnet10t", dict(), "backbone.layer4", 64),
     ("convnext_atto", dict(), "backbone.stages.3", 32)],
)
def test_timm_models(name, kwargs, layer, size):
    model = build_backbone(name, num_classes=3, **kwargs).eval()
    x = torch.rand(1, 3, size, size)
    assert default_cam_layer(model, x) == layer
    assert grad_cam(model, x, torch.tensor([0])).abs().sum() > 0


def test_user_module_and_functional_map_error():
    model = build_backbone(UserNet(), num_classes=3)
    x = torch.rand(2, 3, 8, 8)
    assert default_cam_layer(model, x) == "backbone.act"
    read = trace_head_input(model, x)
    assert read.shape == (1, 6, 8, 8) and read.op.startswith("mean")
    cam = class_activation_map(model, x, torch.tensor([0, 2]))
    assert cam.shape == (2, 1, 8, 8)
    # the map FunctionalReluNet's head reads is F.relu's output: no layer holds it
    with pytest.raises(ValueError, match=r"function call after its last submodule.*conv2 \(1, 16, 4, 4\)"):
        default_cam_layer(build_backbone(FunctionalReluNet(8)), x)


def test_transformer_tokens_have_no_default_layer():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1, num_classes=3)
    with pytest.raises(ValueError, match="no CAM layer found for VisionTransformer"):
        default_cam_layer(vit, torch.rand(1, 3, 16, 16))
