"""PSEAnalysis on the synthetic data: every key logged, a W&B table (offline), reports on disk; its
settings given whole through the CLI (nested YAML, flags, refusals)."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from benchmarks.pse_report import analyze_checkpoint
from callbacks.pse_analysis import PSEAnalysis
from datamodules import SyntheticDataModule
from explanations.pse import CATEGORIES, PSESettings
from explanations.pse_report import table_data
from lightning_modules.classifier import RobustClassifier
from lightning_modules.cli import main

REPO = Path(__file__).resolve().parents[2]

EXPECTED_KEYS = [
    "pse/frac_suppression", "pse/frac_promotion", "pse/frac_balanced", "pse/frac_ineffective",
    "pse/attack_success_rate", "pse/num_failed", "pse/num_analysed", "pse/mean_phi",
    "pse/cam_true/share_all", "pse/cam_target/share_all", "pse/units/frac_promoted",
    "pse/units/frac_suppressed",
] + [f"pse/cam_{r}/share_{c}" for r in ("true", "target") for c in CATEGORIES] + [
    f"pse/group/frac_{c}" for c in CATEGORIES
]

DATA = dict(num_classes=4, image_size=16, train_size=64, val_size=32, test_size=32, pattern_size=4,
            batch_size=32, seed=0)


def tiny_module() -> RobustClassifier:
    return RobustClassifier(
        backbone="resnet9", backbone_kwargs={"width": 4}, num_classes=4, activation="softplus",
        softplus_beta=2.0, objective="vanilla",
        optimizer=lambda params: torch.optim.Adam(params, lr=3e-3),
    )


def callback(tmp_path: Path, settings: dict | None = None, **kwargs) -> PSEAnalysis:
    analysis = {"steps": 3, "eps": 16 / 255, "group_size": 8, "only_correct": False, **(settings or {})}
    args = dict(num_samples=8, batch_size=8, out_dir=str(tmp_path / "pse"), num_examples=1)
    args.update(kwargs)
    return PSEAnalysis(settings=PSESettings(**analysis), **args)


def test_callback_logs_every_key_and_a_wandb_table(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))  # table media are staged here
    tables, charts = [], []
    original_table, original_metrics = WandbLogger.log_table, WandbLogger.log_metrics

    def record_table(self, key, columns=None, data=None, dataframe=None, step=None):
        tables.append((key, columns, data))
        return original_table(self, key=key, columns=columns, data=data, step=step)

    def record_metrics(self, metrics, step=None):
        charts.extend(k for k in metrics if k.endswith("category_shares_chart"))
        return original_metrics(self, metrics, step)

    monkeypatch.setattr(WandbLogger, "log_table", record_table)
    monkeypatch.setattr(WandbLogger, "log_metrics", record_metrics)
    wandb_logger = WandbLogger(project="pse-test", save_dir=str(tmp_path), offline=True)
    cb = callback(tmp_path)
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, inference_mode=False, num_sanity_val_steps=1,
        limit_train_batches=2, limit_val_batches=1, logger=[CSVLogger(str(tmp_path)), wandb_logger], callbacks=[cb],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    module = tiny_module()
    trainer.fit(module, datamodule=SyntheticDataModule(**DATA))
    try:
        for key in EXPECTED_KEYS:
            assert key in trainer.callback_metrics, key
        assert len(cb.history) == 2  # every epoch, sanity check skipped
        shares = sum(float(trainer.callback_metrics[f"pse/frac_{c}"]) for c in CATEGORIES)
        if float(trainer.callback_metrics["pse/num_counted"]) > 0:
            assert shares == pytest.approx(1.0)
        analysed = float(trainer.callback_metrics["pse/num_analysed"])
        assert analysed == 8
        assert float(trainer.callback_metrics["pse/num_failed"]) == analysed - float(
            trainer.callback_metrics["pse/num_success"])
        assert [t[0] for t in tables] == ["pse/samples", "pse/samples"]
        _, columns, data = tables[-1]
        assert len(data) == 8 and "category" in columns and "phi" in columns and columns[:2] == ["id", "image"]
        assert all(row[columns.index("category")] in CATEGORIES for row in data)
        assert len(charts) == 2
        assert sorted(p.name for p in (tmp_path / "pse").iterdir()) == [
            "pse_validate_epoch0.json", "pse_validate_epoch0.png", "pse_validate_epoch1.json",
            "pse_validate_epoch1.png",
        ]
        report = json.loads((tmp_path / "pse" / "pse_validate_epoch1.json").read_text())
        assert report["metrics"]["num_analysed"] == 8 and len(report["history"]) == 2
    finally:
        wandb_logger.experiment.finish()
    written = list(tmp_path.rglob("*.table.json"))
    assert written, "no W&B table file in the offline run"
    from PIL import Image

    # the table's thumbnails: uint8 PNGs (staged for the table artifact) in real colours
    thumbs = [p for p in (tmp_path / "wandb_data").rglob("*") if p.is_file() and p.read_bytes()[:4] == b"\x89PNG"]
    assert len(thumbs) >= 8, sorted(str(p) for p in (tmp_path / "wandb_data").rglob("*"))
    pixels = np.asarray(Image.open(thumbs[0]).convert("RGB")).astype(float)
    assert pixels.shape[0] >= 32 and pixels.max() > 100 and np.abs(pixels[..., 0] - pixels[..., 1]).max() > 20

    # standalone: a checkpoint analysed by the entry script, with the data from a config file
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    config = tmp_path / "data.yaml"
    config.write_text(json.dumps({"data": {"class_path": "datamodules.SyntheticDataModule", "init_args": DATA}}))
    spec = importlib.util.spec_from_file_location("pse_report", REPO / "benchmarks" / "pse_report.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    values = script.main([
        "--ckpt", str(ckpt), "--out", str(tmp_path / "report"), "-c", str(config), "--num-samples", "4",
        "--steps", "2", "--only-correct", "false", "--target-rule", "least_likely", "--cutoffs", "0.25", "0.75",
    ])
    assert values["num_analysed"] == 4
    assert (tmp_path / "report" / "pse_test.png").stat().st_size > 0
    report = json.loads((tmp_path / "report" / "pse_test.json").read_text())
    assert report["settings"]["target_rule"] == "least_likely" and report["settings"]["cutoffs"] == [0.25, 0.75]


def test_inference_mode_is_refused(tmp_path):
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", inference_mode=True, logger=False,
                        callbacks=[callback(tmp_path)], enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RuntimeError, match="inference_mode: false"):
        trainer.validate(tiny_module(), datamodule=SyntheticDataModule(**DATA), verbose=False)


def test_validate_and_test_runs_and_settings_validation(tmp_path):
    cb = callback(tmp_path, dict(target_rule="second_likely", norm="l2", eps=0.5, steps=2), out_dir=None,
                  every_n_epochs=5, num_samples=4)
    trainer = L.Trainer(accelerator="cpu", inference_mode=False, logger=False, callbacks=[cb],
                        limit_val_batches=1, limit_test_batches=1,
                        enable_progress_bar=False, enable_model_summary=False)
    module, data = tiny_module(), SyntheticDataModule(**DATA)
    trainer.validate(module, datamodule=data, verbose=False)
    assert "pse/frac_promotion" in trainer.callback_metrics
    trainer.test(module, datamodule=data, verbose=False)
    assert "pse/attack_success_rate" in trainer.callback_metrics
    assert [h["stage"] for h in cb.history] == ["validate", "test"]
    with pytest.raises(ValueError, match="target_rule"):
        PSESettings(target_rule="most_likely")
    with pytest.raises(ValueError, match="cutoffs"):
        PSESettings(cutoffs=(0.8, 0.2))
    with pytest.raises(TypeError, match=r"settings=\{'eps': 0.1\} must be an explanations.pse.PSESettings"):
        PSEAnalysis(settings={"eps": 0.1})


def test_table_data_formats_rows():
    columns = ["id", "label", "category", "phi", "success"]
    rows = torch.tensor([[5.0, 1.0, 2.0, float("nan"), 1.0], [2.0, 0.0, 0.0, 0.25, 0.0]], dtype=torch.float64)
    assert table_data(columns, rows, ["a", "b"]) == [[2, "a", "suppression", 0.25, False],
                                                     [5, "b", "promotion", None, True]]


def test_category_share_chart_leaves_undefined_epochs_out_instead_of_plotting_zero():
    import math

    import wandb

    from callbacks.base import line_series

    history = [{"epoch": 0, **{c: float("nan") for c in CATEGORIES}},  # no attack succeeded in epoch 0
               {"epoch": 1, **{c: 0.25 for c in CATEGORIES}}]
    chart = line_series(wandb, [h["epoch"] for h in history], [[h[c] for h in history] for c in CATEGORIES],
                        list(CATEGORIES), title="PSE category shares", xname="epoch")
    rows = chart.table.data
    assert rows and all(step == 1 and value == 0.25 for step, _, value in rows), rows  # epoch 0: no point, not 0
    assert not any(isinstance(v, float) and math.isnan(v) for _, _, v in rows)


def test_analyze_checkpoint_checks_its_output_folder_first_and_states_the_weights(tmp_path, monkeypatch):
    import hashlib

    import benchmarks.pse_report as pse_module

    module = tiny_module()
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__}, ckpt)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    ran = []
    original = pse_module.run_analysis
    monkeypatch.setattr(pse_module, "run_analysis", lambda *a, **k: ran.append(1) or original(*a, **k))
    settings = PSESettings(eps=16 / 255, steps=2, group_size=8, only_correct=False)
    with pytest.raises(OSError, match=r"cannot write to the PSE report folder .*a-file.*\(--out\)"):
        analyze_checkpoint(ckpt, blocker, datamodule=SyntheticDataModule(**DATA), num_samples=4, batch_size=4,
                           settings=settings)
    assert not ran  # refused before any attack
    analyze_checkpoint(ckpt, tmp_path / "out", datamodule=SyntheticDataModule(**DATA), num_samples=4, batch_size=4,
                       settings=settings, num_examples=1)
    report = json.loads((tmp_path / "out" / "pse_test.json").read_text())
    assert ran and json.dumps(report).count(hashlib.sha256(ckpt.read_bytes()).hexdigest()) == 1
    assert "synthetic glyphs" in json.dumps(report)


# ------------------------------------------------------------------------ the settings through the CLI
def _pse_config(tiny_config, *entries: dict) -> str:
    callbacks = [{"class_path": "callbacks.PSEAnalysis", "init_args": e} for e in entries]
    return str(tiny_config(trainer={"callbacks": callbacks}))


def _fit_without_training(monkeypatch, args: list[str]) -> list:
    """The PSEAnalysis callbacks ``train.py fit`` builds from ``args`` (Trainer.fit recorded, not run)."""
    monkeypatch.setattr("sys.argv", ["train.py"])
    ran = []

    @functools.wraps(L.Trainer.fit)  # keep the signature: the CLI builds its arguments from it
    def record(self, *a, **k):
        ran.append(self)

    monkeypatch.setattr(L.Trainer, "fit", record)
    main(["fit", *args])
    return [c for c in ran[0].callbacks if isinstance(c, PSEAnalysis)]


def test_settings_nest_in_yaml_and_a_flag_changes_one_field(tiny_config, monkeypatch, one_thread):
    config = _pse_config(tiny_config, {"num_samples": 4, "settings": {"eps": 0.125, "steps": 10, "target_rule": "least_likely"}})
    (cb,) = _fit_without_training(monkeypatch, ["-c", config])
    assert cb.settings == PSESettings(eps=0.125, steps=10, target_rule="least_likely")
    (cb,) = _fit_without_training(monkeypatch, ["-c", config, "--trainer.callbacks.settings.steps=3",
                                                "--trainer.callbacks.settings.norm=l2"])
    assert cb.settings == PSESettings(eps=0.125, steps=3, target_rule="least_likely", norm="l2")  # the rest kept


@pytest.mark.parametrize(("settings", "flags", "message"), [
    ({"epz": 0.125}, [], r"Group 'settings' does not accept option 'epz'; valid: eps, steps, step_size, norm, target_rule"),
    ({}, ["--trainer.callbacks.settings.epz=0.1"], r"--settings.epz=0.1; valid: eps, steps, step_size, norm"),
    ({"target_rule": "most_likely"}, [], r"Expected a typing.Literal\['random', 'least_likely', 'second_likely'\]"),
    ({}, ["--trainer.callbacks.settings.norm=l3"], r"Expected a typing.Literal\['linf', 'l2'\]. Got value: l3"),
])
def test_a_typo_or_an_unknown_choice_is_refused_with_the_valid_ones(tiny_config, capsys, plain_argv, settings, flags,
                                                                   message):
    with pytest.raises(SystemExit) as info:
        main(["fit", "-c", _pse_config(tiny_config, {"settings": settings}), *flags])
    assert info.value.code == 2
    import re

    assert re.search(message, capsys.readouterr().err)


def test_a_flat_setting_of_the_old_form_is_refused_with_where_it_goes(tiny_config, capsys, plain_argv):
    with pytest.raises(SystemExit):
        main(["fit", "-c", _pse_config(tiny_config, {"eps": 0.125})])
    assert ("Option 'eps' is not accepted; valid: every_n_epochs, num_samples, batch_size, seed, settings, log_table, "
            "log_chart, out_dir, num_examples ('eps' is a field of 'settings': write settings: {eps: ...})"
            ) in capsys.readouterr().err


def test_a_nested_flag_two_callbacks_have_is_ambiguous(tiny_config, plain_argv):
    config = _pse_config(tiny_config, {"settings": {"steps": 2}}, {"settings": {"steps": 5}})
    with pytest.raises(SystemExit, match=r"--trainer\.callbacks\.settings\.steps is ambiguous: 2 callbacks have "
                                         r"'settings\.steps' \(PSEAnalysis, PSEAnalysis\)"):
        main(["fit", "-c", config, "--trainer.callbacks.settings.steps=3"])


def test_help_lists_each_setting_with_its_doc_and_choices(capsys, plain_argv):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--trainer.callbacks.help", "callbacks.PSEAnalysis"])
    assert info.value.code in (0, None)
    out = " ".join(capsys.readouterr().out.split())
    assert "--trainer.callbacks.settings.target_rule {random,least_likely,second_likely}" in out
    assert "--trainer.callbacks.settings.cam_method {gradcam,cam}" in out
    assert "--trainer.callbacks.settings.unit_threshold UNIT_THRESHOLD tau >= 0: a unit is promoted" in out
