"""Checks that need CUDA (marker ``gpu``; deselected by default, skipped without a GPU).

    python -m pytest -m gpu tests/test_gpu.py
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from explanations import build_objective
from explanations.fast_batchnorm import use_fast_batchnorm
from lightning_modules.backbones import build_backbone
from lightning_modules.classifier import RobustClassifier

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
TINY = dict(backbone="resnet9", backbone_kwargs={"width": 8}, num_classes=3, activation="softplus", k=16)


def _fit(module, precision, steps=2):
    data = TensorDataset(torch.rand(16, 3, 32, 32), torch.arange(16) % 3)
    trainer = L.Trainer(
        accelerator="gpu", devices=1, precision=precision, max_steps=steps, inference_mode=False,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, DataLoader(data, batch_size=8))
    return trainer


@pytest.mark.parametrize("objective", ["r2et_noh", "grad_norm", "at"])
def test_bf16_mixed_trains_on_gpu(objective):
    module = RobustClassifier(**TINY, objective=objective)
    trainer = _fit(module, "bf16-mixed")
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])


def test_fp16_refused_on_gpu():
    with pytest.raises(RuntimeError, match="fp16"):
        _fit(RobustClassifier(**TINY, objective="r2et"), "16-mixed")


def test_tf32_off_during_curvature_training_and_restored():
    torch.backends.cudnn.allow_tf32 = True
    seen = {}

    class Probe(L.Callback):
        def on_train_batch_start(self, *args):
            seen["tf32"] = torch.backends.cudnn.allow_tf32

    module = RobustClassifier(**TINY, objective="r2et", h=1e-3)
    data = TensorDataset(torch.rand(8, 3, 32, 32), torch.arange(8) % 3)
    L.Trainer(
        accelerator="gpu", devices=1, max_steps=1, inference_mode=False, logger=False, callbacks=[Probe()],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    ).fit(module, DataLoader(data, batch_size=8))
    assert seen["tf32"] is False and torch.backends.cudnn.allow_tf32 is True


def test_fast_batchnorm_matches_pytorch_on_gpu():
    torch.manual_seed(0)
    ref = build_backbone("resnet9", num_classes=10, width=8, activation="softplus").cuda().double().train()
    fast = build_backbone("resnet9", num_classes=10, width=8, activation="softplus").cuda().double().train()
    fast.load_state_dict(ref.state_dict())
    use_fast_batchnorm(fast)
    x = torch.rand(8, 3, 32, 32, device="cuda", dtype=torch.float64)
    y = torch.arange(8, device="cuda") % 10
    objective = build_objective("r2et", k=32)
    g_ref = torch.autograd.grad(objective(ref, x, y).loss, list(ref.parameters()))
    g_fast = torch.autograd.grad(objective(fast, x, y).loss, list(fast.parameters()))
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def test_full_fp32_context_on_gpu():
    from explanations.precision import full_fp32

    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        a = torch.randn(256, 256, device="cuda")
        with full_fp32():
            exact = a @ a
        torch.testing.assert_close(exact, (a.double() @ a.double()).float(), rtol=1e-5, atol=1e-4)
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
