"""What the W&B run holds, read back from the real wandb's offline run folder: the full resolved
config (trainer, seed, callbacks) and the uploaded LightningCLI config, one run continued on
resume, and no run left behind by a failed setup."""

from __future__ import annotations

import pytest
import yaml

from lightning_modules.cli import main
from lightning_modules.loggers import CONFIG_FILE

pytestmark = pytest.mark.usefixtures("plain_argv", "one_thread")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for key in ("WANDB_API_KEY", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _finish()  # a run left open by an earlier test would be reused by the logger
    yield
    _finish()


def _finish():
    """End the process's wandb run (a real process does this at exit; the logger reuses an open one)."""
    import wandb

    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()  # forget process-wide settings of earlier runs (e.g. WANDB_MODE=disabled)


def _runs(tmp_path):
    return sorted(tmp_path.glob("logs/wandb/offline-run-*"))


def _run_id(folder) -> str:
    """The run id of ``offline-run-<date>_<time>-<id>[-N]`` (wandb adds -N when a folder of the same
    second exists, e.g. a resumed run started within the same second)."""
    return folder.name.split("-")[3]


def test_run_config_holds_trainer_seed_callbacks_and_the_config_file(tiny_config, tmp_path):
    main(["fit", "-c", str(tiny_config(wandb=True)), "--seed_everything", "7"])
    _finish()
    (run,) = _runs(tmp_path)
    uploaded = yaml.safe_load((run / "files" / CONFIG_FILE).read_text())
    assert uploaded["seed_everything"] == 7 and uploaded["trainer"]["limit_train_batches"] == 2
    assert uploaded["trainer"]["callbacks"][0]["class_path"] == "callbacks.FinalSummary"
    # the run config (config records in the offline .wandb log): trainer settings and the seed
    (log,) = run.glob("*.wandb")
    data = log.read_bytes()
    for key in (b"limit_train_batches", b"FinalSummary", b"seed_everything", b"r2et_noh"):
        assert key in data, key


def test_resumed_fit_continues_the_same_run(tiny_config, tmp_path):
    config = str(tiny_config(wandb=True))
    main(["fit", "-c", config])
    _finish()
    (first,) = _runs(tmp_path)
    run_id = _run_id(first)
    main(["fit", "-c", config, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    _finish()
    ids = {_run_id(r) for r in _runs(tmp_path)}
    assert ids == {run_id}, f"the resumed fit started another W&B run: {ids}"


def test_failed_setup_leaves_no_run(tiny_config, tmp_path):
    """The data is missing: the DataModule's setup fails after the trainer started the W&B run."""
    config = yaml.safe_load(tiny_config(wandb=True).read_text())
    config["model"]["num_classes"] = 10
    config["data"] = {"class_path": "datamodules.CIFAR10DataModule",
                      "init_args": {"data_dir": str(tmp_path / "no-data"), "batch_size": 8}}
    path = tmp_path / "missing-data.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(FileNotFoundError, match="CIFAR-10 data not found"):
        main(["fit", "-c", str(path)])
    assert _runs(tmp_path) == [], "a W&B run folder was left by a failed setup"


def test_standalone_evaluation_run_states_what_was_measured(tiny_config, tmp_path):
    """The evaluation's W&B run holds the measured block (weights file and its sha256) and the report."""
    import hashlib

    config = tiny_config(trainer={"enable_checkpointing": True})
    main(["fit", "-c", str(config)])
    ckpt = next(tmp_path.glob("logs/csv/version_0/checkpoints/*.ckpt"))
    evaluation = yaml.safe_load(tiny_config(wandb=True).read_text())
    evaluation["trainer"]["callbacks"].append(
        {"class_path": "callbacks.RankingRobustness",
         "init_args": {"num_samples": 4, "batch_size": 4, "num_images": 2, "report": True,
                       "protocol": {"steps": 1, "eps": [0.0313725], "thickness": False, "attacks": ["er"]}}})
    path = tmp_path / "evaluate.yaml"
    path.write_text(yaml.safe_dump(evaluation))
    main(["test", "-c", str(path), "--ckpt_path", str(ckpt)])
    _finish()
    (run,) = _runs(tmp_path)
    data = next(run.glob("*.wandb")).read_bytes()
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    for key in (b"robustness/measured", digest.encode(), b"synthetic glyphs", b"robustness/report/saliency_gradient"):
        assert key in data, key
