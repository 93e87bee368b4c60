"""The standalone evaluation through the real CLI: ``train.py validate|test -c configs/evaluate.yaml``."""

import json
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
    cb.update(num_samples=6, batch_size=3, steps=2, eps=[0.0078431, 0.0313725], thickness_samples=1,
              thickness_points=2, num_images=2)
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
    cli = main([subcommand, "-c", str(config)])
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
