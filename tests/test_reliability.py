"""Reliability and security of a run: safe checkpoint loading, incompatible checkpoints, unwritable
or full output folders, W&B without a key or a network (and the key never leaking)."""

from __future__ import annotations

import builtins
import errno
import functools
import os
import subprocess
import sys
import types
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lightning_modules.backbones import build_backbone
from lightning_modules.classifier import RobustClassifier, load_model_weights
from lightning_modules.cli import main
from lightning_modules.reliability import (
    UnwritableDirError,
    architecture_differences,
    disk_full_message,
    ensure_writable_dir,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(backbone="resnet9", backbone_kwargs={"width": 4}, num_classes=3, activation="softplus", k=16)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _config(tmp: Path, version: int | None = None, wandb: bool = False, save_dir: Path | None = None) -> Path:
    save_dir = str(save_dir or tmp / "logs")
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": save_dir, "name": "csv", "version": version}}]
    if wandb:
        loggers.append({"class_path": "lightning_modules.loggers.RobustWandbLogger",
                        "init_args": {"project": "reliability-test", "save_dir": save_dir}})
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "limit_train_batches": 2,
                    "limit_val_batches": 1, "inference_mode": False, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1,
                    "logger": loggers},
        "model": {**TINY, "objective": "r2et_noh"},
        "data": {"class_path": "datamodules.SyntheticDataModule",
                 "init_args": {"num_classes": 3, "image_size": 16, "pattern_size": 4, "train_size": 16,
                               "val_size": 8, "test_size": 8, "batch_size": 8}},
    }
    path = tmp / f"config-{version}-{wandb}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ------------------------------------------------------------------------------ safe loading
class Payload:
    """Unpickling this object creates a file: proof that arbitrary code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def _evil_checkpoint(tmp: Path) -> tuple[Path, Path]:
    marker = tmp / "pwned"
    state = RobustClassifier(**TINY).state_dict()
    path = tmp / "evil.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": dict(TINY), "payload": Payload(str(marker))}, path)
    return path, marker


def test_pickle_payload_is_refused_by_every_loader(tmp_path):
    path, marker = _evil_checkpoint(tmp_path)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|global"):
        load_model_weights(RobustClassifier(**TINY).model, path)  # model.init_from
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|global"):
        build_backbone("resnet9", num_classes=3, width=4, weights_file=str(path))  # model.weights_file
    with pytest.raises(SystemExit, match=f"(?i){path}.*weights.only"):  # --ckpt_path, named
        main(["fit", "-c", str(_config(tmp_path)), "--ckpt_path", str(path)])
    assert not marker.exists(), "the checkpoint's pickle payload was executed"


def test_cli_loads_checkpoints_weights_only_and_resolves_last(tmp_path, monkeypatch):
    calls = []

    @functools.wraps(L.Trainer.fit)  # keep the signature: the CLI builds its arguments from it
    def record(self, *args, **kwargs):
        calls.append(kwargs)

    monkeypatch.setattr(L.Trainer, "fit", record)
    main(["fit", "-c", str(_config(tmp_path))])
    assert calls[-1]["weights_only"] is True and calls[-1]["ckpt_path"] is None
    main(["fit", "-c", str(_config(tmp_path)), "--weights_only", "false"])  # an explicit choice is kept
    assert calls[-1]["weights_only"] is False
    ckpt = tmp_path / "logs/csv/version_0/checkpoints/epoch=0-step=2.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_text("not a checkpoint")
    with pytest.raises(SystemExit, match=f"cannot read the --ckpt_path last checkpoint '{ckpt}': it is not a PyTorch checkpoint"):
        main(["fit", "-c", str(_config(tmp_path)), "--ckpt_path", "last"])
    with pytest.raises(SystemExit, match=f"cannot read the --ckpt_path checkpoint '{ckpt}': it is not a PyTorch checkpoint"):
        main(["fit", "-c", str(_config(tmp_path)), "--ckpt_path", str(ckpt)])
    torch.save({"hyper_parameters": dict(RobustClassifier(**{**TINY, "objective": "r2et_noh"}).hparams)}, ckpt)
    main(["fit", "-c", str(_config(tmp_path)), "--ckpt_path", "last"])
    assert calls[-1]["ckpt_path"] == str(ckpt)


# ------------------------------------------------------------------------------ incompatible checkpoints
def test_incompatible_checkpoint_lists_differing_hparams_and_keys(tmp_path):
    source = RobustClassifier(**TINY)
    checkpoint = {"state_dict": source.state_dict(), "hyper_parameters": dict(source.hparams)}
    other = RobustClassifier(**{**TINY, "backbone_kwargs": {"width": 8}, "num_classes": 5, "activation": "relu"})
    with pytest.raises(ValueError) as info:
        other.on_load_checkpoint(checkpoint)
    message = str(info.value)
    for expected in ("backbone_kwargs: {'width': 4} -> {'width': 8}", "num_classes: 3 -> 5",
                     "activation: 'softplus' -> 'relu'", "shape mismatches (42)", "model.backbone.fc.weight: checkpoint (3, 32) vs model (5, 64)"):
        assert expected in message, message
    # same architecture, other training settings: resuming is allowed
    RobustClassifier(**{**TINY, "objective": "vanilla", "k": 8}).on_load_checkpoint(checkpoint)
    assert architecture_differences({"backbone_kwargs": None}, {"backbone_kwargs": {}}) == {}


def test_resume_with_other_architecture_is_refused_before_loading(tmp_path):
    main(["fit", "-c", str(_config(tmp_path))])  # writes logs/csv/version_0/checkpoints/epoch=0-step=2.ckpt
    assert list(tmp_path.glob("logs/csv/version_0/checkpoints/*.ckpt"))
    with pytest.raises(SystemExit, match=r"belongs to another run: it was trained with backbone_kwargs: \{'width': 4\} \(checkpoint\) vs \{'width': 8\} \(this run\)"):
        main(["fit", "-c", str(_config(tmp_path)), "--model.backbone_kwargs", "{width: 8}", "--ckpt_path", "last"])
    ckpt = next(tmp_path.glob("logs/csv/version_0/checkpoints/*.ckpt"))
    with pytest.raises(SystemExit, match=r"backbone_kwargs: \{'width': 4\} -> \{'width': 8\}"):  # before the trainer
        main(["fit", "-c", str(_config(tmp_path)), "--model.backbone_kwargs", "{width: 8}", "--ckpt_path", str(ckpt),
              "--override_ckpt_hparams", "true"])


def test_init_from_error_names_differing_hparams(tmp_path):
    source = RobustClassifier(**{**TINY, "backbone_kwargs": {"width": 8}})
    torch.save({"state_dict": source.state_dict(), "hyper_parameters": dict(source.hparams)}, tmp_path / "w8.ckpt")
    with pytest.raises(ValueError, match=r"does not fit this model.*backbone_kwargs: \{'width': 8\} -> \{'width': 4\}"):
        RobustClassifier(**TINY, init_from=str(tmp_path / "w8.ckpt"))


# ------------------------------------------------------------------------------ output folders
def test_log_dir_under_a_file_fails_early_with_path_and_reason(tmp_path, capsys):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the log folder should be")
    with pytest.raises(UnwritableDirError, match="not-a-dir.*Not a directory"):
        ensure_writable_dir(blocker / "logs", "log folder")
    with pytest.raises(SystemExit) as info:
        main(["fit", "-c", str(_config(tmp_path, save_dir=blocker / "logs"))])
    message = str(info.value.code)
    assert message.startswith("error: cannot write to the CSVLogger save_dir") and "ENOTDIR" in message
    from lightning_modules.loggers import RobustWandbLogger

    with pytest.raises(UnwritableDirError, match="W&B save_dir .*not-a-dir/wandb-logs"):
        RobustWandbLogger(save_dir=str(blocker / "wandb-logs"), offline=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_log_dir_fails_early(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(UnwritableDirError, match="Permission denied"):
            ensure_writable_dir(ro / "logs")
    finally:
        ro.chmod(0o700)


def test_disk_full_probe_and_mid_run_message(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr("lightning_modules.reliability.os.fsync", full)
        with pytest.raises(UnwritableDirError, match="No space left on device.*free some disk space"):
            ensure_writable_dir(tmp_path / "logs")
    assert disk_full_message(RuntimeError("wrapped")) is None
    wrapped = RuntimeError("while saving")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device", "last.ckpt")
    assert "disk is full while writing 'last.ckpt'" in disk_full_message(wrapped)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_during_the_run_is_one_clear_line(tmp_path):
    """A real ENOSPC from the kernel mid-run: the logger's hparams.yaml points to /dev/full."""
    run_dir = tmp_path / "logs/csv/version_0"
    run_dir.mkdir(parents=True)
    os.symlink("/dev/full", run_dir / "hparams.yaml")
    with pytest.raises(SystemExit) as info:
        main(["fit", "-c", str(_config(tmp_path, version=0))])
    message = str(info.value.code)
    assert message.startswith("error: the disk is full") and "No space left on device" in message


# ------------------------------------------------------------------------------ W&B
def _record_notices(monkeypatch) -> list[str]:
    """Messages the W&B logger sends through rank_zero_info (independent of logging handlers)."""
    from lightning_modules import loggers

    messages: list[str] = []
    monkeypatch.setattr(loggers, "rank_zero_info", lambda msg, *a, **k: messages.append(str(msg)))
    return messages


def test_wandb_without_key_goes_offline_with_one_notice(tmp_path, monkeypatch):
    from lightning_modules import loggers

    for var in ("WANDB_API_KEY", "WANDB_MODE", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    notices = _record_notices(monkeypatch)
    logger = loggers.RobustWandbLogger(save_dir=str(tmp_path / "logs"))
    assert logger._offline and len(notices) == 1 and "no API key" in notices[0]


def test_wandb_online_failure_falls_back_to_offline(tmp_path, monkeypatch):
    import wandb

    from lightning_modules import loggers

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    real_probe = loggers.wandb_reachable
    monkeypatch.setattr(loggers, "wandb_reachable", lambda timeout=3.0: (True, ""))
    modes = []

    def fake_init(**kwargs):
        modes.append(kwargs.get("mode", os.environ.get("WANDB_MODE")))
        if len(modes) == 1:
            raise wandb.errors.CommError("Run initialization has timed out")
        return types.SimpleNamespace(name="offline-run")

    monkeypatch.setattr(wandb, "init", fake_init)
    notices = _record_notices(monkeypatch)
    logger = loggers.RobustWandbLogger(save_dir=str(tmp_path / "logs"))
    assert not logger._offline and not notices
    logger.experiment
    logger.experiment
    assert modes == [None, "offline"] and logger._offline
    assert len(notices) == 1 and "starting the online run failed (CommError)" in notices[0]
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    reachable, reason = real_probe(timeout=1.0)
    assert not reachable and "127.0.0.1:9" in reason


def test_wandb_key_never_leaks_and_unreachable_server_means_offline(tmp_path):
    """A real run: key set, W&B server unreachable -> one notice, offline run, training completes,
    and the key appears in no file of the run and not in the output."""
    key = "fake0key0" + "3141592653" * 3 + "x"
    # no inherited WANDB_* (an in-process wandb run of another test exports WANDB_SERVICE, which
    # would make this process use that test's service and working directory)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    (tmp_path / "tmp").mkdir()
    env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HOME": str(tmp_path), "TMPDIR": str(tmp_path / "tmp"),
                "WANDB_API_KEY": key, "WANDB_BASE_URL": "http://127.0.0.1:9"})  # every file wandb writes is under tmp_path
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "fit", "-c", str(_config(tmp_path, wandb=True))],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert output.count("W&B:") == 1 and "not reachable" in output
    assert list(tmp_path.glob("logs/wandb/offline-run-*")), "no offline W&B run"
    assert list(tmp_path.glob("logs/csv/version_0/checkpoints/*.ckpt"))
    assert key not in output
    leaked = [str(p) for p in tmp_path.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    assert not leaked, f"the API key was written to {leaked}"
    for name in ("config.yaml", "hparams.yaml", "metrics.csv"):
        assert (tmp_path / "logs/csv/version_0" / name).is_file()


# ------------------------------------------------------------------------------ non-finite loss in a fit
class _Snapshot(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_nonfinite_batch_stops_without_touching_weights_or_is_skipped(policy):
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_modules.classifier import NonFiniteLossError

    L.seed_everything(0, verbose=False)
    x, y = torch.rand(12, 3, 16, 16), torch.arange(12) % 3
    x[5, 1, 2, 3] = float("nan")  # batch 1 of 3
    model = RobustClassifier(**TINY, objective="r2et", nonfinite=policy)
    snapshot = _Snapshot()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                        callbacks=[snapshot])
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    if policy == "error":
        with pytest.raises(NonFiniteLossError, match=r"epoch 0, batch 1: term\(s\) \[.*'ce'.*\]"):
            trainer.fit(model, loader)
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in snapshot.weights.items())  # batch 0's weights
    else:
        trainer.fit(model, loader)
        assert model.skipped_batches == 1
    state = model.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values()), "NaN in weights or BatchNorm statistics"
