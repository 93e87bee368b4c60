"""Mixed precision: bf16 autocast with every objective and the attacks; fp16 refused; the curvature
term's finite difference guarded against rounding noise (bf16 warning, TF32 off on CUDA)."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from explanations import ATTACKS, OBJECTIVES, build_attack, build_objective
from lightning_modules.backbones import build_backbone
from lightning_modules.classifier import (
    RobustClassifier,
    check_precision,
    check_sync_batchnorm,
    guard_curvature_precision,
)
from lightning_modules.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(backbone="resnet9", backbone_kwargs={"width": 4}, num_classes=3, activation="softplus", k=16, h=0.1)


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    model = build_backbone("resnet9", num_classes=3, width=4, activation="softplus", softplus_beta=2.0).train()
    gen = torch.Generator().manual_seed(0)
    return model, torch.rand(6, 3, 16, 16, generator=gen), torch.arange(6) % 3


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_runs_under_bf16_autocast(model_and_batch, name):
    model, x, y = model_and_batch
    objective = build_objective(name, k=16, h=0.1, steps=2)  # (steps: the AT attack's)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no rounding warning with h = 0.1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = objective(model, x, y)
    assert torch.isfinite(out.loss) and out.logits.shape == (6, 3)
    assert all(torch.isfinite(v).all() for v in out.terms.values())
    grads = torch.autograd.grad(out.loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert sum(g is not None for g in grads) > 0


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attacks_run_under_bf16_autocast(model_and_batch, name):
    model, x, y = model_and_batch
    eps = 8 / 255
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = build_attack(name, model, dict(eps=eps, steps=2, k=16))(x, y)
    assert x_adv.dtype == x.dtype and torch.isfinite(x_adv).all()
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert model.training  # the attack restored the mode


def test_curvature_term_warns_once_when_h_is_below_bf16_resolution(model_and_batch):
    model, x, y = model_and_batch
    objective = build_objective("est_h", h=1e-3)
    with pytest.warns(UserWarning, match="h >= 0.1"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            objective(model, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            objective(model, x, y)  # once per objective
        objective(model, x, y)  # fp32: no warning at all


def test_lightning_bf16_mixed_trains_r2et(tmp_path):
    torch.manual_seed(0)
    module = RobustClassifier(**TINY, objective="r2et")
    data = TensorDataset(torch.rand(8, 3, 16, 16), torch.arange(8) % 3)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=2, inference_mode=False,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=tmp_path,
    )
    before = [p.detach().clone() for p in module.parameters()]
    trainer.fit(module, DataLoader(data, batch_size=4))
    assert trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])


@pytest.mark.parametrize("precision", ["16-mixed", "16-true", "16", 16])
def test_fp16_is_refused_for_double_backprop(precision):
    with pytest.raises(RuntimeError, match=r"fp16.*bf16-mixed.*32-true"):
        check_precision("r2et", precision)
    for ok in ("bf16-mixed", "32-true", "bf16-true", "64-true"):
        check_precision("r2et", ok)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_fp16_and_sync_batchnorm_are_refused_exactly_for_registered_double_backprop(name):
    """The registry's ``double_backprop`` decides (the CLI and on_fit_start call these checks)."""
    if OBJECTIVES[name].double_backprop:
        with pytest.raises(RuntimeError, match=rf"trainer.precision='16-mixed' \(fp16\) .* model.objective='{name}'"):
            check_precision(name, "16-mixed")
        with pytest.raises(RuntimeError, match=rf"trainer.sync_batchnorm=true .* model.objective='{name}'"):
            check_sync_batchnorm(name, True)
    else:
        check_precision(name, "16-mixed")
        check_sync_batchnorm(name, True)
    check_sync_batchnorm(name, False)


def test_on_fit_start_refuses_fp16_but_not_for_vanilla():
    module = RobustClassifier(**TINY, objective="r2et_noh")
    module._trainer = SimpleNamespace(precision="16-mixed")
    with pytest.raises(RuntimeError, match="16-mixed"):
        module.on_fit_start()
    vanilla = RobustClassifier(**TINY, objective="vanilla")
    vanilla._trainer = SimpleNamespace(precision="16-mixed")
    vanilla.on_fit_start()


def test_cli_refuses_fp16_before_building_anything(capsys):
    with pytest.raises(SystemExit, match=r"trainer.precision='16-mixed'.*bf16-mixed"):
        cli_main(["fit", "-c", str(ROOT / "configs/default.yaml"), "--trainer.precision=16-mixed"])


def test_tf32_is_turned_off_on_cuda_for_small_h_and_restored():
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
        r2et = build_objective("r2et", h=1e-3)
        assert guard_curvature_precision(r2et, "cpu", "32-true") is None
        assert guard_curvature_precision(build_objective("r2et_noh"), "cuda", "32-true") is None
        assert guard_curvature_precision(build_objective("r2et", h=0.1), "cuda", "32-true") is None
        previous = guard_curvature_precision(r2et, "cuda", "32-true")
        assert previous == (True, True)
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        with pytest.warns(UserWarning, match="bf16"):
            assert guard_curvature_precision(r2et, "cuda", "bf16-true") is None
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
