"""CIFAR ResNets (He et al. 2016) and the published akamaster weights format."""

import pytest
import timm
import torch

from lightning_modules.backbones import build_backbone
from lightning_modules.cifar_resnet import CifarResNet, ShortcutA, checkpoint_filter_fn


@pytest.mark.parametrize("name,depth,params", [("resnet20", 20, 269_722), ("resnet32", 32, 464_154), ("resnet56", 56, 853_018)])
def test_registered_depth_and_parameter_count(name, depth, params):
    model = timm.create_model(name)
    assert isinstance(model, CifarResNet) and model.depth == depth
    # paper Table 6: 0.27 M / 0.46 M / 0.85 M parameters
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    cfg = model.pretrained_cfg
    assert cfg["url"].startswith("https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/")
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.rand(2, 4, 6, 6)
    out = ShortcutA(2)(x)
    assert out.shape == (2, 8, 3, 3)
    torch.testing.assert_close(out[:, 2:6], x[:, :, ::2, ::2])
    assert out[:, :2].abs().sum() == 0 and out[:, 6:].abs().sum() == 0


def test_bad_depth_is_refused():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(depth=21)


def _akamaster_file(model, path):
    state = {("module." + k).replace("module.fc.", "module.linear."): v.clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "best_prec1": 91.78}, path)


def test_published_format_round_trip(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("resnet20", width=8)
    for m in source.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "resnet20-akamaster.th"
    _akamaster_file(source, path)
    raw = torch.load(path, weights_only=True)
    assert set(checkpoint_filter_fn(raw)) == set(source.state_dict())
    model = build_backbone("resnet20", weights_file=str(path), width=8)
    x = torch.rand(3, 3, 32, 32)
    expected = source.eval()((x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
    torch.testing.assert_close(model.eval()(x), expected, rtol=0, atol=0)
    # another head size: the classifier is re-initialised, everything else loads
    with pytest.warns(UserWarning, match="Classifier weights"):
        other = build_backbone("resnet20", weights_file=str(path), width=8, num_classes=4)
    torch.testing.assert_close(other.backbone.conv1.weight, source.conv1.weight)


def test_published_file_of_another_depth_is_refused(tmp_path):
    path = tmp_path / "resnet32.th"
    _akamaster_file(timm.create_model("resnet32", width=8), path)
    with pytest.raises(ValueError, match="unexpected keys: layer1.3"):
        build_backbone("resnet20", weights_file=str(path), width=8)


def test_timm_pretrained_path_uses_the_filter(tmp_path):
    # timm's own pretrained loading (here from a local file instead of the default URL)
    torch.manual_seed(0)
    source = timm.create_model("resnet20", width=8)
    path = tmp_path / "resnet20-akamaster.th"
    _akamaster_file(source, path)
    model = timm.create_model("resnet20", width=8, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for (k, a), (_, b) in zip(model.state_dict().items(), source.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
