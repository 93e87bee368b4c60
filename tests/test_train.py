"""The entry point users call: train.py on the default config, through a subprocess."""

import csv
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def run_train(args, cwd, env_extra=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), **(env_extra or {})})
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_default_config_trains_and_leaves_csv_and_wandb_run(tmp_path):
    result = run_train(
        [
            "fit", "-c", str(ROOT / "configs/default.yaml"),
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
            "--trainer.enable_progress_bar=false", "--data.init_args.train_size=192", "--data.init_args.val_size=128",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Final summary" in result.stdout
    assert "val/topk_margin" in result.stdout and "val/curvature" in result.stdout
    metrics = next(tmp_path.glob("logs/csv/version_*/metrics.csv"))
    rows = list(csv.DictReader(metrics.open()))
    assert any(r.get("val/acc") for r in rows)
    assert any(r.get("train/gap_epoch") for r in rows)
    assert next(tmp_path.glob("logs/csv/version_*/config.yaml")).is_file()
    assert list(tmp_path.glob("logs/wandb/offline-run-*")), "no offline W&B run was written"


def test_print_config_and_early_config_errors(tmp_path):
    result = run_train(["fit", "-c", str(ROOT / "configs/default.yaml"), "--print_config"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "objective: r2et" in result.stdout
    bad = run_train(["fit", "-c", str(ROOT / "configs/default.yaml"), "--model.objective=r3et"], cwd=tmp_path)
    assert bad.returncode != 0
    assert "objective='r3et'" in bad.stderr
    sync = run_train(
        ["fit", "-c", str(ROOT / "configs/default.yaml"), "--trainer.sync_batchnorm=true"], cwd=tmp_path
    )
    assert sync.returncode != 0 and "sync_batchnorm" in sync.stderr
    assert "Traceback" not in sync.stderr
