"""More CUDA checks for scripts/device_check.sh (marker ``gpu``; skipped without a GPU): the lean
layers against PyTorch's in float64, bf16-mixed training for every objective, the attacks.

    python -m pytest -m gpu tests/test_gpu_layers.py
    GPU_TEST_DEVICE=cpu python -m pytest -m gpu tests/test_gpu_layers.py   # the same checks on CPU
"""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from explanations import build_objective
from explanations.attacks import ATTACKS, build_attack
from explanations.fast_batchnorm import use_fast_batchnorm
from explanations.lean_layers import use_lean_layers
from explanations.objectives import OBJECTIVES
from explanations.ranking_metrics import precision_at_k
from explanations.saliency import saliency
from lightning_modules.backbones import build_backbone
from lightning_modules.classifier import RobustClassifier

DEVICE = os.environ.get("GPU_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CURVATURE = {"r2et", "r2et_mm", "est_h"}


def _pair():
    torch.manual_seed(0)
    ref = build_backbone("resnet9", num_classes=10, width=8, activation="softplus").to(DEVICE).double().train()
    lean = build_backbone("resnet9", num_classes=10, width=8, activation="softplus").to(DEVICE).double().train()
    lean.load_state_dict(ref.state_dict())
    assert use_lean_layers(lean) > 0 and use_fast_batchnorm(lean) > 0
    return ref, lean


@pytest.mark.parametrize("objective", ["r2et", "r2et_noh", "grad_norm"])
def test_lean_layers_match_pytorch_in_float64(objective):
    """Every parameter gradient of a double-backprop objective through the lean Conv2d / Softplus /
    MaxPool2d and the fast BatchNorm equals PyTorch's layers' (float64, train mode)."""
    ref, lean = _pair()
    x = torch.rand(8, 3, 32, 32, device=DEVICE, dtype=torch.float64)
    y = torch.arange(8, device=DEVICE) % 10
    obj = build_objective(objective, k=32)
    out_ref, out_lean = obj(ref, x, y), obj(lean, x, y)
    torch.testing.assert_close(out_lean.loss, out_ref.loss, rtol=1e-9, atol=1e-12)
    g_ref = torch.autograd.grad(out_ref.loss, list(ref.parameters()))
    g_lean = torch.autograd.grad(out_lean.loss, list(lean.parameters()))
    for a, b in zip(g_lean, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_bf16_mixed_trains_every_objective(objective):
    h = {"h": 0.1} if objective in CURVATURE else {}  # bf16 needs h >= 0.1 for the curvature term (README)
    module = RobustClassifier(backbone="resnet9", backbone_kwargs={"width": 8}, num_classes=3, activation="softplus",
                              k=16, objective=objective, **h)
    data = TensorDataset(torch.rand(16, 3, 32, 32), torch.arange(16) % 3)
    trainer = L.Trainer(
        accelerator="gpu" if DEVICE == "cuda" else "cpu", devices=1, precision="bf16-mixed", max_steps=2,
        inference_mode=False, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(module, DataLoader(data, batch_size=8))
    assert trainer.global_step == 2
    logged = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/") and k.endswith("_epoch")}
    assert logged and all(torch.isfinite(v) for v in logged.values()), logged


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attacks_keep_their_contract_on_the_device(name):
    torch.manual_seed(0)
    model = build_backbone("resnet9", num_classes=10, width=8, activation="softplus").to(DEVICE).eval()
    x = torch.rand(8, 3, 32, 32, device=DEVICE)
    y = model(x).argmax(1)
    eps = 8 / 255
    attack = build_attack(name, model, dict(eps=eps, steps=10, k=100))
    x_adv = attack(x, y)
    assert x_adv.device == x.device and x_adv.dtype == x.dtype
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert not model.training and all(p.grad is None for p in model.parameters())
    s, s_adv = saliency(model, x, y), saliency(model, x_adv, y)
    assert precision_at_k(s, s_adv, 100).mean() < 1.0  # the top-100 moved
