"""The reproduction study's numbers equal the per-epoch callbacks' logs on the same model, images and
settings: a user compares the study's tables (``evaluate_model``, ``sweep_metrics``) with the
``robustness/*`` and ``pse/*`` values of their own runs."""

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from benchmarks.reproduce.data import ImageSet
from benchmarks.reproduce.evaluate import evaluate_model, sweep_metrics
from benchmarks.reproduce.presets import EvalConfig
from callbacks import PSEAnalysis, RankingRobustness
from callbacks._eval_subset import EvalSubset
from explanations.evaluation import ProtocolSettings, eps_tag
from explanations.pse import PSESettings

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

EPS = (2 / 255, 4 / 255)


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


def _validate(module, data, callbacks, root):
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                        default_root_dir=root, callbacks=callbacks)
    trainer.validate(module, DataLoader(data, batch_size=4), verbose=False)


def test_study_tables_equal_the_callbacks_logs_on_the_same_images(tmp_path):
    gen = torch.Generator().manual_seed(0)
    val = TensorDataset(torch.rand(20, 3, 16, 16, generator=gen, dtype=torch.float64), torch.arange(20) % 3)
    module = Module().double()
    # the callbacks' defaults: the protocol's default ensemble (ER, ER through Softplus(10), MSE, noise)
    rr = RankingRobustness(num_samples=9, batch_size=4, log_images=False, protocol=ProtocolSettings(
        eps=list(EPS), steps=2, k=16, thickness_samples=1, thickness_points=2))
    pse = PSEAnalysis(num_samples=9, batch_size=4, settings=PSESettings(eps=EPS[-1], steps=3, group_size=8),
                      log_table=False, log_chart=False)
    _validate(module, val, [rr, pse], tmp_path / "main")
    # the sweep's attack: ER and its Softplus(10) version, worst case of the two, no noise baseline
    sweep_cb = RankingRobustness(num_samples=9, batch_size=4, log_images=False, protocol=ProtocolSettings(
        eps=[EPS[-1]], steps=2, k=16, noise=False, thickness=False, correlations=False,
        attacks=[{"name": "er", "kwargs": {"surrogate_beta": None}},
                 {"name": "er_surrogate", "attack": "er", "kwargs": {"surrogate_beta": 10.0}}]))
    _validate(module, val, [sweep_cb], tmp_path / "sweep")

    # the study on the callbacks' images (the same dataset indices) with the same settings
    ids = EvalSubset(val, 9, seed=0).indices
    images = ImageSet(val.tensors[0][ids], val.tensors[1][ids], ids)
    cfg = EvalConfig(size=9, batch_size=4, steps=2, eps=EPS[-1], eps_list=EPS, thickness_samples=1, thickness_points=2,
                     check_size=0, paper_size=0, explainer_size=0, pse_size=9, pse_steps=3, pse_group_size=8,
                     surrogate_beta=10.0, seed=0)
    study = evaluate_model(module.model, images, Subset(val, ids.tolist()), cfg, k=16, pool=None, relu=True,
                           device="cpu", log=lambda line: None)
    logged = rr.last_values

    def same(study_value, key):
        assert study_value == pytest.approx(logged[key], abs=1e-12, nan_ok=True), key

    assert set(study["p_at_k"]) == {"er", "er_surrogate", "mse", "noise", "worst"}
    for src, block in study["p_at_k"].items():
        for eps in EPS:
            same(block[eps_tag(eps)]["mean"], f"robustness/p_at_k/{src}/gradient/{eps_tag(eps)}")
    for eps in EPS:
        same(study["spearman_worst"][eps_tag(eps)]["mean"], f"robustness/spearman/worst/gradient/{eps_tag(eps)}")
        same(study["flip_rate_worst"][eps_tag(eps)]["mean"], f"robustness/flip_rate/worst/gradient/{eps_tag(eps)}")
    for pairs in ("boundary", "all_pairs"):
        same(study[f"thickness_{pairs}"]["mean"], f"robustness/thickness/{pairs}/gradient")
    assert study["subset_acc"] == pytest.approx(logged["robustness/accuracy"], abs=1e-7)  # a float32 mean
    assert study["test_acc"] == pytest.approx(logged["robustness/accuracy"], abs=1e-12)  # the same 9 images
    assert study["p_at_k"]["worst"][eps_tag(EPS[-1])]["mean"] < 1.0  # the attacks moved the rankings
    for key in ("attack_success_rate", "frac_suppression", "frac_promotion", "mean_phi"):
        assert study["pse"][key] == pytest.approx(pse.last_values[f"pse/{key}"], abs=1e-12, nan_ok=True), key

    sweep = sweep_metrics(module.model, Subset(val, ids.tolist()), images, cfg, k=16, pool=None, relu=True, steps=2,
                          device="cpu")
    assert sweep["val_p_at_k"]["mean"] == pytest.approx(
        sweep_cb.last_values[f"robustness/p_at_k/worst/gradient/{eps_tag(EPS[-1])}"], abs=1e-12)
