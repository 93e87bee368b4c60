"""Every shipped config through the real CLI: composes as README shows and runs a quick fit
(configs/debug/quick.yaml plus tiny data and width), then `validate` prints each metric once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lightning_modules.cli import main
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("plain_argv", "one_thread")

MODEL_PIECES = sorted(p.name for p in (ROOT / "configs/model").glob("*.yaml"))
#: tiny data and network on top of any config (the CLI accepts these for the synthetic data)
TINY = ["--data.init_args.image_size=16", "--data.init_args.pattern_size=4", "--data.init_args.train_size=32",
        "--data.init_args.val_size=16", "--data.init_args.batch_size=8", "--model.backbone_kwargs={width: 4}",
        "--model.k=16", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _fit(tmp_path: Path, *pieces: str) -> tuple[str, object]:
    args = ["fit", "-c", str(ROOT / "configs/default.yaml")]
    for piece in pieces:
        args += ["-c", str(ROOT / "configs" / piece)]
    args += ["-c", str(ROOT / "configs/debug/quick.yaml"), *TINY]
    return main(args)


def _quick_fit_then_validate(tmp_path, capsys, monkeypatch, piece):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    cli = _fit(tmp_path, piece)
    trainer = cli.trainer
    assert trainer.global_step == 4 and trainer.limit_val_batches == 2  # quick.yaml, integer limits
    metrics = trainer.callback_metrics
    assert "val/acc" in metrics and any(k.startswith("robustness/p_at_k/worst/gradient/eps_") for k in metrics)
    if "train/lambda_gap" in metrics:  # what the regularizer adds to the loss is logged
        added = metrics["train/weighted_gap"] + metrics.get("train/weighted_curvature", 0.0)
        assert abs(float(metrics["train/reg"] - added)) < 1e-4 * (1 + abs(float(added)))
        assert abs(float(metrics["train/loss"] - metrics["train/ce"] - metrics["train/reg"])) < 1e-4
    ckpt = next(Path(trainer.log_dir).glob("checkpoints/*.ckpt"))
    capsys.readouterr()
    main(["validate", "-c", str(ROOT / "configs/default.yaml"), "-c", str(ROOT / "configs" / piece),
          "-c", str(ROOT / "configs/debug/quick.yaml"), *TINY, "--ckpt_path", str(ckpt)])
    out = capsys.readouterr().out
    assert len(re.findall(r"^\s*val/acc\s", out, re.M)) == 1, out  # printed once, by FinalSummary
    assert "-- Accuracy" in out and "-- Robustness" in out


def test_default_with_r2et_quick_fit_and_validate(tmp_path, capsys, monkeypatch):
    _quick_fit_then_validate(tmp_path, capsys, monkeypatch, "model/r2et.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("piece", [p for p in MODEL_PIECES if p != "r2et.yaml"])
def test_every_model_piece_quick_fit_and_validate(tmp_path, capsys, monkeypatch, piece):
    _quick_fit_then_validate(tmp_path, capsys, monkeypatch, f"model/{piece}")
