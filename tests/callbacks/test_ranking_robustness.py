import math
import dataclasses
import os
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from callbacks import RankingRobustness
from callbacks._eval_subset import EvalSubset, balanced_subset_indices, shard_indices, subset_indices
from datamodules.subsets import dataset_labels
from explanations.evaluation import EvaluationProtocol, ProtocolSettings


# ------------------------------------------------------------------ tiny model and data
class TinyData(Dataset):
    """12 px images, 3 classes, a bright square per class, its pixels the item's mask."""

    def __init__(self, n: int, seed: int, masks: bool = True) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 3, 12, 12, generator=g) * 0.6
        self.y = torch.arange(n) % 3
        self.mask = torch.zeros(n, 12, 12, dtype=torch.bool)
        for c in range(3):
            self.mask[self.y == c, 4 * c : 4 * c + 4, 2:6] = True
        self.x = torch.where(self.mask[:, None], self.x + 0.4, self.x).clamp(0, 1)
        self.masks = masks

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return (self.x[i], self.y[i], self.mask[i]) if self.masks else (self.x[i], self.y[i])


class TinyDataModule(L.LightningDataModule):
    def __init__(self, masks: bool = True, val_size: int = 14) -> None:
        super().__init__()
        self.masks, self.val_size = masks, val_size

    def setup(self, stage=None):
        self.train_dataset = TinyData(24, 0, self.masks)
        self.val_dataset = TinyData(self.val_size, 1, self.masks)

    def train_dataloader(self):
        return DataLoader(self.train_dataset, batch_size=8)

    def val_dataloader(self):
        return DataLoader(self.val_dataset, batch_size=8)


class TinyModule(L.LightningModule):
    def __init__(self, k: int = 10, target: str = "loss", pool=None) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.model = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus(beta=4.0),
            nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.Softplus(beta=4.0), nn.Flatten(), nn.Linear(4 * 36, 3),
        )

    def training_step(self, batch, idx):
        return F.cross_entropy(self.model(batch[0]), batch[1])

    def validation_step(self, batch, idx):
        self.log("val/ce", F.cross_entropy(self.model(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def callback(**kw) -> RankingRobustness:
    """A small RankingRobustness; keyword arguments of ProtocolSettings go into its ``protocol``."""
    protocol = dict(steps=2, attacks=["er", "mse"], thickness_samples=1, thickness_points=2, eps=[8 / 255])
    args = dict(num_samples=10, batch_size=4, log_images=False)
    names = {f.name for f in dataclasses.fields(ProtocolSettings)}
    for key, value in kw.items():
        (protocol if key in names else args)[key] = value
    return RankingRobustness(protocol=ProtocolSettings(**protocol), **args)


def trainer(tmp_path, cb, **kw) -> L.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                default_root_dir=tmp_path, max_epochs=1, num_sanity_val_steps=0)
    args.update(kw)
    return L.Trainer(callbacks=[cb], **args)


# ------------------------------------------------------------------ tests
def test_subset_is_fixed_seeded_and_sharded_without_duplicates():
    idx = subset_indices(100, 10, seed=3)
    assert torch.equal(idx, subset_indices(100, 10, seed=3))
    assert not torch.equal(idx, subset_indices(100, 10, seed=4))
    shards = [shard_indices(idx, r, 3) for r in range(3)]
    assert sorted(torch.cat(shards).tolist()) == sorted(idx.tolist())
    assert [len(s) for s in shards] == [4, 3, 3]
    assert len(subset_indices(5, 10, 0)) == 5
    sub = EvalSubset(TinyData(9, 0), num_samples=7, seed=1, rank=1, world_size=2, batch_size=2)
    batches = list(sub)
    assert [b.x.shape[0] for b in batches] == [2, 1] and sub.has_mask
    assert torch.equal(torch.cat([b.ids for b in batches]), sub.shard)
    assert list(EvalSubset(TinyData(9, 0, masks=False), 4).__iter__())[0].mask is None


def test_subset_is_class_balanced_when_labels_are_known():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 5)
    idx = balanced_subset_indices(labels, 9, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [3, 3, 3]
    assert torch.equal(idx, balanced_subset_indices(labels, 9, seed=0))
    assert sorted(balanced_subset_indices(labels, 18, seed=1).tolist()) == list(range(18))
    data = TinyData(12, 0)
    data.labels = data.y
    assert torch.equal(dataset_labels(data), data.y)
    sub = EvalSubset(data, num_samples=6, seed=2)
    assert sub.balanced and torch.bincount(data.y[sub.indices]).tolist() == [2, 2, 2]
    plain = [(torch.zeros(3, 4, 4), i % 3) for i in range(12)]  # no label attribute: plain permutation
    assert not EvalSubset(plain, 6).balanced and torch.equal(EvalSubset(plain, 6).indices, subset_indices(12, 6, 0))


SOURCES = ("er", "mse", "noise", "worst")


def test_validate_logs_every_attack_and_the_worst_case_and_restores_the_model(tmp_path):
    module, dm = TinyModule(), TinyDataModule()
    module.model[1].eval()  # a mixed-mode model must come back exactly as it was
    cb = callback(eps=[2 / 255, 8 / 255])
    t = trainer(tmp_path, cb)
    t.validate(module, datamodule=dm, verbose=False)
    values = {k: float(v) for k, v in t.callback_metrics.items() if k.startswith("robustness/")}
    for src in SOURCES:
        for kind in ("p_at_k", "spearman", "kendall", "flip_rate", "localization"):
            for tag in ("eps_2", "eps_8"):
                assert f"robustness/{kind}/{src}/gradient/{tag}" in values, (kind, src, tag)
    assert "robustness/thickness/all_pairs/gradient" in values
    assert "robustness/localization/clean/gradient" in values and "robustness/accuracy" in values
    for name, v in values.items():
        assert -1 <= v <= 1 and not math.isnan(v), name
    for tag in ("eps_2", "eps_8"):
        worst = values[f"robustness/p_at_k/worst/gradient/{tag}"]
        assert all(worst <= values[f"robustness/p_at_k/{s}/gradient/{tag}"] + 1e-7 for s in ("er", "mse", "noise"))
    assert values["robustness/p_at_k/worst/gradient/eps_8"] <= values["robustness/p_at_k/worst/gradient/eps_2"]
    assert values["robustness/flip_rate/er/gradient/eps_8"] == 0.0  # the attacks keep the prediction
    assert module.model[0].training and not module.model[1].training
    assert all(p.grad is None for p in module.parameters())
    assert cb.evaluated_epochs == [0]
    assert cb.last_report["num_images"] == 10 and cb.last_report["k"] == 10


def test_callback_numbers_equal_the_protocol_on_the_same_images(tmp_path):
    module, dm = TinyModule(), TinyDataModule()
    cb = callback(eps=[2 / 255, 8 / 255], attack_kwargs={"random_start": True})
    t = trainer(tmp_path, cb, precision="64-true")
    t.validate(module, datamodule=dm, verbose=False)
    got = {k: float(v) for k, v in t.callback_metrics.items() if k.startswith("robustness/")}
    dm.setup()
    protocol = EvaluationProtocol(eps=[2 / 255, 8 / 255], attacks=["er", "mse"], k=10, steps=2,
                                  attack_kwargs={"random_start": True}, thickness_samples=1, thickness_points=2)
    subset = EvalSubset(dm.val_dataset, 10, seed=0, batch_size=4)
    model = module.model.double()
    want = protocol.evaluate(model, [b.to("cpu", torch.float64) for b in subset]).means()
    assert len(want) > 40
    for key, value in want.items():
        assert cb.last_values["robustness/" + key] == value, key  # exactly the protocol's numbers
        assert got["robustness/" + key] == pytest.approx(value, abs=1e-7), key  # logged as float32


def test_fit_schedule_skips_sanity_check_and_evaluates_last_epoch(tmp_path):
    cb = callback(every_n_epochs=2, attacks=["er"], noise=False, thickness=False, correlations=False,
                  eps=[2 / 255, 8 / 255], num_samples=6)
    t = trainer(tmp_path, cb, max_epochs=3, num_sanity_val_steps=1, limit_train_batches=1)
    t.fit(TinyModule(), datamodule=TinyDataModule(masks=False))
    assert cb.evaluated_epochs == [1, 2]
    keys = {k for k in t.callback_metrics if k.startswith("robustness/")}
    assert keys == {f"robustness/{m}/{s}/gradient/{e}" for m in ("p_at_k", "flip_rate") for s in ("er", "worst")
                    for e in ("eps_2", "eps_8")} | {"robustness/accuracy"}


def test_inference_mode_is_refused_early(tmp_path):
    t = trainer(tmp_path, callback(), inference_mode=True)
    with pytest.raises(RuntimeError, match="inference_mode: false"):
        t.validate(TinyModule(), datamodule=TinyDataModule(), verbose=False)


def test_bad_settings_fail_at_construction_naming_value_and_choices():
    with pytest.raises(ValueError, match=r"'pgd'.*valid: \['er', 'mse', 'noise'\]"):
        ProtocolSettings(attacks=["pgd"])
    with pytest.raises(ValueError, match="'lrp'.*valid"):
        ProtocolSettings(methods=["lrp"])
    with pytest.raises(ValueError, match="not in methods"):
        ProtocolSettings(method_kwargs={"smoothgrad": {"num_samples": 2}})
    with pytest.raises(ValueError, match=r"eps=-0.1 is not valid; valid: \(0, 1\]"):
        ProtocolSettings(eps=[-0.1])
    with pytest.raises(ValueError, match=r"eps=8 is in pixel units of \[0, 1\]; did you mean 8/255 = 0\.0314\?"):
        ProtocolSettings(eps=8)
    with pytest.raises(ValueError, match=r"steps=0 must be an integer >= 1"):
        ProtocolSettings(steps=0)
    with pytest.raises(ValueError, match="unknown keys"):
        ProtocolSettings(attacks=[{"name": "er2", "attack": "er", "kwrgs": {}}])
    with pytest.raises(ValueError, match="unique"):
        ProtocolSettings(attacks=["er", {"name": "er", "attack": "mse"}])
    with pytest.raises(TypeError, match="num_imagez"):
        RankingRobustness(num_imagez=3)


class CountingModule(TinyModule):
    steps = 0

    def training_step(self, batch, idx):
        CountingModule.steps += 1
        return super().training_step(batch, idx)


def test_k_against_the_data_is_refused_in_setup_before_any_step(tmp_path):
    CountingModule.steps = 0
    t = trainer(tmp_path, callback(k=500))
    with pytest.raises(ValueError, match=r"RankingRobustness: k=500 is out of range for 144 features"):
        t.fit(CountingModule(k=10), datamodule=TinyDataModule())
    assert CountingModule.steps == 0
    with pytest.raises(TypeError, match=r"attack entry 'er' \('er', ERAttack\) does not take \['stepz'\]; its options: .*'steps'"):
        callback(attacks=[{"name": "er", "kwargs": {"stepz": 3}}])  # refused when the callback is built


def test_surrogate_auto_is_dropped_with_a_note_on_a_smooth_model(tmp_path, caplog):
    cb = callback(attacks=None, eps=[8 / 255])
    t = trainer(tmp_path, cb)
    with caplog.at_level("WARNING"):
        t.validate(TinyModule(), datamodule=TinyDataModule(), verbose=False)
    assert "er_surrogate" in caplog.text and "no ReLU-type activations" in caplog.text
    assert cb.last_report["attacks"] == ["er", "mse", "noise"]
    assert cb.last_report["notes"]


class ReluModule(TinyModule):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, stride=2),
                                   nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))


def test_default_ensemble_on_a_relu_model_keeps_the_surrogate_attack(tmp_path):
    cb = callback(attacks=None, eps=[8 / 255], thickness=False)
    trainer(tmp_path, cb).validate(ReluModule(), datamodule=TinyDataModule(), verbose=False)
    assert cb.last_report["attacks"] == ["er", "er_surrogate", "mse", "noise"]
    assert cb.last_report["settings"]["attacks"][1]["kwargs"] == {"surrogate_beta": "auto"}


def test_wandb_offline_saliency_png_has_real_colours(tmp_path):
    wandb = pytest.importorskip("wandb")
    from PIL import Image

    os.environ["WANDB_MODE"] = "offline"
    try:
        logger = WandbLogger(project="test", save_dir=str(tmp_path), offline=True)
        module, dm = TinyModule(), TinyDataModule()
        cb = callback(attacks=["er"], eps=[8 / 255], log_images=True, num_images=2, thickness=False)
        t = trainer(tmp_path, cb, logger=logger)
        t.validate(module, datamodule=dm, verbose=False)
        run_dir = Path(logger.experiment.dir)
        run_config = dict(logger.experiment.config)
        wandb.finish()
    finally:
        os.environ["WANDB_MODE"] = "disabled"
    pngs = sorted(run_dir.glob("media/images/robustness/saliency/gradient*.png"))
    assert pngs, sorted(str(p) for p in run_dir.rglob("*.png"))
    png = torch.from_numpy(__import__("numpy").array(Image.open(pngs[0]).convert("RGB"))).permute(2, 0, 1)
    # the first tile (after 2 px padding) is the clean image, nearest-upsampled x5 (12 px -> 60 px)
    dm.setup()
    first = int(cb.eval_subset(t, "validate").shard[0])
    x = dm.val_dataset[first][0]
    tile = png[:, 2:62, 2:62].float()
    expected = (F.interpolate(x[None], scale_factor=5, mode="nearest")[0] * 255).round()
    assert tile.max() > 100 and (tile[0] - tile[1]).abs().max() > 30  # bright, colourful: not zeros, not grey
    assert (tile - expected).abs().max() <= 1.0
    assert any(run_dir.rglob("*p_at_k_table*")) and any(run_dir.rglob("*p_at_k_vs_eps*"))
    settings = run_config["callbacks/RankingRobustness"]  # the evaluation settings in the run config
    assert settings["eps"] == ["8/255"] and settings["num_samples"] == 10 and settings["steps"] == 2


def test_progress_is_shown_while_the_evaluation_runs(tmp_path, capsys):
    t = trainer(tmp_path, callback(eps=[8 / 255]), enable_progress_bar=True)
    t.validate(TinyModule(), datamodule=TinyDataModule(), verbose=False)
    assert "RankingRobustness (validate)" in capsys.readouterr().err
