import math
import os
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from callbacks import RankingRobustness
from callbacks._eval_subset import EvalSubset, shard_indices, subset_indices
from callbacks.metrics import FlipRate, PrecisionAtK, SampleMean


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is fastest and does not stall when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    args = dict(num_samples=10, batch_size=4, steps=2, attacks=["er", "mse"], thickness_samples=1,
                thickness_points=2, eps=8 / 255, log_images=False)
    args.update(kw)
    return RankingRobustness(**args)


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


def test_metric_objects_reduce_sums_and_counts():
    m = SampleMean()
    m.update(torch.tensor([1.0, float("nan"), 3.0]))
    m.update(torch.tensor([5.0]))
    assert m.compute().item() == pytest.approx(3.0)
    p = PrecisionAtK(2)
    p.update(torch.tensor([[3.0, 2, 1]]), torch.tensor([[3.0, 1, 2]]))
    assert p.compute().item() == pytest.approx(0.5)
    f = FlipRate()
    f.update(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    f.update(torch.tensor([False]))
    assert f.compute().item() == pytest.approx(0.5)


def test_validate_logs_all_metrics_and_restores_the_model(tmp_path):
    module, dm = TinyModule(), TinyDataModule()
    module.model[1].eval()  # a mixed-mode model must come back exactly as it was
    cb = callback()
    t = trainer(tmp_path, cb)
    t.validate(module, datamodule=dm, verbose=False)
    values = {k: float(v) for k, v in t.callback_metrics.items() if k.startswith("robustness/")}
    for src in ("er", "mse", "noise"):
        for kind in ("p_at_k", "spearman", "kendall", "flip_rate", "localization"):
            assert f"robustness/{kind}/{src}/gradient" in values
    assert "robustness/thickness/gradient" in values and "robustness/localization/gradient" in values
    for name, v in values.items():
        assert -1 <= v <= 1 and not math.isnan(v), name
    assert values["robustness/p_at_k/er/gradient"] <= 1.0
    assert values["robustness/flip_rate/er/gradient"] >= 0.0
    assert module.model[0].training and not module.model[1].training
    assert all(p.grad is None for p in module.parameters())
    assert cb.evaluated_epochs == [0]


def test_fit_schedule_skips_sanity_check_and_evaluates_last_epoch(tmp_path):
    cb = callback(every_n_epochs=2, attacks=["er"], noise_baseline=False, thickness=False, correlations=False,
                  eps=[2 / 255, 8 / 255], num_samples=6)
    t = trainer(tmp_path, cb, max_epochs=3, num_sanity_val_steps=1, limit_train_batches=1)
    t.fit(TinyModule(), datamodule=TinyDataModule(masks=False))
    assert cb.evaluated_epochs == [1, 2]
    keys = {k for k in t.callback_metrics if k.startswith("robustness/")}
    assert keys == {"robustness/p_at_k/er/gradient/eps_2", "robustness/p_at_k/er/gradient/eps_8",
                    "robustness/flip_rate/er/gradient/eps_2", "robustness/flip_rate/er/gradient/eps_8"}


def test_inference_mode_is_refused_early(tmp_path):
    t = trainer(tmp_path, callback(), inference_mode=True)
    with pytest.raises(RuntimeError, match="inference_mode: false"):
        t.validate(TinyModule(), datamodule=TinyDataModule(), verbose=False)


def test_bad_settings_fail_at_construction():
    with pytest.raises(ValueError, match="attack"):
        RankingRobustness(attacks=["pgd"])
    with pytest.raises(ValueError, match="explanation method"):
        RankingRobustness(methods=["lrp"])
    with pytest.raises(ValueError, match="not in methods"):
        RankingRobustness(method_kwargs={"smoothgrad": {"num_samples": 2}})


def test_images_go_to_wandb_on_rank_zero(tmp_path):
    class FakeWandb(WandbLogger):
        def __init__(self):
            self.calls = []

        def log_image(self, key, images, step=None, **kwargs):
            self.calls.append((key, images, step, kwargs))

    module, dm = TinyModule(), TinyDataModule()
    dm.setup()
    cb = callback(attacks=["er"], methods=["gradient", "smoothgrad"], method_kwargs={"smoothgrad": {"num_samples": 2}},
                  log_images=True, num_images=3, thickness=False, correlations=False, pool=2)
    fake_trainer = SimpleNamespace(
        datamodule=dm, global_rank=0, world_size=1, is_global_zero=True, current_epoch=4, global_step=9,
        loggers=[FakeWandb()],
    )
    values, images = cb.evaluate(fake_trainer, module)
    assert set(images) == {"er/gradient", "er/smoothgrad"}
    assert "robustness/p_at_k/er/smoothgrad" in values
    cb._log_images(fake_trainer, images)
    calls = fake_trainer.loggers[0].calls
    assert [c[0] for c in calls] == ["robustness/saliency/er/gradient", "robustness/saliency/er/smoothgrad"]
    grid = calls[0][1][0]
    assert grid.dim() == 3 and grid.shape[0] == 3 and calls[0][2] == 9


# ------------------------------------------------------------------ DDP equality
def _ddp_callback() -> RankingRobustness:
    return callback(num_samples=11, batch_size=3, random_start=True, methods=["gradient", "smoothgrad"],
                    method_kwargs={"smoothgrad": {"num_samples": 2}})


def test_two_process_ddp_equals_single_process(tmp_path):
    single_cb = _ddp_callback()
    single = trainer(tmp_path / "one", single_cb, precision="64-true")
    single.validate(TinyModule(), datamodule=TinyDataModule(val_size=20), verbose=False)
    want = {k: float(v) for k, v in single.callback_metrics.items() if k.startswith("robustness/")}
    assert len(want) > 20

    ddp = trainer(tmp_path / "two", _ddp_callback(), precision="64-true", devices=2, strategy="ddp_spawn")
    ddp.validate(TinyModule(), datamodule=TinyDataModule(val_size=20), verbose=False)
    got = {k: float(v) for k, v in ddp.callback_metrics.items() if k.startswith("robustness/")}
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-6), name
