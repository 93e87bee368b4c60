"""``backbone`` as any nn.Module: from Python, and from YAML (class_path / init_args)."""

import lightning as L
import pytest
import torch
from torch import nn

from lightning_modules.backbones import build_backbone
from lightning_modules.classifier import RobustClassifier
from tests.lightning_modules.tiny_nets import FunctionalReluNet

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_module_without_stats_gets_identity_normalization():
    net = FunctionalReluNet(4)
    model = build_backbone(net)
    assert model.backbone is net
    assert model.normalize.mean.flatten().tolist() == [0.0] * 3
    assert model.normalize.std.flatten().tolist() == [1.0] * 3
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(model.eval()(x), net(x), rtol=0, atol=0)


def test_module_with_given_stats_is_normalized():
    net = FunctionalReluNet(4).eval()
    model = build_backbone(net, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).eval()
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(model(x), net((x - 0.5) / 0.25))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(pretrained=True), "pretrained=True needs a timm model name"),
        (dict(num_classes=4), "num_classes=4 but .* 10 outputs"),
        (dict(in_chans=1), "in_chans=1 but the first Conv2d .* 3 channels"),
        (dict(width=8), r"backbone_kwargs \['width'\]"),
    ],
)
def test_module_settings_it_cannot_honour_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_backbone(FunctionalReluNet(4), **kwargs)


def test_module_weights_file_loads(tmp_path):
    torch.manual_seed(0)
    source = FunctionalReluNet(4)
    path = tmp_path / "net.pth"
    torch.save(source.state_dict(), path)
    model = build_backbone(FunctionalReluNet(4), weights_file=str(path))
    torch.testing.assert_close(model.backbone.conv1.weight, source.conv1.weight)


def test_classifier_from_instance_saves_and_reloads(tmp_path):
    torch.manual_seed(0)
    module = RobustClassifier(backbone=FunctionalReluNet(4), objective="r2et", k=0.25)
    assert module.hparams.backbone == {"class_path": "tests.lightning_modules.tiny_nets.FunctionalReluNet"}
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    module.train()
    out = module.objective(module.model, x, y)
    assert torch.isfinite(out.loss)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(module)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match="pass backbone=<the module> again"):
        RobustClassifier.load_from_checkpoint(path, weights_only=True)
    loaded = RobustClassifier.load_from_checkpoint(path, weights_only=True, backbone=FunctionalReluNet(4))
    torch.testing.assert_close(loaded.model.backbone.conv1.weight, module.model.backbone.conv1.weight)
    # a module of another shape is refused, naming the keys
    with pytest.raises(ValueError, match="conv1.weight"):
        RobustClassifier.load_from_checkpoint(path, weights_only=True, backbone=FunctionalReluNet(8))


def test_yaml_class_path_backbone(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["train.py"])
    config = tmp_path / "net.yaml"
    config.write_text(
        "model:\n  backbone:\n    class_path: tests.lightning_modules.tiny_nets.FunctionalReluNet\n"
        "    init_args:\n      width: 4\n  objective: vanilla\n  backbone_kwargs: null\n"
    )
    from lightning.pytorch import LightningDataModule

    from lightning_modules.cli import RobustCLI

    cli = RobustCLI(
        RobustClassifier, LightningDataModule, subclass_mode_data=True, run=False,
        trainer_defaults={"inference_mode": False, "logger": False, "default_root_dir": str(tmp_path)},
        args=["-c", str(ROOT / "configs/data/synthetic.yaml"), "-c", str(config)],
    )
    assert isinstance(cli.model.model.backbone, FunctionalReluNet)
    assert cli.model.model.backbone.conv1.out_channels == 4
    assert cli.model.hparams.backbone["init_args"]["width"] == 4
