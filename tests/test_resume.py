"""Exact resume: a run SIGKILLed mid-epoch and resumed with ``--ckpt_path last`` ends where an
uninterrupted run ends (same weights, same logged metrics). Subprocesses through train.py."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]

# 6 batches per epoch, 2 epochs = 12 steps; checkpoints every 3 steps; the kill lands after step 9,
# i.e. in the middle of epoch 1 (3 of its 6 batches done): restart mid-epoch of a later epoch.
STEPS_PER_EPOCH, KILL_AFTER_STEP = 6, 9


def _config(tmp: Path, pause: bool) -> Path:
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"every_n_train_steps": 3, "save_last": True, "save_top_k": -1}},
        {"class_path": "tests.fault_injection.RandomJitter", "init_args": {"amplitude": 0.05}},
    ]
    if pause:
        callbacks.append({"class_path": "tests.fault_injection.PauseAtStep",
                          "init_args": {"step": KILL_AFTER_STEP, "marker": str(tmp / "paused")}})
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 2, "deterministic": True,
            "inference_mode": False, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
            "enable_progress_bar": False, "enable_model_summary": False,
            "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                        "init_args": {"save_dir": "logs", "name": "csv"}}],
            "callbacks": callbacks,
        },
        "model": {
            "backbone": "resnet9", "backbone_kwargs": {"width": 4}, "num_classes": 3,
            "activation": "softplus", "objective": "r2et", "k": 16,
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}},
        },
        "data": {
            "class_path": "datamodules.SyntheticDataModule",
            "init_args": {"num_classes": 3, "image_size": 16, "pattern_size": 4, "train_size": 8 * STEPS_PER_EPOCH,
                          "val_size": 16, "test_size": 8, "batch_size": 8},
        },
    }
    path = tmp / ("paused.yaml" if pause else "plain.yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def _popen(args, cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # e.g. an inherited WANDB_SERVICE
    env.update({"PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"})
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 180) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out + err


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def _rows(run_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run_dir / "metrics.csv").open()))


def _last_val(rows):
    val = [r for r in rows if r.get("val/acc")]
    return {k: float(v) for k, v in val[-1].items() if k.startswith("val/") and v}


def _train_loss_by_step(rows):
    return {int(r["step"]): float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")}


def test_sigkill_mid_epoch_then_resume_last_matches_uninterrupted(tmp_path):
    plain_dir, killed_dir = tmp_path / "plain", tmp_path / "killed"
    plain_dir.mkdir(), killed_dir.mkdir()
    plain = _popen(["fit", "-c", str(_config(tmp_path, pause=False))], plain_dir)
    victim = _popen(["fit", "-c", str(_config(tmp_path, pause=True))], killed_dir)
    try:
        deadline = time.monotonic() + 150
        while not (tmp_path / "paused").exists():
            assert victim.poll() is None, victim.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.2)
        ckpts = killed_dir / "logs/csv/version_0/checkpoints"
        assert (ckpts / "last.ckpt").is_file() and (ckpts / f"epoch=1-step={KILL_AFTER_STEP}.ckpt").is_file()
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        assert victim.returncode == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
    assert tmp_path.joinpath("paused").read_text().split() == ["1", "3"]  # epoch 1, batch 3 (mid-epoch)
    saved = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == KILL_AFTER_STEP

    # Resume in the same folder: Lightning would look for last.ckpt in the new version_1 only.
    resumed = _popen(["fit", "-c", str(_config(tmp_path, pause=False)), "--ckpt_path", "last"], killed_dir)
    resumed_log = _finish(resumed)
    plain_log = _finish(plain)
    assert "resuming from" in resumed_log and "version_0/checkpoints/last.ckpt" in resumed_log
    assert "not resumable" not in resumed_log and "not resumable" not in plain_log

    final_plain = plain_dir / "logs/csv/version_0/checkpoints/last.ckpt"
    final_resumed = killed_dir / "logs/csv/version_1/checkpoints/last.ckpt"
    a, b = _weights(final_plain), _weights(final_resumed)
    assert torch.load(final_resumed, map_location="cpu", weights_only=True)["global_step"] == 2 * STEPS_PER_EPOCH
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"weights differ after resume: {differing[:5]}"

    plain_rows, resumed_rows = _rows(plain_dir / "logs/csv/version_0"), _rows(killed_dir / "logs/csv/version_1")
    assert _last_val(plain_rows) == _last_val(resumed_rows) and "val/acc" in _last_val(plain_rows)
    after = {s: v for s, v in _train_loss_by_step(plain_rows).items() if s >= KILL_AFTER_STEP}
    assert after and after == _train_loss_by_step(resumed_rows)


def test_last_resolves_across_logger_versions(tmp_path):
    """``--ckpt_path last`` looks in every version folder; nothing found is not an error."""
    from lightning_modules.reliability import find_last_checkpoint

    class _Trainer:
        checkpoint_callbacks = [type("CB", (), {"dirpath": None})()]
        loggers = [type("L", (), {"save_dir": str(tmp_path / "logs"), "name": "csv"})()]
        default_root_dir = str(tmp_path)

    assert find_last_checkpoint(_Trainer()) is None
    older = tmp_path / "logs/csv/version_0/checkpoints"
    newer = tmp_path / "logs/csv/version_3/checkpoints"
    older.mkdir(parents=True), newer.mkdir(parents=True)
    (older / "last.ckpt").write_bytes(b"")
    (newer / "epoch=0-step=4.ckpt").write_bytes(b"")
    assert find_last_checkpoint(_Trainer()) == str(older / "last.ckpt")  # last*.ckpt preferred
    (newer / "last.ckpt").write_bytes(b"")
    os.utime(older / "last.ckpt", (1, 1))
    assert find_last_checkpoint(_Trainer()) == str(newer / "last.ckpt")  # newest wins


@pytest.mark.slow
def test_two_process_run_killed_mid_epoch_resumes_on_one_process(tmp_path):
    """A 2-process DDP run (Lightning's launcher) SIGKILLed after step 2 of 4 (the whole process group,
    as when a node dies) resumes with ``--ckpt_path last`` on 1 process at the same global batch
    (8 = 2 x 4 = 1 x 8) and ends where an uninterrupted 1-process run ends (BatchNorm-free model,
    no random augmentation: per-rank BatchNorm statistics and RNG streams depend on the world size)."""
    from tests.distributed.helpers import STEPS, child_env, r2et_config, wait_all

    pause = ({"class_path": "tests.fault_injection.PauseAtStep",
              "init_args": {"step": 2, "marker": str(tmp_path / "paused")}},)
    victim_dir, plain_dir = tmp_path / "victim", tmp_path / "plain"
    victim_dir.mkdir(), plain_dir.mkdir()
    train = [sys.executable, str(ROOT / "train.py"), "fit", "-c"]
    victim = subprocess.Popen([*train, str(r2et_config(tmp_path, 2, "victim", evaluation=False, extra_callbacks=pause))],
                              cwd=victim_dir, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    plain = subprocess.Popen([*train, str(r2et_config(tmp_path, 1, "plain", evaluation=False))], cwd=plain_dir,
                             env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "paused").exists():
            assert victim.poll() is None, victim.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.2)
        time.sleep(1.0)  # both ranks are past the checkpoint (rank 0 wrote the marker after it)
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.communicate(timeout=60)
    ckpts = victim_dir / "logs/csv/version_0/checkpoints"
    assert [p.name for p in ckpts.glob("*.ckpt")] == ["epoch=0-step=2.ckpt"]
    resumed = subprocess.Popen([*train, str(r2et_config(tmp_path, 1, "resumed", evaluation=False)), "--ckpt_path", "last"],
                               cwd=victim_dir, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (code, out), (plain_code, plain_out) = wait_all([resumed, plain], timeout=300)
    assert code == 0 and plain_code == 0, (out[-3000:], plain_out[-3000:])
    assert "epoch=0-step=2.ckpt" in out
    assert "batch_size 4 x 2 processes = 8, resumed with batch_size 8 x 1 processes = 8" in " ".join(out.split())
    final = f"epoch=0-step={STEPS}.ckpt"
    a = _weights(plain_dir / "logs/csv/version_0/checkpoints" / final)
    b = _weights(victim_dir / "logs/csv/version_1/checkpoints" / final)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")
    plain_loss = _train_loss_by_step(_rows(plain_dir / "logs/csv/version_0"))
    resumed_loss = _train_loss_by_step(_rows(victim_dir / "logs/csv/version_1"))
    assert sorted(resumed_loss) == [2, 3]
    for step, value in resumed_loss.items():
        assert abs(value - plain_loss[step]) <= 1e-5 + 1e-4 * abs(plain_loss[step]), (step, value, plain_loss[step])
