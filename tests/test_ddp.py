"""Two CPU processes (DDP, gloo) compute what one process computes on the same global batch.

One module-scoped pair of runs (DDP startup costs seconds): a BatchNorm-free tiny ResNet-9 trained
with R2ET (adaptive weights, so the cross-rank statistics are exercised) for 3 SGD steps, then
validation and the evaluation callbacks (RankingRobustness, PSEAnalysis: each shards its subset
across the ranks and reduces). Rank r takes samples r, r + 2, ... (no shuffle), so
the two ranks' batches of 4 together are the single process's batch of 8 (Lightning's own
DistributedSampler would shuffle the training set, so the test brings its own sampler).
"""

from __future__ import annotations

import csv
import functools
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler, TensorDataset

from explanations.evaluation import ProtocolSettings
from callbacks import PSEAnalysis, RankingRobustness
from explanations.pse import PSESettings
from lightning_modules.classifier import RobustClassifier

GLOBAL_BATCH = 8
STEPS = 3


class RankInterleaved(Sampler):
    """Rank r of w takes samples r, r + w, r + 2w, ... in order (the whole set in one process)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def _rank(self) -> tuple[int, int]:
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    def __iter__(self):
        rank, world = self._rank()
        return iter(range(rank, self.size, world))

    def __len__(self) -> int:
        rank, world = self._rank()
        return len(range(rank, self.size, world))


def strip_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm by Identity: per-rank batch statistics would differ from the global ones."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, nn.Identity())
    return module


def make_module() -> RobustClassifier:
    torch.manual_seed(0)
    # h = 1e-2: the curvature term (g(x + h u) - g(x)) / h amplifies fp32 summation-order
    # differences (DDP sums gradients in another order) by 1/h; with the default 1e-3 three SGD
    # steps already differ by ~5e-5 in a few weights, with 1e-2 by < 1e-7.
    module = RobustClassifier(
        backbone="resnet9", backbone_kwargs={"width": 4}, num_classes=3, activation="softplus", softplus_beta=2.0,
        objective="r2et", k=16, adaptive=True, weight=0.1, h=1e-2,
        optimizer=functools.partial(torch.optim.SGD, lr=0.02),  # picklable for spawn
    )
    strip_batchnorm(module.model)
    return module


def datasets():
    gen = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.rand(GLOBAL_BATCH * STEPS, 3, 16, 16, generator=gen), torch.arange(GLOBAL_BATCH * STEPS) % 3)
    val = TensorDataset(torch.rand(8, 3, 16, 16, generator=gen), torch.arange(8) % 3)
    return train, val


def fit(tmp_path, devices: int) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    module = make_module()
    train, val = datasets()
    batch = GLOBAL_BATCH // devices
    callbacks = [
        RankingRobustness(
            num_samples=8, batch_size=4, log_images=False,
            protocol=ProtocolSettings(steps=2, attacks=["er"], thickness=False, localization=False, noise=True),
        ),
        PSEAnalysis(num_samples=8, batch_size=4, settings=PSESettings(steps=2, only_correct=False, group_size=8),
                    log_table=False, log_chart=False),
    ]
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
        max_epochs=1, inference_mode=False, num_sanity_val_steps=0, log_every_n_steps=1,
        logger=CSVLogger(tmp_path, name=f"devices{devices}"), callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(
        module,
        DataLoader(train, batch_size=batch, sampler=RankInterleaved(len(train))),
        DataLoader(val, batch_size=4 // devices, sampler=RankInterleaved(len(val))),
    )
    path = next(tmp_path.glob(f"devices{devices}/version_*/metrics.csv"))
    columns: dict[str, list[float]] = {}
    for row in csv.DictReader(path.open()):
        for key, value in row.items():
            if value not in ("", None) and key not in ("epoch", "step"):
                columns.setdefault(key, []).append(float(value))
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}, columns


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    return fit(tmp, devices=1), fit(tmp, devices=2)


def test_ddp_final_weights_match_single_process(runs):
    (single, _), (ddp, _) = runs
    initial = make_module().model.state_dict()
    assert single.keys() == ddp.keys()
    moved = max((single[k] - initial[k]).abs().max().item() for k in single if single[k].is_floating_point())
    assert moved > 1e-3, "the runs did not train"
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")


def test_ddp_logged_metrics_match_single_process(runs):
    (_, single), (_, ddp) = runs
    expected_train = {f"train/{t}_step" for t in ("ce", "gap", "topk_margin", "lambda_gap", "curvature", "lambda_curvature", "loss")}
    assert expected_train <= set(single)
    assert any(key.startswith("robustness/p_at_k/") for key in single)  # evaluation callbacks, sharded
    assert "pse/attack_success_rate" in single
    assert "val/acc" in single and "train/acc" in single
    assert set(ddp) == set(single)
    for key in sorted(single):
        assert len(ddp[key]) == len(single[key]), key
        for a, b in zip(ddp[key], single[key]):
            same = math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5) or (math.isnan(a) and math.isnan(b))
            assert same, f"{key}: ddp {ddp[key]} vs single {single[key]}"
    assert len(single["train/loss_step"]) == STEPS


def test_a_failure_in_one_rank_ends_the_run_with_its_message(tmp_path):
    """Rank 1 raises at step 1 while rank 0 waits in the gradient all-reduce: the launch (train.py
    with Lightning's own launcher, 2 gloo processes) must exit non-zero, promptly, with the message."""
    import time

    from tests.distributed.helpers import child_env, r2et_config, train_py, wait_all

    config = r2et_config(tmp_path, 2, "fail", evaluation=False,
                         extra_callbacks=({"class_path": "tests.distributed.helpers.FailOnRank", "init_args": {"step": 1}},))
    start = time.monotonic()
    ((code, out),) = wait_all([train_py(["fit", "-c", str(config)], tmp_path, child_env(FAIL_ON_RANK="1"))], timeout=150)
    took = time.monotonic() - start
    assert code != 0, out[-3000:]
    assert "injected failure in global rank 1 at step 1" in out
    assert took < 150, f"took {took:.0f} s"
