"""Shared fixtures: a tiny CLI configuration (width-4 ResNet-9, 16 px synthetic data, 2 batches).

The torch thread fixtures (``one_thread``, ``threads``) are in the repository's conftest.py (tests
and doctests share them)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

#: A RobustClassifier small enough for CLI tests (16 x 16 inputs: 256 saliency features).
TINY_MODEL = dict(backbone="resnet9", backbone_kwargs={"width": 4}, num_classes=3, activation="softplus",
                  objective="r2et_noh", k=16)


def tiny_cli_config(tmp: Path, *, wandb: bool = False, model: dict | None = None, data: dict | None = None,
                    trainer: dict | None = None, name: str = "config.yaml") -> Path:
    """Write a complete CLI config under ``tmp`` (logs in ``tmp/logs``) and return its path.

    ``model``/``data``/``trainer`` update the tiny defaults (``data`` updates the init_args).
    """
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp / "logs"), "name": "csv"}}]
    if wandb:
        loggers.append({"class_path": "lightning_modules.loggers.RobustWandbLogger",
                        "init_args": {"project": "tests", "save_dir": str(tmp / "logs")}})
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "limit_train_batches": 2,
                    "limit_val_batches": 1, "limit_test_batches": 1, "inference_mode": False,
                    "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
                    "log_every_n_steps": 1, "logger": loggers,
                    "callbacks": [{"class_path": "callbacks.FinalSummary"}], **(trainer or {})},
        "model": {**copy.deepcopy(TINY_MODEL), **(model or {})},
        "data": {"class_path": "datamodules.SyntheticDataModule",
                 "init_args": {"num_classes": 3, "image_size": 16, "pattern_size": 4, "train_size": 16,
                               "val_size": 8, "test_size": 8, "batch_size": 8, **(data or {})}},
    }
    path = tmp / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def tiny_config(tmp_path):
    """``tiny_config(**overrides) -> Path`` of a tiny CLI config in this test's tmp_path."""
    return lambda **kw: tiny_cli_config(tmp_path, **kw)


@pytest.fixture
def plain_argv(monkeypatch):
    """The CLI must not see pytest's own arguments."""
    monkeypatch.setattr("sys.argv", ["train.py"])
