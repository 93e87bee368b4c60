"""The standalone evaluation through the real CLI: ``train.py validate|test -c configs/evaluate.yaml``."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from callbacks._eval_subset import EvalSubset
from explanations.evaluation import EvaluationProtocol
from lightning_modules.cli import main

ROOT = Path(__file__).resolve().parents[2]


def tiny_config(tmp_path: Path) -> Path:
    """configs/evaluate.yaml with a tiny model, tiny data and a small evaluation."""
    cfg = yaml.safe_load((ROOT / "configs/evaluate.yaml").read_text())
    cfg["trainer"]["logger"][0]["init_args"]["save_dir"] = str(tmp_path / "logs")
    cfg["trainer"]["default_root_dir"] = str(tmp_path)
    cfg["trainer"]["enable_progress_bar"] = False
    cfg["trainer"]["max_epochs"] = 1
    cfg["trainer"]["limit_train_batches"] = 2
    cb = cfg["trainer"]["callbacks"][1]["init_args"]
    cb.update(num_samples=6, batch_size=3, num_images=2)
    cb["protocol"].update(steps=2, eps=[0.0078431, 0.0313725], thickness_samples=1, thickness_points=2)
    assert "model" not in cfg  # a checkpoint's settings are never contradicted by the shipped config
    cfg["model"] = {"backbone": "resnet9", "backbone_kwargs": {"width": 4}, "num_classes": 3, "k": 20,
                    "activation": "softplus", "objective": "vanilla"}
    cfg["data"]["init_args"].update(num_classes=3, image_size=16, pattern_size=4, train_size=24, val_size=12,
                                    test_size=12, batch_size=6)
    path = tmp_path / "evaluate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_report(folder: Path) -> dict:
    found = sorted(folder.glob("logs/evaluate/version_*/robustness_report.json"))
    assert found, sorted(str(p) for p in folder.rglob("*"))
    return json.loads(found[-1].read_text()), found[-1].parent


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_standalone_evaluation_writes_the_report_with_the_protocols_numbers(tmp_path, subcommand):
    config = tiny_config(tmp_path)
    cli = main([subcommand, "-c", str(config), "--allow_random_weights", "true"])  # an untrained model, on purpose
    report, folder = read_report(tmp_path)
    eps = ["2/255", "8/255"]
    assert report["num_images"] == 6 and report["k"] == 20 and report["stage"] == subcommand
    assert 0.0 <= report["accuracy"] <= 1.0
    assert set(report["p_at_k"]) == {"worst", "er", "mse", "noise"}  # smooth model: no surrogate member
    for src, row in report["p_at_k"].items():
        assert list(row) == eps, src
    for e in eps:
        assert report["p_at_k"]["worst"][e] <= min(report["p_at_k"][s][e] for s in ("er", "mse", "noise"))
    assert report["p_at_k"]["worst"]["8/255"] <= report["p_at_k"]["worst"]["2/255"]
    assert set(report["thickness"]) == {"all_pairs", "boundary"}
    assert 0.5 < report["thickness"]["all_pairs"] <= 1.0 and 0.0 <= report["thickness"]["boundary"] <= 1.0
    assert "| worst |" in (folder / "robustness_report.md").read_text()
    for name in ("p_at_k_vs_eps.png", "thickness.png", "saliency_gradient.png"):
        png = np.asarray(Image.open(folder / name).convert("RGB"))
        assert png.shape[0] > 100 and png.std() > 5, name  # a drawn figure, not a blank one

    # the same numbers as the protocol run directly on the same model and images
    model = cli.model.model.eval()
    cli.datamodule.setup(subcommand)
    dataset = cli.datamodule.test_dataset if subcommand == "test" else cli.datamodule.val_dataset
    protocol = EvaluationProtocol(eps=[0.0078431, 0.0313725], k=20, steps=2, thickness_samples=1, thickness_points=2)
    result = protocol.evaluate(model, EvalSubset(dataset, 6, seed=0, batch_size=3))
    direct = result.means()
    assert result.num_images == 6
    for e, tag in zip(eps, ("eps_2", "eps_8")):
        for src in ("worst", "er", "mse", "noise"):
            assert report["p_at_k"][src][e] == direct[f"p_at_k/{src}/gradient/{tag}"], (src, e)
    assert report["thickness"]["all_pairs"] == direct["thickness/all_pairs/gradient"]
    assert report["accuracy"] == direct["accuracy"]


def test_checkpoint_of_ours_is_evaluated_with_ckpt_path(tmp_path):
    config = tiny_config(tmp_path)
    # trained with another objective than any evaluation would name (as README's flow: a default.yaml run)
    main(["fit", "-c", str(config), "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "true",
          "--model.objective", "r2et_noh"])
    ckpt = sorted(tmp_path.glob("logs/evaluate/version_0/checkpoints/*.ckpt"))
    assert ckpt, sorted(str(p) for p in tmp_path.rglob("*"))
    # the evaluation config as shipped: no model settings, so the checkpoint's are used
    cfg = yaml.safe_load(config.read_text())
    del cfg["model"]
    config.write_text(yaml.safe_dump(cfg))
    cli = main(["test", "-c", str(config), "--ckpt_path", str(ckpt[-1])])
    assert cli.model.hparams.objective == "r2et_noh" and cli.model.hparams.k == 20
    report, folder = read_report(tmp_path)
    assert folder.name == "version_1" and report["stage"] == "test" and report["num_images"] == 6
    trained = torch.load(ckpt[-1], weights_only=True)["state_dict"]
    loaded = cli.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trained.items())  # the checkpoint's weights were evaluated


# ------------------------------------------------------------------ what is evaluated, resume, comparison
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from explanations.compare import main as compare_main  # noqa: E402
from explanations.report import PER_IMAGE_FILE, read_per_image  # noqa: E402


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    """A checkpoint of the tiny model after 2 training steps (a fit through the CLI)."""
    tmp = tmp_path_factory.mktemp("trained")
    config = tiny_config(tmp)
    main(["fit", "-c", str(config), "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "true",
          "--model.objective", "r2et_noh"])
    return next(tmp.glob("logs/evaluate/version_0/checkpoints/*.ckpt"))


def _evaluate(tmp_path: Path, ckpt: Path, *extra: str, subcommand: str = "test"):
    config = tiny_config(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    del cfg["model"]  # the checkpoint's settings
    config.write_text(yaml.safe_dump(cfg))
    return main([subcommand, "-c", str(config), "--ckpt_path", str(ckpt), *extra])


def test_report_states_what_was_measured_with_standard_errors(tmp_path, trained_ckpt, capsys):
    _evaluate(tmp_path, trained_ckpt)
    report, folder = read_report(tmp_path)
    measured = report["measured"]
    weights = measured["model"]["weights"]
    assert weights["source"] == "checkpoint" and weights["path"] == str(trained_ckpt.resolve())
    import hashlib

    assert weights["sha256"] == hashlib.sha256(trained_ckpt.read_bytes()).hexdigest()
    assert measured["model"]["backbone"] == "resnet9" and measured["model"]["parameters"] > 1000
    data = measured["data"]
    assert data["split"] == "test" and data["split_size"] == 12 and data["held_out"] is True
    assert data["datamodule"].endswith("SyntheticDataModule") and "synthetic glyphs" in data["provenance"]
    assert "6 of 12 images" in data["subset"]
    assert measured["protocol"] == {"k": 20, "features": 256, "steps": 2, "restarts": {"er": 1, "mse": 1}, "seed": 0,
                                    "eps": ["2/255", "8/255"]}
    assert measured["time"]["seconds"] > 0
    # every mean has its standard error: sd / sqrt(n) of the per-image values
    _, per_image = read_per_image(folder)
    worst = per_image.values["p_at_k/worst/gradient/eps_8"].double()
    assert report["se"]["p_at_k"]["worst"]["8/255"] == pytest.approx(float(worst.std() / 6 ** 0.5), rel=1e-6)
    assert report["p_at_k"]["worst"]["8/255"] == pytest.approx(float(worst.mean()), abs=1e-6)
    md = (folder / "robustness_report.md").read_text()
    assert "weights: checkpoint" in md and "split `test`" in md and " ± " in md
    out = capsys.readouterr().out
    assert "-- What was measured" in out and "evaluated checkpoint" in out and "best checkpoint" not in out
    assert "Final summary (test of the checkpoint saved at epoch 0, step 2)" in out  # not the trainer's 0, 0
    assert weights["epoch"] == 0 and weights["global_step"] == 2


def test_standalone_evaluation_computes_no_training_terms(tmp_path, trained_ckpt):
    cli = _evaluate(tmp_path, trained_ckpt, subcommand="validate")
    assert cli.model.hparams.objective == "r2et_noh"  # a double-backprop objective...
    logged = set(cli.trainer.callback_metrics)
    assert "val/acc" in logged and "val/ce" in logged
    assert not {"val/gap", "val/lambda_gap", "val/reg", "val/loss"} & logged, sorted(logged)  # ...not computed


def test_sigterm_stops_within_seconds_and_the_rerun_resumes_to_the_same_numbers(tmp_path, trained_ckpt):
    config = tiny_config(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    del cfg["model"]
    cb = cfg["trainer"]["callbacks"][1]["init_args"]
    cb.update(num_samples=12, batch_size=2)
    cb["protocol"]["steps"] = 12
    config.write_text(yaml.safe_dump(cfg))
    reports = tmp_path / "reports"
    args = ["test", "-c", str(config), "--ckpt_path", str(trained_ckpt), "--trainer.callbacks.report_dir", str(reports)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"})
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    part = reports / "robustness_per_image.part-0.jsonl"
    try:
        deadline = time.monotonic() + 120
        while not (part.is_file() and len(part.read_text().splitlines()) >= 3):  # header + one batch of 2
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        out = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert time.monotonic() - sent < 10, "a SIGTERM must end the evaluation within seconds"
    assert proc.returncode not in (0, None), out[-3000:]
    assert "evaluation stopped (SIGTERM)" in out and "to resume" in out, out[-3000:]
    assert not (reports / "robustness_report.json").exists()  # nothing that looks complete
    kept = len(part.read_text().splitlines()) - 1
    assert 2 <= kept < 12

    resumed = main(args)  # the same command: resumes
    cb_resumed = next(c for c in resumed.trainer.callbacks if hasattr(c, "last_report"))
    assert cb_resumed.last_report["measured"]["time"]["resumed_images"] == kept
    assert not part.exists() and (reports / PER_IMAGE_FILE).is_file()
    header, first = read_per_image(reports)
    assert header["complete"] and first.num_images == 12
    main([*args[:-1], str(tmp_path / "plain")])  # uninterrupted, elsewhere
    _, plain = read_per_image(tmp_path / "plain")
    assert torch.equal(first.ids, plain.ids)
    for key, v in plain.values.items():
        torch.testing.assert_close(first.values[key], v, atol=1e-6, rtol=0, equal_nan=True, msg=key)
    assert json.loads((reports / "robustness_report.json").read_text())["p_at_k"] == \
        json.loads((tmp_path / "plain" / "robustness_report.json").read_text())["p_at_k"]


def test_a_failed_report_write_keeps_the_numbers_and_fails(tmp_path, trained_ckpt, monkeypatch, caplog):
    import explanations.report as report_module

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system", str(tmp_path / "x.json"))

    monkeypatch.setattr(report_module, "write_report_files", read_only)
    with pytest.raises(OSError, match=r"cannot write the robustness report .* numbers are kept in (\S+\.json)") as info:
        _evaluate(tmp_path, trained_ckpt)
    kept = re.search(r"kept in (\S+\.json)", str(info.value)).group(1)
    numbers = json.loads(Path(kept).read_text())
    assert numbers["num_images"] == 6 and "worst" in numbers["p_at_k"]
    assert '"p_at_k"' in caplog.text  # and in the log
    Path(kept).unlink()


def test_compare_two_reports_paired_and_refuse_other_images_or_settings(tmp_path, trained_ckpt, capsys):
    a, b, c, d = (tmp_path / n for n in "abcd")
    for folder, extra in ((a, ()), (b, ("--trainer.callbacks.protocol.steps=1",)), (c, ("--trainer.callbacks.num_samples=4",))):
        folder.mkdir()
        _evaluate(folder, trained_ckpt, "--trainer.callbacks.report_dir", str(folder / "r"), *extra)
    d.mkdir()
    _evaluate(d, trained_ckpt, "--trainer.callbacks.report_dir", str(d / "r"))
    capsys.readouterr()
    result = compare_main([str(a / "r"), str(d / "r")])  # the same evaluation twice: differences 0
    assert all(r["paired_diff"] == 0 and r["ci_low"] == 0 == r["ci_high"] for r in result["rows"])
    assert "| gradient | worst | 8/255 |" in capsys.readouterr().out
    # the paired difference is the mean of the per-image differences, its interval from the shared bootstrap
    _, ra = read_per_image(a / "r")
    from explanations.statistics import paired_bootstrap

    key = "p_at_k/worst/gradient/eps_8"
    shifted = tmp_path / "shifted.jsonl"
    lines = (a / "r" / PER_IMAGE_FILE).read_text().splitlines()
    header = json.loads(lines[0])
    col = header["header"]["keys"].index(key)
    rows = [json.loads(line) for line in lines[1:]]
    for row in rows:
        row["v"][col] = row["v"][col] - 0.25
    header["header"]["fingerprint"]["model"] = {"other": "model"}  # the model may differ
    shifted.write_text("\n".join(json.dumps(x) for x in [header, *rows]) + "\n")
    result = compare_main([str(a / "r"), str(shifted), "--out", str(tmp_path / "cmp.json")])
    row = next(r for r in result["rows"] if (r["source"], r["eps"]) == ("worst", "eps_8"))
    expected = paired_bootstrap(ra.values[key], ra.values[key] - 0.25)
    assert row["paired_diff"] == pytest.approx(0.25) and row["ci_low"] == pytest.approx(expected.ci_low)
    assert row["sign"] == 1 and json.loads((tmp_path / "cmp.json").read_text())["rows"]
    with pytest.raises(SystemExit):
        compare_main([str(a / "r"), str(b / "r")])
    assert "differ in protocol.steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare_main([str(a / "r"), str(c / "r")])
    assert "other images" in capsys.readouterr().err


def test_resuming_into_another_evaluations_folder_is_refused(tmp_path, trained_ckpt):
    reports = tmp_path / "r"
    _evaluate(tmp_path, trained_ckpt, "--trainer.callbacks.report_dir", str(reports))
    with pytest.raises(ValueError, match=r"holds the per-image results of another evaluation \(it differs in: "
                                         r"protocol\.steps\)"):
        _evaluate(tmp_path, trained_ckpt, "--trainer.callbacks.report_dir", str(reports),
                  "--trainer.callbacks.protocol.steps=1")


def test_an_unwritable_report_dir_is_refused_before_any_attack(tmp_path, trained_ckpt, monkeypatch):
    import explanations.evaluation as evaluation

    monkeypatch.setattr(evaluation.EvaluationProtocol, "evaluate_batch", lambda *a, **k: pytest.fail("attacked"))
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    with pytest.raises(SystemExit, match=r"cannot write to the RankingRobustness report_dir .*a-file.*Not a directory.*"
                                         r"\(--trainer.callbacks.report_dir\)"):
        _evaluate(tmp_path, trained_ckpt, "--trainer.callbacks.report_dir", str(blocker / "sub"))


def test_comparing_an_interrupted_evaluation_is_refused(tmp_path, trained_ckpt, capsys):
    reports = tmp_path / "r"
    _evaluate(tmp_path, trained_ckpt, "--trainer.callbacks.report_dir", str(reports))
    lines = (reports / PER_IMAGE_FILE).read_text().splitlines()
    header = json.loads(lines[0])
    header["header"]["complete"] = False
    partial = tmp_path / "partial.jsonl"
    partial.write_text("\n".join([json.dumps(header), *lines[1:3]]) + "\n")
    with pytest.raises(SystemExit):
        compare_main([str(reports), str(partial)])
    assert "incomplete (an interrupted evaluation)" in capsys.readouterr().err


def test_summary_says_when_wandb_is_disabled(tmp_path, trained_ckpt, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    config = tiny_config(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    del cfg["model"]
    cfg["trainer"]["logger"].append({"class_path": "lightning_modules.loggers.RobustWandbLogger",
                                     "init_args": {"project": "t", "save_dir": str(tmp_path / "logs")}})
    config.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    import wandb

    try:
        main(["test", "-c", str(config), "--ckpt_path", str(trained_ckpt)])
    finally:  # forget the process-wide disabled mode: later tests run W&B offline
        if wandb.run is not None:
            wandb.finish()
        wandb.teardown()
    out = capsys.readouterr().out
    assert re.search(r"W&B run\s+none \(W&B disabled: WANDB_MODE=disabled\)", out), out[-2000:]
