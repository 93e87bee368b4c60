"""The reproduction study, the callbacks and the protocol give the same numbers on the same model,
images and settings: one protocol, one noise stream, one PSE target draw."""

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.reproduce.data import ImageSet
from benchmarks.reproduce.evaluate import Evaluator
from benchmarks.reproduce.presets import EvalConfig
from callbacks import PSEAnalysis, RankingRobustness
from callbacks._eval_subset import EvalSubset
from explanations.pse import PSESettings


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def relu_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 64, 3))


class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = relu_net()

    def validation_step(self, batch, idx):
        pass


def test_study_and_callbacks_give_identical_numbers(tmp_path):
    gen = torch.Generator().manual_seed(0)
    val = TensorDataset(torch.rand(20, 3, 16, 16, generator=gen, dtype=torch.float64), torch.arange(20) % 3)
    eps = 4 / 255
    cfg = EvalConfig(batch_size=4, eps=eps, surrogate_beta=10.0, pse_steps=3, pse_group_size=8,
                     thickness_samples=1, thickness_points=2, seed=0)
    rr = RankingRobustness(num_samples=9, batch_size=4, eps=[eps], steps=2, k=16,
                           attacks=[{"name": "er", "kwargs": {"surrogate_beta": None}}, {"name": "er_surrogate", "attack": "er", "kwargs": {"surrogate_beta": 10.0}}],
                           thickness_samples=1, thickness_points=2, log_images=False, correlations=True)
    pse = PSEAnalysis(num_samples=9, batch_size=4, settings=PSESettings(eps=eps, steps=3, group_size=8),
                      log_table=False, log_chart=False)
    module = Module().double()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                        default_root_dir=tmp_path, callbacks=[rr, pse])
    trainer.validate(module, DataLoader(val, batch_size=4), verbose=False)

    # the study on the same images (same dataset indices) and settings
    ids = EvalSubset(val, 9, seed=0).indices
    images = ImageSet(val.tensors[0][ids], val.tensors[1][ids], ids)
    ev = Evaluator(module.model, cfg, k=16, pool=None, relu=True, device="cpu")
    er = ev.robust_attack(images, "er", eps, steps=2)
    tag = "eps_4"
    for key, src in (("final", "worst"), ("direct", "er"), ("surrogate", "er_surrogate")):
        for metric in ("p_at_k", "spearman", "kendall"):
            study = float(er[key][metric].double().nanmean())
            assert rr.last_values[f"robustness/{metric}/{src}/gradient/{tag}"] == pytest.approx(study, abs=1e-12), (key, metric)
    assert rr.last_values[f"robustness/p_at_k/noise/gradient/{tag}"] == pytest.approx(float(ev.noise(images, eps).double().mean()), abs=1e-12)
    assert rr.last_values["robustness/thickness/all_pairs/gradient"] == pytest.approx(
        float(ev.thickness(images).double().mean()), abs=1e-12)
    study_pse = ev.pse(images)
    for key in ("attack_success_rate", "frac_suppression", "frac_promotion", "mean_phi"):
        assert pse.last_values[f"pse/{key}"] == pytest.approx(study_pse[key], abs=1e-12, nan_ok=True), key
