"""Tests for lightning_modules.backbones (tiny models, 32 px inputs, CPU)."""

from __future__ import annotations

import timm
import torch
import pytest
from torch import nn

import lightning_modules
from lightning_modules import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    NormalizedClassifier,
    build_backbone,
)
from explanations.activations import RELU_MODULES as RELU_TYPES, trace_activations

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _x(b: int = 2, c: int = 3, s: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, s, s, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ resnet9 / timm


def test_resnet9_in_timm_registry():
    model = timm.create_model("resnet9", num_classes=10).eval()
    assert model(_x()).shape == (2, 10)
    assert model.pretrained_cfg["mean"] == CIFAR10_MEAN
    assert model.pretrained_cfg["std"] == CIFAR10_STD
    assert model.default_cfg["classifier"] == "fc"
    assert model.get_classifier() is model.fc
    assert model.fc.weight.shape == (10, 512)
    model.reset_classifier(5)
    assert model.num_classes == 5 and model(_x()).shape == (2, 5)
    model.reset_classifier(0)
    assert model(_x()).shape == (2, 512)
    # every activation is an nn.ReLU module (so the softplus swap can find them)
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 8
    # any input size works (adaptive pooling), avg pool option, in_chans
    avg = timm.create_model("resnet9", num_classes=3, in_chans=1, global_pool="avg", drop_rate=0.1)
    assert avg.eval()(_x(1, 1, 48)).shape == (1, 3)


def test_resnet9_pretrained_raises():
    with pytest.raises(ValueError, match="No hub weights exist for 'resnet9'.*weights_file"):
        timm.create_model("resnet9", pretrained=True)
    with pytest.raises(ValueError, match="resnet9"):
        build_backbone("resnet9", pretrained=True)


def test_build_backbone_returns_normalized_classifier():
    model = build_backbone("resnet9", num_classes=7).eval()
    assert isinstance(model, NormalizedClassifier)
    assert model.num_classes == 7
    assert model(_x()).shape == (2, 7)


# ------------------------------------------------------------------------------ cifar stem


def test_cifar_stem_resnet18():
    model = build_backbone("resnet18", num_classes=10, cifar_stem=True).eval()
    bb = model.backbone
    assert isinstance(bb.conv1, nn.Conv2d)
    assert bb.conv1.stride == (1, 1) and bb.conv1.kernel_size == (3, 3)
    assert (bb.conv1.in_channels, bb.conv1.out_channels) == (3, 64)
    assert isinstance(bb.maxpool, nn.Identity)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)  # the build's output check runs at 32 px
    x = _x(1)
    # 32x32 path: only the 3 stride-2 stages downsample -> 4x4 final feature map
    assert bb.forward_features(model.normalize(x)).shape == (1, 512, 4, 4)
    assert model(x).shape == (1, 10)
    plain = build_backbone("resnet18", num_classes=10).eval()
    assert plain.backbone.forward_features(x).shape == (1, 512, 1, 1)


def test_cifar_stem_rejects_other_families():
    with pytest.raises(ValueError, match="cifar_stem.*ResNet-family.*conv1"):
        build_backbone("resnet9", cifar_stem=True)


# ------------------------------------------------------------------------------ softplus swap


@pytest.mark.parametrize(
    "name", ["resnet18", "resnet9", "densenet121", "mobilenetv3_small_050", "mobilenetv2_050"]
)
def test_softplus_swap_leaves_no_relu(name):
    relu_model = timm.create_model(name, num_classes=4)
    assert any(isinstance(m, RELU_TYPES) for m in relu_model.modules())

    model = build_backbone(name, num_classes=4, activation="softplus", softplus_beta=2.0).eval()
    assert not any(isinstance(m, RELU_TYPES) for m in model.modules())
    assert trace_activations(model, _x(1)).relu == []
    softplus = [m for m in model.modules() if isinstance(m, nn.Softplus)]
    assert softplus and all(m.beta == 2.0 for m in softplus)
    if name.startswith("mobilenetv3"):  # hard-swish is not ReLU-type: kept
        assert any(isinstance(m, nn.Hardswish) for m in model.modules())
    with torch.no_grad():
        assert model(_x(1)).shape == (1, 4)


def test_softplus_swap_covers_functional_relu_and_refuses_gelu_models():
    from tests.lightning_modules.tiny_nets import FunctionalReluNet

    model = build_backbone(FunctionalReluNet(4), activation="softplus", softplus_beta=2.0).eval()
    x = _x(2, s=8)
    assert trace_activations(model, x).relu == []
    net = model.backbone
    h = torch.nn.functional.softplus(net.bn1(net.conv1(x)), beta=2.0)
    h = torch.nn.functional.softplus(net.conv2(h), beta=2.0)
    torch.testing.assert_close(model(x), net.head(h.mean((2, 3))))
    with pytest.raises(ValueError, match="convnext_atto.*softplus has no effect"):
        build_backbone("convnext_atto", num_classes=4, activation="softplus")


def _input_hvp(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    logits = model(x)
    target = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
    (g,) = torch.autograd.grad(target, x, create_graph=True)
    v = torch.ones_like(x)
    (hv,) = torch.autograd.grad((g * v).sum(), x, allow_unused=True)
    return torch.zeros_like(x) if hv is None else hv


def test_softplus_makes_input_hessian_nonzero():
    torch.manual_seed(0)
    relu = build_backbone("resnet9", num_classes=10).eval()
    soft = build_backbone("resnet9", num_classes=10, activation="softplus").eval()
    x = _x(2, seed=1)
    assert _input_hvp(relu, x).abs().max().item() == 0.0
    assert _input_hvp(soft, x).abs().max().item() > 0.0


# ------------------------------------------------------------------------------ normalization


def test_normalization_is_first_layer():
    model = build_backbone("resnet9", num_classes=10).eval()
    assert model.normalize.mean.shape == (1, 3, 1, 1) and model.normalize.std.shape == (1, 3, 1, 1)
    assert model.normalize.mean.flatten().tolist() == pytest.approx(CIFAR10_MEAN)
    x = _x()
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.backbone((x - mean) / std))
    # defaults come from the timm pretrained_cfg (ImageNet for resnet18); explicit values win
    r18 = build_backbone("resnet18", num_classes=2)
    assert r18.normalize.mean.flatten().tolist() == pytest.approx(timm.data.IMAGENET_DEFAULT_MEAN)
    custom = build_backbone("resnet9", in_chans=1, mean=[0.5], std=[0.25])
    assert custom.normalize.mean.flatten().tolist() == [0.5]
    assert custom.normalize.std.flatten().tolist() == [0.25]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mean=[0.5, 0.5]), r"mean=.*in_chans=3"),
        (dict(std=[0.2]), r"std=.*in_chans=3"),
        (dict(std=[0.2, 0.0, 0.2]), r"std must be positive"),
        (dict(activation="gelu"), r"relu.*softplus.*'gelu'"),
        (dict(activation="softplus", softplus_beta=0.0), r"softplus_beta.*0\.0"),
        (dict(softplus_beta=-1), r"softplus_beta.*-1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_backbone("resnet9", **kwargs)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError) as info:
        build_backbone("resnet181")
    msg = str(info.value)
    assert "'resnet181'" in msg and "resnet18" in msg and "resnet9" in msg


# ------------------------------------------------------------------------------ local weights


@pytest.fixture(scope="module")
def resnet9_file(tmp_path_factory):
    torch.manual_seed(0)
    source = build_backbone("resnet9", num_classes=10).eval()
    path = tmp_path_factory.mktemp("w") / "resnet9.pth"
    torch.save(source.backbone.state_dict(), path)
    return source, path


def _assert_features_equal(a: nn.Module, b: nn.Module) -> None:
    x = _x(2, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(a.backbone.forward_features(x), b.backbone.forward_features(x))


def test_weights_file_other_num_classes_keeps_fresh_classifier(resnet9_file):
    source, path = resnet9_file
    with pytest.warns(UserWarning, match="freshly initialised classifier"):
        model = build_backbone("resnet9", num_classes=5, weights_file=str(path)).eval()
    _assert_features_equal(source, model)
    assert model.backbone.fc.weight.shape == (5, 512)


def test_weights_file_same_num_classes_loads_everything(resnet9_file, tmp_path):
    source, _ = resnet9_file
    # a NormalizedClassifier state dict ("backbone." prefix)
    path = tmp_path / "wrapped.pt"
    torch.save(source.state_dict(), path)
    model = build_backbone("resnet9", num_classes=10, weights_file=path, activation="softplus").eval()
    torch.testing.assert_close(model.backbone.fc.weight, source.backbone.fc.weight)
    assert trace_activations(model, _x(1)).relu == []


def test_weights_file_lightning_checkpoint(resnet9_file, tmp_path):
    source, _ = resnet9_file
    ckpt = {
        "epoch": 3,
        "global_step": 12,
        "state_dict": {f"model.{k}": v for k, v in source.state_dict().items()},
    }
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    model = build_backbone("resnet9", num_classes=10, weights_file=path).eval()
    _assert_features_equal(source, model)
    torch.testing.assert_close(model.backbone.fc.bias, source.backbone.fc.bias)


def test_weights_file_wrong_architecture(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), path)
    with pytest.raises(ValueError) as info:
        build_backbone("resnet9", weights_file=path)
    msg = str(info.value)
    assert "does not fit architecture 'resnet9'" in msg
    assert "prep.conv.weight" in msg  # missing key
    assert "conv1.weight" in msg  # unexpected key


def test_weights_file_missing(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone("resnet9", weights_file=str(missing))


def test_weights_file_safetensors(resnet9_file, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    source, _ = resnet9_file
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(source.backbone.state_dict(), str(path))
    model = build_backbone("resnet9", num_classes=10, weights_file=path).eval()
    _assert_features_equal(source, model)


def test_pretrained_offline_error_suggests_weights_file(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="resnet18.*could not be downloaded.*weights_file"):
        build_backbone("resnet18", pretrained=True)


# ------------------------------------------------------------------------------ fused attention


def test_vit_double_backprop_with_fused_attention_off():
    timm.layers.set_fused_attn(True)  # make sure build_backbone turns it off itself
    with pytest.raises(ValueError, match="vit_tiny_patch16_224.*no ReLU-type activation"):  # GELU only
        build_backbone("vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, activation="softplus")
    model = build_backbone("vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8).eval()
    flags = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    assert flags and not any(flags)
    x = _x(2).requires_grad_(True)
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2]))
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(g.abs().sum(), params, allow_unused=True)
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)


def test_package_exports():
    for name in lightning_modules.backbones.__all__:
        if name != "resnet9":
            assert hasattr(lightning_modules, name), name
