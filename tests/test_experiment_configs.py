"""The vanilla pretrain config's optimizer settings train a ResNet-9 from scratch without diverging.

The shipped config (optimizer, momentum, clipping, schedule) runs through the real CLI; only the size
changes: a width-8 ResNet-9 on 16 px synthetic data, 12 steps of batch 32. Without its gradient
clipping, SGD at lr 0.05 with Nesterov momentum blew the train CE up from 3.2 to 7.8 here (on CIFAR-10
at width 64: 5.2 -> 92), because the ResNet-9 head has no 0.125 logit scale. The R2ET fine-tune
config is not checked this way: at this size it trains from scratch without diverging even unclipped.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import yaml

from lightning_modules.cli import main
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("plain_argv", "one_thread")

STEPS = 12


def _train_ce_per_step(tmp_path: Path, config: str) -> list[float]:
    """Fit ``configs/experiment/<config>`` for STEPS steps at a tiny size; train CE of each step."""
    size = {
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "limit_train_batches": STEPS,
                    "limit_val_batches": 1, "log_every_n_steps": 1, "enable_progress_bar": False,
                    "enable_model_summary": False, "enable_checkpointing": False,
                    "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                "init_args": {"save_dir": str(tmp_path / "logs"), "name": "csv"}}],
                    "callbacks": [{"class_path": "callbacks.FinalSummary"}]},
        "model": {"backbone_kwargs": {"width": 8}},
        "data": {"class_path": "datamodules.SyntheticDataModule",
                 "init_args": {"num_classes": 10, "image_size": 16, "pattern_size": 4, "train_size": 32 * STEPS,
                               "val_size": 16, "test_size": 16, "batch_size": 32, "num_workers": 0}},
    }
    overlay = tmp_path / "size.yaml"
    overlay.write_text(yaml.safe_dump(size))
    cli = main(["fit", "-c", str(ROOT / "configs/experiment" / config), "-c", str(overlay)])
    assert cli.trainer.global_step == STEPS
    rows = csv.DictReader((Path(cli.trainer.log_dir) / "metrics.csv").open())
    return [float(r["train/ce_step"]) for r in rows if r.get("train/ce_step")]


def test_vanilla_pretrain_lowers_train_ce_from_scratch(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    ce = _train_ce_per_step(tmp_path, "cifar10_vanilla_pretrain.yaml")
    assert len(ce) == STEPS and all(math.isfinite(c) for c in ce), ce
    assert max(ce[1:]) < 1.5 * ce[0], f"train CE blew up from {ce[0]:.2f}: {ce}"
    assert sum(ce[-4:]) / 4 < ce[0], f"train CE did not fall: {ce}"
