"""Bad or unusual inputs, one test per case: each fails before any work with a message that names
the value and what is valid, warns by name, or does the right thing (README "Configuration")."""

from __future__ import annotations

import errno
import functools
import os
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from callbacks.summary import FinalSummary, explain_nan
from lightning_modules.backbones import build_backbone
from lightning_modules.checkpoints import AtomicCheckpointIO, hparams_differences, read_checkpoint
from explanations.validation import check_k
from lightning_modules.classifier import RobustClassifier
from lightning_modules.cli import integer_batch_limits, main
from tests.conftest import ROOT, TINY_MODEL, tiny_cli_config

pytestmark = pytest.mark.usefixtures("plain_argv", "one_thread")


def _fails(args, match):
    """main(args) exits with an ``error:`` message matching ``match`` (no traceback)."""
    with pytest.raises(SystemExit) as info:
        main(args)
    message = str(info.value.code)
    assert info.value.code not in (0, None), message
    import re

    assert re.search(match, message), message
    return message


def _record(monkeypatch, method: str) -> list[dict]:
    calls: list[dict] = []
    original = getattr(L.Trainer, method)

    @functools.wraps(original)  # keep the signature: the CLI builds its arguments from it
    def record(self, *args, **kwargs):
        calls.append({"trainer": self, **kwargs})

    monkeypatch.setattr(L.Trainer, method, record)
    return calls


def _checkpoint(tmp_path: Path, **model) -> Path:
    module = RobustClassifier(**{**TINY_MODEL, **model})
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    return path


# ------------------------------------------------------------------------ objective settings
def test_unknown_at_option_names_it_and_the_valid_ones(tiny_config):
    with pytest.raises(ValueError) as info:
        main(["fit", "-c", str(tiny_config(model={"objective": "at", "objective_kwargs": {"stepz": 3}}))])
    message = str(info.value)
    assert "['stepz']" in message and "'steps'" in message and "'eps'" in message, message


def test_objective_kwargs_on_an_objective_without_options_is_refused(tiny_config):
    with pytest.raises(ValueError, match=r"\['foo'\] not known for objective='r2et'.*takes no objective_kwargs"):
        main(["fit", "-c", str(tiny_config(model={"objective": "r2et", "objective_kwargs": {"foo": 1}}))])


def test_float_k_one_is_refused_with_the_rule(tiny_config):
    with pytest.raises(ValueError, match=r"k=1\.0 is not valid: a float k is a fraction .* in \(0, 1\) \(for a count write k: 1\)"):
        main(["fit", "-c", str(tiny_config(model={"k": 1.0}))])
    check_k(1), check_k(0.5)  # the two valid forms
    for bad in (0, -3, 1.5, True, "ten"):
        with pytest.raises(ValueError, match=f"k={bad!r} is not valid"):
            check_k(bad)


def test_k_larger_than_the_feature_count_fails_before_the_run(tiny_config, monkeypatch):
    calls = _record(monkeypatch, "fit")
    _fails(["fit", "-c", str(tiny_config(model={"k": 300}))],
           r"model\.k=300 is out of range for 16x16 images \(pool=None\): 256 saliency features; valid: an integer in \[1, 256\]")
    assert not calls


def test_pool_that_does_not_divide_the_image_fails_before_the_run(tiny_config):
    _fails(["fit", "-c", str(tiny_config(model={"pool": 3}))], r"model\.pool=3 does not divide the image size 16")


@pytest.mark.parametrize("num_classes", [20, 2])
def test_num_classes_against_the_data_fails_before_wandb_starts(tiny_config, tmp_path, monkeypatch, num_classes):
    monkeypatch.setenv("WANDB_MODE", "offline")
    _fails(["fit", "-c", str(tiny_config(wandb=True, model={"num_classes": num_classes}))],
           f"model.num_classes={num_classes} but the data \\(SyntheticDataModule\\) has num_classes=3; set model.num_classes: 3")
    assert not list(tmp_path.glob("logs/wandb/*run-*")), "a W&B run was created for a failed setup"


def test_in_chans_against_the_data(tiny_config):
    _fails(["fit", "-c", str(tiny_config(model={"in_chans": 1}))], r"model\.in_chans=1 but the data .* has in_chans=3")


# ------------------------------------------------------------------------ attack budgets (explanations.validation)
def _callback(name: str, **init_args) -> dict:
    return {"trainer": {"callbacks": [{"class_path": f"callbacks.{name}", "init_args": init_args}]}}


def test_zero_attack_steps_in_the_evaluation_is_refused(tiny_config, monkeypatch):
    calls = _record(monkeypatch, "validate")
    with pytest.raises(ValueError, match=r"steps=0 must be an integer >= 1 \(0 steps is no attack"):
        main(["validate", "-c", str(tiny_config(**_callback("RankingRobustness", protocol={"steps": 0}))), "--allow_random_weights", "true"])
    with pytest.raises(ValueError, match="eps=0 is no attack"):
        main(["validate", "-c", str(tiny_config(**_callback("RankingRobustness", protocol={"eps": [0.0, 0.0313725]}))),
              "--allow_random_weights", "true"])
    assert not calls


def test_pixel_unit_eps_and_zero_steps_in_the_pse_analysis_are_refused(tiny_config):
    with pytest.raises(ValueError, match=r"eps=8\.0 is in pixel units of \[0, 1\]; did you mean 8/255 = 0\.0314\?"):
        main(["fit", "-c", str(tiny_config(**_callback("PSEAnalysis", settings={"eps": 8})))])
    with pytest.raises(ValueError, match=r"steps=0 must be an integer >= 1"):
        main(["fit", "-c", str(tiny_config(**_callback("PSEAnalysis", settings={"steps": 0})))])


def test_noise_attack_with_noise_baseline_false_is_a_conflict(tiny_config):
    with pytest.raises(ValueError, match=r"the attack list names 'noise' .* but the noise baseline is off .*: drop one"):
        main(["validate", "-c", str(tiny_config(**_callback("RankingRobustness", protocol={"attacks": ["er", "noise"],
                                                                                  "noise": False}))), "--allow_random_weights", "true"])


def test_zero_steps_for_adversarial_training_is_refused(tiny_config):
    with pytest.raises(ValueError, match=r"objective 'at' \(its training attack\): steps=0 must be an integer >= 1"):
        main(["fit", "-c", str(tiny_config(model={"objective": "at", "objective_kwargs": {"steps": 0}}))])


def test_pse_report_refuses_pixel_unit_eps(capsys):
    from benchmarks.pse_report import main as pse_report

    with pytest.raises(SystemExit) as info:
        pse_report(["--ckpt", "missing.ckpt", "--out", "unused", "--eps", "8"])
    assert info.value.code == 2
    assert "eps=8.0 is in pixel units of [0, 1]; did you mean 8/255 = 0.0314?" in capsys.readouterr().err


@pytest.mark.parametrize(("command", "limit"), [("fit", "limit_train_batches"), ("validate", "limit_val_batches"),
                                                ("test", "limit_test_batches")])
@pytest.mark.parametrize("value", ["0", "0.0"])
def test_a_batch_limit_of_zero_that_leaves_nothing_to_do_is_refused(tiny_config, monkeypatch, command, limit, value):
    calls = _record(monkeypatch, command)
    _fails([command, "-c", str(tiny_config()), f"--trainer.{limit}", value],
           rf"trainer\.{limit}={value} gives `{command}` no batch to run \(it would do nothing and exit 0\); "
           r"valid: an integer >= 1 \(batches\) or a fraction in \(0, 1\]")
    assert not calls


def test_zero_val_batches_in_fit_still_skips_validation(tiny_config, monkeypatch):
    calls = _record(monkeypatch, "fit")
    main(["fit", "-c", str(tiny_config()), "--trainer.limit_val_batches", "0"])
    assert calls and calls[-1]["trainer"].limit_val_batches == 0


# ------------------------------------------------------------------------ checkpoints
def test_explicit_ckpt_path_refuses_disagreeing_flags(tiny_config, tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path, k=100)
    calls = _record(monkeypatch, "validate")
    message = _fails(["validate", "-c", str(tiny_config()), "--ckpt_path", str(ckpt), "--model.k", "7",
                      "--model.objective", "vanilla"],
                     r"trained with other model settings")
    assert "k: 100 (checkpoint) vs 7 (this run)" in message and "objective: 'r2et_noh' (checkpoint) vs 'vanilla'" in message
    assert "--override_ckpt_hparams true" in message and not calls


def test_explicit_ckpt_path_override_is_applied(tiny_config, tmp_path, monkeypatch, capsys):
    ckpt = _checkpoint(tmp_path, k=100)
    calls = _record(monkeypatch, "validate")
    cli = main(["validate", "-c", str(tiny_config()), "--ckpt_path", str(ckpt), "--model.k", "7",
                "--override_ckpt_hparams", "true"])
    assert cli.model.hparams.k == 7 and calls


def test_explicit_ckpt_path_settings_not_given_come_from_the_checkpoint(tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path, k=100, objective="r2et")
    path = tiny_cli_config(tmp_path)
    data = yaml.safe_load(path.read_text())
    for key in ("k", "objective"):
        data["model"].pop(key)
    path.write_text(yaml.safe_dump(data))
    _record(monkeypatch, "validate")
    cli = main(["validate", "-c", str(path), "--ckpt_path", str(ckpt)])
    assert cli.model.hparams.k == 100 and cli.model.hparams.objective == "r2et"


def test_ckpt_path_last_of_another_objective_is_refused(tiny_config, tmp_path, monkeypatch):
    ckpt = tmp_path / "logs/csv/version_0/checkpoints/last.ckpt"
    ckpt.parent.mkdir(parents=True)
    module = RobustClassifier(**{**TINY_MODEL, "objective": "r2et"})
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    calls = _record(monkeypatch, "fit")
    _fails(["fit", "-c", str(tiny_config(model={"objective": "grad_norm"})), "--ckpt_path", "last"],
           f"--ckpt_path last found {ckpt}, but it belongs to another run: it was trained with objective: "
           "'r2et' \\(checkpoint\\) vs 'grad_norm' \\(this run\\)")
    assert not calls


def test_checkpoint_without_backbone_kwargs_names_the_missing_setting(tmp_path, monkeypatch):
    module = RobustClassifier(**TINY_MODEL)  # width 4
    saved = dict(module.hparams)
    del saved["backbone_kwargs"]  # as saved by hand or by older code
    ckpt = tmp_path / "old.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": saved,
                "pytorch-lightning_version": L.__version__}, ckpt)
    config = tiny_cli_config(tmp_path)
    data = yaml.safe_load(config.read_text())
    del data["model"]["backbone_kwargs"]  # so the model is built with the default width 64
    config.write_text(yaml.safe_dump(data))
    calls = _record(monkeypatch, "validate")
    message = _fails(["validate", "-c", str(config), "--ckpt_path", str(ckpt)],
                     r"does not record the hyper-parameter\(s\) 'backbone_kwargs' .* built with backbone_kwargs=None; "
                     r"give the value\(s\) the weights were trained with \(--model.backbone_kwargs <value>")
    assert "shape mismatches (41)" in message and not calls  # refused before the trainer runs
    assert message.index("backbone_kwargs") < message.index("shape mismatches")


def test_dotted_backbone_string_points_to_class_path(tiny_config):
    with pytest.raises(ValueError, match=r"Unknown backbone name 'mynets.Net'.*See timm.list_models\(\).*"
                                         r"give it as a class path: --model.backbone.class_path mynets.Net .*"
                                         r"backbone: \{class_path: mynets.Net, init_args: \{...\}\}"):
        main(["fit", "-c", str(tiny_config()), "--model.backbone", "mynets.Net"])
    with pytest.raises(ValueError, match=r"'resnet99'.*Close matches: resnet9.*--model.backbone.class_path "
                                         r"<package.module.Class>"):
        build_backbone("resnet99")


def test_text_file_as_checkpoint_is_named(tiny_config, tmp_path):
    bad = tmp_path / "notes.ckpt"
    bad.write_text("this is not a checkpoint\n")
    _fails(["validate", "-c", str(tiny_config()), "--ckpt_path", str(bad)],
           f"cannot read the --ckpt_path checkpoint '{bad}': it is not a PyTorch checkpoint")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_checkpoint(tmp_path / "missing.ckpt")


def test_disk_full_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lightning_modules.checkpoints.os.fsync", full)
    with pytest.raises(OSError) as info:
        io.save_checkpoint({"step": 2, "big": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"], "a partial file was left"
    assert path.read_bytes() == before and torch.load(path, weights_only=True) == {"step": 1}
    from lightning_modules.reliability import disk_full_message

    message = disk_full_message(info.value)
    assert f"the disk is full while writing '{path}' (file system mounted at " in message and "MiB free" in message


def test_hparams_differences_keeps_count_and_fraction_apart():
    assert hparams_differences({"k": 1}, {"k": 1.0}) == {"k": (1, 1.0)}
    assert hparams_differences({"backbone_kwargs": None, "compile": True}, {"backbone_kwargs": {}, "compile": False}) == {}


# ------------------------------------------------------------------------ CLI surface
def test_integer_batch_limit_one_means_one_batch(tiny_config, monkeypatch):
    calls = _record(monkeypatch, "fit")
    main(["fit", "-c", str(tiny_config()), "--trainer.limit_val_batches", "1"])
    trainer = calls[-1]["trainer"]
    assert trainer.limit_val_batches == 1 and isinstance(trainer.limit_val_batches, int)
    assert trainer.limit_train_batches == 2 and isinstance(trainer.limit_train_batches, int)
    main(["fit", "-c", str(tiny_config()), "--trainer.limit_val_batches=1.0"])
    assert calls[-1]["trainer"].limit_val_batches == 1.0 and isinstance(calls[-1]["trainer"].limit_val_batches, float)
    assert integer_batch_limits(["-c", "x.yaml", "--trainer.limit_val_batches=0.25"]) == {}


def test_fit_without_config_uses_the_built_in_default(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--print_config"])
    assert info.value.code in (0, None)
    out = capsys.readouterr()
    assert "objective: r2et" in out.out and "SyntheticDataModule" in out.out
    assert "using the built-in default" in out.err and "configs/default.yaml" in out.err


def test_predict_is_not_offered(capsys):
    with pytest.raises(SystemExit) as info:
        main(["predict"])
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert "predict" in err and "fit" in err and "validate" in err  # invalid choice, valid ones listed


def test_top_level_optimizer_is_not_a_second_setting(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--optimizer", "torch.optim.SGD", "--print_config"])
    assert info.value.code != 0
    assert "--optimizer" in capsys.readouterr().err


def test_ambiguous_callback_flag_is_refused():
    _fails(["fit", "-c", str(ROOT / "configs/default.yaml"), "--trainer.callbacks.num_samples=32"],
           r"--trainer\.callbacks\.num_samples is ambiguous: 2 callbacks have 'num_samples' \(RankingRobustness, PSEAnalysis\)")


def test_smoke_preset_never_writes_into_docs(tmp_path):
    from benchmarks.reproduce.__main__ import DOCS_DIR, check_output_place, parser

    out = Path(os.path.relpath(DOCS_DIR / "results"))
    with pytest.raises(SystemExit, match=f"--out '{out}' is inside {DOCS_DIR}: the smoke preset"):
        check_output_place("smoke", out, Path(os.path.relpath(DOCS_DIR / "results.md")))
    check_output_place("smoke", tmp_path / "results", tmp_path / "results.md")
    check_output_place("cpu", DOCS_DIR / "results", DOCS_DIR / "results.md")  # an explicit real preset may
    assert parser().parse_args(["--preset", "smoke"]).out is None  # default: outputs/reproduce/<preset>


# ------------------------------------------------------------------------ configs
def _print_config(capsys, *files):
    with pytest.raises(SystemExit) as info:
        main(["fit", *[a for f in files for a in ("-c", str(ROOT / "configs" / f))], "--print_config"])
    assert info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_vanilla_piece_is_relu_and_sp_is_softplus(capsys):
    assert _print_config(capsys, "default.yaml", "model/vanilla.yaml")["model"]["activation"] == "relu"
    sp = _print_config(capsys, "default.yaml", "model/sp.yaml")["model"]
    assert (sp["activation"], sp["objective"], sp["softplus_beta"]) == ("softplus", "vanilla", 2.0)


def test_one_softplus_beta_default_across_configs(capsys):
    betas = {f: _print_config(capsys, "default.yaml", f)["model"]["softplus_beta"]
             for f in ("model/r2et.yaml", "model/vanilla.yaml", "model/sp.yaml", "model/at.yaml")}
    assert set(betas.values()) == {2.0}, betas
    for path in (ROOT / "configs").rglob("*.yaml"):
        assert "softplus_beta:" not in path.read_text(), f"{path} sets softplus_beta: the default lives in RobustClassifier"


# ------------------------------------------------------------------------ output
def test_summary_sections_nan_and_counts():
    values = {"val/acc": 0.5, "val/ce": 1.0, "val/reg": 0.0, "robustness/p_at_k/er/gradient": 0.7,
              "pse/mean_P": float("nan"), "pse/num_counted": 1.0, "pse/group/frac_promotion": 1.0}
    sections = FinalSummary().sections(values)
    assert [t for t, _ in sections] == ["Accuracy", "Regularizer terms", "Robustness", "PSE"]
    pse = dict(sections[-1][1])
    assert pse["pse/mean_P"].startswith("nan  (no sample to average")
    assert pse["pse/group/frac_promotion"] == "1.0000  (over 1 counted sample; fewer than 5: the share is noise)"
    assert pse["pse/num_counted"] == "1"
    assert "pse/num_success" in explain_nan("pse/mean_P")


def test_limited_validation_batches_see_every_class(tmp_path):
    """Image folders list samples by class; the evaluation loader interleaves them (seeded)."""
    from PIL import Image

    from datamodules import CIFAR10DataModule, CIFAR10_CLASSES

    for split, n in (("train", 10), ("test", 4)):
        for c in CIFAR10_CLASSES:
            folder = tmp_path / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), (i * 20, 0, 0)).save(folder / f"{i}.png")
    dm = CIFAR10DataModule(data_dir=str(tmp_path), val_fraction=0.5, batch_size=10, augment=False, seed=3)
    dm.setup("fit")
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        first = next(iter(loader))[1]
        assert sorted(first.tolist()) == list(range(10)), first  # one batch: all ten classes
    assert dm.val_dataset.targets[:5] == [0] * 5  # the dataset itself keeps its (sorted) order


# ------------------------------------------------------------------------ what validate/test evaluate
def test_validate_without_trained_weights_is_refused_unless_asked(tiny_config, monkeypatch):
    calls = _record(monkeypatch, "validate")
    for sub in ("validate", "test"):
        _fails([sub, "-c", str(tiny_config())],
               rf"`{sub}` would evaluate a model with randomly initialised weights: no --ckpt_path, "
               r"--model.weights_file, --model.pretrained true or --model.init_from .* --allow_random_weights true")
    assert not calls
    main(["validate", "-c", str(tiny_config()), "--allow_random_weights", "true"])
    assert len(calls) == 1


def test_ckpt_path_last_that_finds_nothing_is_an_error_in_validate(tiny_config, monkeypatch):
    calls = _record(monkeypatch, "validate")
    _fails(["validate", "-c", str(tiny_config()), "--ckpt_path", "last"],
           r"--ckpt_path last: no checkpoint found in .*checkpoint folders of this run's logger name.*"
           r"Give the checkpoint file")
    assert not calls


def test_checkpoint_trained_on_other_data_is_refused(tiny_config, tmp_path, monkeypatch):
    ckpt = _checkpoint(tmp_path)
    saved = torch.load(ckpt, weights_only=True)
    saved["datamodule_hyper_parameters"] = {"_class_path": "datamodules.CIFAR10DataModule", "data_dir": "x"}
    torch.save(saved, ckpt)
    calls = _record(monkeypatch, "validate")
    _fails(["validate", "-c", str(tiny_config()), "--ckpt_path", str(ckpt)],
           r"was trained on datamodules.CIFAR10DataModule, but this run evaluates it on "
           r"datamodules.SyntheticDataModule.*--allow_other_data true")
    assert not calls
    main(["validate", "-c", str(tiny_config()), "--ckpt_path", str(ckpt), "--allow_other_data", "true"])
    assert len(calls) == 1


def test_external_weights_on_the_synthetic_data_are_refused(tiny_config, tmp_path, monkeypatch):
    weights = tmp_path / "w.pth"
    torch.save(RobustClassifier(**TINY_MODEL).model.state_dict(), weights)
    calls = _record(monkeypatch, "test")
    _fails(["test", "-c", str(tiny_config(model={"weights_file": str(weights)}))],
           r"weights_file .*w.pth\) were not trained on the built-in synthetic glyph data.*"
           r"-c configs/data/cifar10.yaml")
    assert not calls


def test_config_file_with_a_duplicated_key_is_refused(tiny_config, tmp_path):
    path = tiny_config()
    text = path.read_text().replace("model:\n", "model:\n  k: 3\n", 1)
    path.write_text(text)
    _fails(["fit", "-c", str(path)], rf"config file {path}: the key 'k' appears twice in one mapping "
                                     r"\(lines \d+ and \d+\); YAML would silently keep the last one")


def test_validate_with_external_weights_on_a_carved_validation_split_warns(tmp_path, monkeypatch):
    from tests.datamodules.test_cifar10 import _write_cifar_folder

    root = _write_cifar_folder(tmp_path / "cifar", per_class=2)
    weights = tmp_path / "w.pth"
    torch.save(RobustClassifier(**{**TINY_MODEL, "num_classes": 10}).model.state_dict(), weights)
    config = tiny_cli_config(tmp_path, model={"num_classes": 10, "weights_file": str(weights), "k": 50})
    data = yaml.safe_load(config.read_text())
    data["data"] = {"class_path": "datamodules.CIFAR10DataModule",
                    "init_args": {"data_dir": str(root), "val_fraction": 0.5, "batch_size": 4, "num_workers": 0}}
    config.write_text(yaml.safe_dump(data))
    _record(monkeypatch, "validate")
    with pytest.warns(UserWarning, match=r"validate evaluates the validation split, 0\.5 of the CIFAR-10 train split.*"
                                         r"likely trained on these images\. Use `test`"):
        main(["validate", "-c", str(config)])
    calls = _record(monkeypatch, "test")
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*likely trained on these images.*")
        main(["test", "-c", str(config)])  # the test split is held out: no warning
    assert calls


def test_sigterm_in_the_training_loop_exits_non_zero_with_a_message(tiny_config):
    """Lightning stops at the end of the batch with an exception that would exit 0; the CLI says why and fails."""
    import signal as signal_module

    class Terminate(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            os.kill(os.getpid(), signal_module.SIGTERM)  # Lightning's handler records it

    path = tiny_config()
    data = yaml.safe_load(path.read_text())
    data["trainer"]["callbacks"].append({"class_path": "tests.test_bad_inputs.Terminate"})
    path.write_text(yaml.safe_dump(data))
    globals()["Terminate"] = Terminate
    try:
        _fails(["fit", "-c", str(path)], r"stopped by SIGTERM; checkpoints are written atomically")
    finally:
        del globals()["Terminate"]


def test_logger_flag_that_two_loggers_take_is_refused(tiny_config):
    """With a CSV and a W&B logger, --trainer.logger.init_args.save_dir moved only the W&B logs."""
    _fails(["fit", "-c", str(tiny_config(wandb=True)), "--trainer.logger.init_args.save_dir=elsewhere"],
           r"--trainer\.logger\.init_args\.save_dir is ambiguous: 2 loggers have 'save_dir' "
           r"\(CSVLogger, RobustWandbLogger\) and the flag changes only the last one")


def test_sigterm_mid_step_ends_fit_within_seconds(tiny_config, tmp_path):
    """A step that takes long (here: paused for minutes) does not delay a SIGTERM to its end."""
    import signal as signal_module
    import subprocess
    import sys
    import time

    marker = tmp_path / "paused"
    path = tiny_config()
    data = yaml.safe_load(path.read_text())
    data["trainer"]["callbacks"].append({"class_path": "tests.fault_injection.PauseAtStep",
                                         "init_args": {"step": 1, "marker": str(marker)}})
    path.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"})
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "fit", "-c", str(path)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal_module.SIGTERM)
        sent = time.monotonic()
        out = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert time.monotonic() - sent < 10 and proc.returncode not in (0, None), out[-3000:]
    assert "stopped by SIGTERM; checkpoints are written atomically" in out, out[-3000:]
