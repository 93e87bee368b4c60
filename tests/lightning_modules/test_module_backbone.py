"""``backbone`` as any nn.Module: from Python, and from YAML (class_path / init_args)."""

import lightning as L
import pytest
import torch

from lightning_modules import backbones
from lightning_modules.backbones import build_backbone
from lightning_modules.classifier import RobustClassifier
from tests.lightning_modules.tiny_nets import FixedSizeNet, FunctionalReluNet, OutputNet

pytestmark = pytest.mark.usefixtures("one_thread")

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


# ------------------------------------------------------------------ outputs other than (B, K) logits
@pytest.mark.parametrize(
    "returns,match",
    [
        ("tuple", (r"returns a tuple of 2 \(\[0\]: Tensor \(1, 3\), \[1\]: Tensor \(1, 8\)\), not a logits "
                   r"tensor \(B, 3\); set model.output_key: 0")),
        ("dict", (r"returns a dict with keys \{'features': Tensor \(1, 8\), 'logits': Tensor \(1, 3\)\}.*"
                  r"set model.output_key: logits")),
        ("object", (r"returns an Output with attributes \(logits: Tensor \(1, 3\), pooled: Tensor \(1, 8\)\).*"
                    r"set model.output_key: logits")),
        ("flat", (r"it has shape \(1,\) for an input of shape \(1, 3, 32, 32\); RobustClassifier needs logits of "
                  r"shape \(B, 3\) \(one value per image")),
        ("double", r"it has 6 logits per image \(shape \(1, 6\)\) but num_classes=3"),
    ],
)
def test_backbone_output_that_is_not_logits_is_refused_at_build(returns, match):
    with pytest.raises(ValueError, match=match):
        RobustClassifier(backbone=OutputNet(returns), num_classes=3, objective="vanilla")


@pytest.mark.parametrize("returns,key", [("tuple", 0), ("dict", "logits"), ("object", "logits"), ("tuple", "0")])
def test_output_key_takes_the_logits(returns, key):
    torch.manual_seed(0)
    net = OutputNet(returns)
    module = RobustClassifier(backbone=net, num_classes=3, output_key=key, objective="r2et", k=4)
    assert module.hparams.output_key == key
    assert isinstance(module.model.backbone, backbones.SelectOutput) and module.model.backbone.backbone is net
    assert module.model.backbone.head is net.head and module.model.backbone.returns == returns  # read through
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    assert module(x).shape == (4, 3)
    out = module.objective(module.model, x, y)
    assert torch.isfinite(out.loss) and out.logits.shape == (4, 3)


def test_output_key_that_selects_nothing_names_the_keys():
    with pytest.raises(ValueError, match=r"keys \{'features': .*'logits': .*output_key='probs' selects nothing.*"
                                         r"use output_key: logits"):
        RobustClassifier(backbone=OutputNet("dict"), num_classes=3, output_key="probs", objective="vanilla")
    with pytest.raises(ValueError, match=r"output_key=True is not valid"):
        RobustClassifier(backbone=OutputNet("tuple"), num_classes=3, output_key=True, objective="vanilla")


def test_output_key_on_a_tensor_output_warns():
    with pytest.warns(UserWarning, match=r"returns a Tensor of shape \(1, 3\) in eval mode, so output_key='logits' "
                                         r"does not apply there"):
        module = RobustClassifier(backbone=OutputNet("tensor"), num_classes=3, output_key="logits", objective="vanilla")
    assert module(torch.rand(2, 3, 8, 8)).shape == (2, 3)  # a Tensor passes through


def test_probe_restores_modes_and_leaves_batchnorm_statistics():
    for train in (True, False):
        net = OutputNet("dict").train(train)
        net.drop.train(not train)  # a mixed state is restored module by module
        RobustClassifier(backbone=net, num_classes=3, output_key="logits", objective="vanilla")
        assert net.training is train and net.bn1.training is train and net.drop.training is not train
        assert net.bn1.num_batches_tracked.item() == 0
        torch.testing.assert_close(net.bn1.running_mean, torch.zeros(4), rtol=0, atol=0)
        torch.testing.assert_close(net.bn1.running_var, torch.ones(4), rtol=0, atol=0)


def test_output_key_with_softplus_fast_batchnorm_and_lean_layers():
    from explanations.activations import trace_activations
    from explanations.fast_batchnorm import FastBatchNorm2d

    module = RobustClassifier(backbone=OutputNet("tuple"), num_classes=3, output_key=0, activation="softplus",
                              objective="r2et", k=4)
    trace = trace_activations(module.model, torch.rand(1, 3, 8, 8))
    assert not trace.relu and trace.smooth  # F.relu / .relu() inside the adapter became softplus
    assert isinstance(module.model.backbone.backbone.bn1, FastBatchNorm2d)
    assert type(module.model.backbone.backbone.conv1).__name__ == "LeanConv2d"


def test_output_key_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    module = RobustClassifier(backbone=OutputNet("dict"), num_classes=3, output_key="logits", objective="vanilla")
    assert "model.backbone.backbone.conv1.weight" in module.state_dict()
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=0)
    trainer.strategy.connect(module)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = RobustClassifier.load_from_checkpoint(path, weights_only=True, backbone=OutputNet("dict"))
    assert loaded.hparams.output_key == "logits"
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(loaded.eval()(x), module.eval()(x))


def test_plain_backbone_has_no_adapter_and_the_same_keys():
    module = RobustClassifier(backbone=FunctionalReluNet(4, num_classes=3), num_classes=3, objective="vanilla")
    assert isinstance(module.model.backbone, FunctionalReluNet) and module.hparams.output_key is None
    assert "model.backbone.conv1.weight" in module.state_dict()


def test_output_of_a_fixed_size_backbone_is_checked_on_the_data_size():
    from types import SimpleNamespace

    data = SimpleNamespace(num_classes=3, in_chans=3, image_size=8)
    with pytest.warns(UserWarning, match=r"forward failed on an example input of shape \(1, 3, 32, 32\)"):
        module = RobustClassifier(backbone=FixedSizeNet("tuple"), num_classes=3, objective="vanilla")
    with pytest.raises(ValueError, match=r"returns a tuple of 2 .*set model.output_key: 0"):
        module.check_data(data)
    with pytest.warns(UserWarning, match="forward failed"):
        module = RobustClassifier(backbone=FixedSizeNet("tensor"), num_classes=3, objective="vanilla")
    module.check_data(data)  # fits: the check is done and not repeated
    assert "_pending_output_check" not in vars(module.model)
    with pytest.warns(UserWarning, match="forward failed"):
        module = RobustClassifier(backbone=FixedSizeNet("tensor"), num_classes=3, objective="vanilla")
    with pytest.raises(ValueError, match=r"cannot process the data's 16x16 images"):
        module.check_data(SimpleNamespace(num_classes=3, in_chans=3, image_size=16))


def test_yaml_output_key_and_flag(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["train.py"])
    config = tmp_path / "net.yaml"
    config.write_text(
        "model:\n  backbone:\n    class_path: tests.lightning_modules.tiny_nets.OutputNet\n"
        "    init_args:\n      returns: tuple\n  num_classes: 3\n  objective: vanilla\n  backbone_kwargs: null\n"
    )
    from lightning.pytorch import LightningDataModule

    from lightning_modules.cli import RobustCLI

    def cli(*flags):
        return RobustCLI(
            RobustClassifier, LightningDataModule, subclass_mode_data=True, run=False,
            trainer_defaults={"inference_mode": False, "logger": False, "default_root_dir": str(tmp_path)},
            args=["-c", str(ROOT / "configs/data/synthetic.yaml"), "-c", str(config), *flags],
        )

    with pytest.raises(ValueError, match="set model.output_key: 0"):
        cli()
    model = cli("--model.output_key", "0").model
    assert model.hparams.output_key == 0 and model(torch.rand(2, 3, 8, 8)).shape == (2, 3)


def test_output_key_keeps_the_num_classes_and_in_chans_checks():
    with pytest.raises(ValueError, match="num_classes=4 but .* 3 outputs"):
        RobustClassifier(backbone=OutputNet("tuple"), num_classes=4, output_key=0, objective="vanilla")
    with pytest.raises(ValueError, match="in_chans=1 but the first Conv2d .* 3 channels"):
        RobustClassifier(backbone=OutputNet("tuple"), num_classes=3, in_chans=1, output_key=0, objective="vanilla")


def test_weights_file_of_an_adapted_model_keeps_its_normalization_check(tmp_path):
    stats = {"mean": [0.5] * 3, "std": [0.25] * 3}
    module = RobustClassifier(backbone=OutputNet("dict"), num_classes=3, output_key="logits", objective="vanilla",
                              backbone_kwargs=stats)
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": module.state_dict()}, path)  # keys model.backbone.backbone.*, model.normalize.*
    with pytest.warns(UserWarning, match=r"trained with normalization mean=\(0.5, 0.5, 0.5\)"):
        model = build_backbone(OutputNet("dict"), num_classes=3, weights_file=str(path), output_key="logits")
    torch.testing.assert_close(model.backbone.backbone.conv1.weight, module.model.backbone.backbone.conv1.weight)
