"""lightning_modules.checkpoints: the one home of checkpoint and weight-file I/O."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_modules.checkpoints import (
    CheckpointReadError,
    architecture_differences,
    classifier_prefixes,
    load_backbone_weights,
    load_model_weights,
    missing_hparams,
)
from lightning_modules.classifier import RobustClassifier
from tests.conftest import TINY_MODEL


class Renamed(nn.Sequential):
    """A model whose published weights use other key names (``lin.*``)."""

    @staticmethod
    def checkpoint_filter_fn(state_dict, model):
        return {k.replace("lin.", "0."): v for k, v in state_dict.items()}


def test_weights_file_goes_through_the_models_checkpoint_filter_fn(tmp_path):
    source = nn.Linear(3, 2)
    torch.save({"lin.weight": source.weight.detach(), "lin.bias": source.bias.detach()}, tmp_path / "w.pth")
    model = load_backbone_weights(Renamed(nn.Linear(3, 2)), tmp_path / "w.pth")
    assert torch.equal(model[0].weight, source.weight)
    with pytest.raises(ValueError, match="missing keys: 0.weight, 0.bias; unexpected keys: lin.weight, lin.bias"):  # without the hook: refused
        load_backbone_weights(nn.Sequential(nn.Linear(3, 2)), tmp_path / "w.pth")


def test_weights_file_that_is_text_is_named(tmp_path):
    (tmp_path / "w.pth").write_text("hello")
    with pytest.raises(CheckpointReadError, match=f"cannot read the weights file '{tmp_path / 'w.pth'}': it is not a PyTorch checkpoint"):
        load_backbone_weights(nn.Linear(3, 2), tmp_path / "w.pth")


def test_one_classifier_prefix_heuristic_for_wrapper_and_bare_model():
    net = RobustClassifier(**TINY_MODEL).model
    assert classifier_prefixes(net) == tuple("backbone." + p for p in classifier_prefixes(net.backbone))
    assert classifier_prefixes(net.backbone) == ("fc.",)


def test_init_from_says_what_it_loaded(tmp_path, capsys):
    source = RobustClassifier(**TINY_MODEL)
    torch.save({"state_dict": source.state_dict(), "hyper_parameters": dict(source.hparams)}, tmp_path / "a.ckpt")
    target = RobustClassifier(**{**TINY_MODEL, "num_classes": 5})
    n = len(target.model.state_dict())
    load_model_weights(target.model, tmp_path / "a.ckpt")
    out = capsys.readouterr().out
    assert f"init_from: loaded {n - 2} of {n} tensors from {tmp_path / 'a.ckpt'}; classifier kept fresh" in out
    assert torch.equal(next(iter(target.model.parameters())), next(iter(source.model.parameters())))


def test_missing_architecture_hparams_are_named_and_output_key_reads_as_none():
    run = {"backbone": "resnet9", "backbone_kwargs": None, "num_classes": 3, "output_key": None}
    assert missing_hparams({"backbone": "resnet9", "num_classes": 3}, run) == {"backbone_kwargs": None}
    # output_key is newer than the first checkpoints: absent means None, a difference when the run sets it
    assert architecture_differences({"backbone": "resnet9"}, run) == {}
    assert architecture_differences({"backbone": "resnet9"}, {**run, "output_key": 0}) == {"output_key": (None, 0)}


def test_init_from_without_backbone_kwargs_names_them(tmp_path):
    source = RobustClassifier(**TINY_MODEL)  # width 4
    saved = dict(source.hparams)
    del saved["backbone_kwargs"]
    torch.save({"state_dict": source.state_dict(), "hyper_parameters": saved}, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match=r"shape mismatches .*does not record the hyper-parameter\(s\) "
                                         r"'backbone_kwargs'.*built with backbone_kwargs=None"):
        RobustClassifier(**{**TINY_MODEL, "backbone_kwargs": None}, init_from=str(tmp_path / "old.ckpt"))
