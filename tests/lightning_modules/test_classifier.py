from types import SimpleNamespace

import pytest
import torch
from torch import nn

from explanations.objectives import OBJECTIVES
from lightning_modules.classifier import (
    NonFiniteLossError,
    RobustClassifier,
    check_against_data,
    check_objective_settings,
    load_model_weights,
)

TINY = dict(backbone="resnet9", backbone_kwargs={"width": 4}, num_classes=3, activation="softplus", k=16)


def batch(n=4, size=16):
    torch.manual_seed(0)
    return torch.rand(n, 3, size, size), torch.arange(n) % 3


def test_training_step_returns_loss_and_logs_every_term(monkeypatch):
    module = RobustClassifier(**TINY, objective="r2et")
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, value))
    loss = module.training_step(batch(), 0)
    assert loss.requires_grad and torch.isfinite(loss)
    for term in ("ce", "gap", "topk_margin", "curvature", "lambda_gap", "lambda_curvature", "loss"):
        assert f"train/{term}" in logged
    loss.backward()
    assert all(p.grad is not None for p in module.model.parameters() if p.requires_grad)


@pytest.mark.parametrize("objective,lean", [("r2et", True), ("grad_norm", True), ("vanilla", False)])
def test_double_backprop_objectives_get_the_lean_layers(objective, lean):
    from explanations.fast_batchnorm import FastBatchNorm2d
    from explanations.lean_layers import LeanMaxPool2d, LeanSoftplus

    types = {type(m) for m in RobustClassifier(**TINY, objective=objective).model.modules()}
    assert ({LeanSoftplus, LeanMaxPool2d, FastBatchNorm2d} <= types) is lean
    assert not lean or not {nn.Softplus, nn.MaxPool2d} & types
    off = {type(m) for m in RobustClassifier(**TINY, objective=objective, lean_layers=False).model.modules()}
    assert LeanSoftplus not in off and nn.Softplus in off


def test_validation_logs_regularizer_terms_when_grad_allowed(monkeypatch):
    module = RobustClassifier(**TINY, objective="r2et_noh").eval()
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, value))
    with torch.no_grad():
        module.validation_step(batch(), 0)
    assert {"val/ce", "val/gap", "val/topk_margin", "val/acc"} <= set(logged)


def test_nonfinite_loss_stops_with_term_and_batch(monkeypatch):
    module = RobustClassifier(**TINY, objective="r2et_noh")
    x, y = batch()
    x[0, 0, 0, 0] = float("nan")
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    with pytest.raises(NonFiniteLossError, match=r"batch 7: term\(s\) \[.*ce.*\]"):
        module.training_step((x, y), 7)
    skipping = RobustClassifier(**TINY, objective="r2et_noh", nonfinite="skip")
    monkeypatch.setattr(skipping, "log", lambda *a, **k: None)
    assert skipping.training_step((x, y), 0) is None
    assert skipping.skipped_batches == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(objective="r3et"), "objective='r3et'"),
        (dict(objective="r2et", compile=True), "compile=True"),
        (dict(nonfinite="ignore"), "nonfinite='ignore'"),
    ],
)
def test_bad_configuration_fails_early(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RobustClassifier(**{**TINY, **kwargs})


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_registered_objective_gets_the_settings_checks(name):
    """From its registry entry: unknown objective_kwargs keys refused (its options listed), and
    k checked against the image size where it ``uses_k`` (its ``k_option`` in place of k)."""
    entry = OBJECTIVES[name]
    with pytest.raises(ValueError, match=rf"\['stepz'\] not known for objective='{name}'"):
        check_objective_settings(name, 0.1, None, {"stepz": 3})
    check_objective_settings(name, 0.1, None, None)
    data = SimpleNamespace(num_classes=3, in_chans=3, image_size=16)
    hparams = dict(objective=name, num_classes=3, in_chans=3, pool=None, k=300)
    if entry.uses_k:
        with pytest.raises(ValueError, match=r"model\.k=300 is out of range for 16x16 images"):
            check_against_data(hparams, data)
    else:
        check_against_data(hparams, data)  # k is not used: not checked
    if entry.k_option is not None:
        option = {**hparams, "k": 16, "objective_kwargs": {entry.k_option: 300}}
        with pytest.raises(ValueError, match=rf"model\.objective_kwargs\.{entry.k_option}=300 is out of range"):
            check_against_data(option, data)


def test_sync_batchnorm_refused_for_double_backprop():
    module = RobustClassifier(**TINY, objective="r2et")
    module.model = nn.SyncBatchNorm.convert_sync_batchnorm(module.model)
    with pytest.raises(RuntimeError, match="SyncBatchNorm"):
        module.on_fit_start()
    vanilla = RobustClassifier(**TINY, objective="vanilla")
    vanilla.model = nn.SyncBatchNorm.convert_sync_batchnorm(vanilla.model)
    vanilla.on_fit_start()


def _save_checkpoint(module, path):
    torch.save({"state_dict": module.state_dict(), "epoch": 1}, path)


def test_init_from_checkpoint_loads_weights(tmp_path):
    source = RobustClassifier(**TINY, objective="vanilla")
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.5)
    _save_checkpoint(source, tmp_path / "vanilla.ckpt")
    tuned = RobustClassifier(**TINY, objective="r2et", init_from=str(tmp_path / "vanilla.ckpt"))
    for (name, a), b in zip(source.model.state_dict().items(), tuned.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    # A different head (num_classes) keeps its fresh initialisation; the rest is loaded.
    other = RobustClassifier(**{**TINY, "num_classes": 5}, init_from=str(tmp_path / "vanilla.ckpt"))
    assert other.model(torch.rand(1, 3, 16, 16)).shape == (1, 5)


def test_init_from_refuses_wrong_architecture(tmp_path):
    _save_checkpoint(RobustClassifier(**{**TINY, "backbone_kwargs": {"width": 8}}), tmp_path / "wide.ckpt")
    with pytest.raises(ValueError, match="does not fit this model"):
        RobustClassifier(**TINY, init_from=str(tmp_path / "wide.ckpt"))
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_model_weights(nn.Linear(1, 1), tmp_path / "missing.ckpt")
