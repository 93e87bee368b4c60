"""The reproduction study end to end on tiny image folders the test writes itself (no shared data).

Covers: pretrain -> fine-tune sweep -> selection under the accuracy floor -> inheritance of a
selected weight -> evaluation with every metric -> JSON + markdown + plots, for CIFAR-10 and the
Imagenette (ImageNet-subset) task, then a second invocation that must reuse every stage record.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.reproduce import __main__ as cli
from benchmarks.reproduce import pipeline
from benchmarks.reproduce.data import IMAGENETTE_CLASSES, balanced_order
from benchmarks.reproduce.presets import PRESETS, apply_override, build_preset
from datamodules import CIFAR10_CLASSES, read_class_list


def _write_folder(root, splits, classes, per_class, size):
    rng = np.random.default_rng(0)
    for split, n in zip(splits, per_class):
        for label, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                arr[size // 4 : size // 2, size // 4 : size // 2, label % 3] += np.uint8(20 * label + 40)
                Image.fromarray(arr).save(root / split / cls / f"{i:03d}.png")
    return root


TINY = [
    # both tasks: a 4-wide ResNet-9, one epoch, 2-5 step attacks on a few images
    "cifar.backbone_kwargs={width: 4}", "cifar.train_size=60", "cifar.finetune_size=40", "cifar.val_size=10",
    "cifar.batch_size=20", "cifar.sweep_eval_size=4", "cifar.sweep_attack_steps=2", "cifar.at_steps=1",
    "cifar.methods=[vanilla, wd, r2et, r2et_noh]", "cifar.grids={wd: [0.005, 0.05], r2et: [0.1, 1.0]}",
    "cifar.eval={size: 4, batch_size: 4, attack_steps: 3, relu_surrogate: [er], eps_list: [0.0313725],"
    " eps_curve_steps: 2, eps_curve_size: 2, steps_curve: [1, 3], steps_curve_size: 2, thickness_size: 2,"
    " thickness_samples: 1, thickness_points: 2, explainer_size: 2, explainer_steps: 1, smoothgrad_samples: 2,"
    " ig_steps: 2, pse_size: 2, pse_steps: 2, pse_group_size: 16, test_acc_size: 10}",
    "imagenette.backbone=resnet9", "imagenette.backbone_kwargs={width: 4}", "imagenette.image_size=32",
    "imagenette.pool=4", "imagenette.train_size=20", "imagenette.val_size=10", "imagenette.batch_size=10",
    "imagenette.eval={size: 2, batch_size: 2, attack_steps: 2, relu_surrogate: [], eps_list: [],"
    " steps_curve: [], thickness_size: 2, thickness_samples: 1, thickness_points: 1, explainer_size: 0,"
    " pse_size: 2, pse_steps: 1, pse_group_size: 16, test_acc_size: 10}",
]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def folders(tmp_path):
    cifar = _write_folder(tmp_path / "cifar", ("train", "test"), CIFAR10_CLASSES, (8, 2), 32)
    wnids = read_class_list(str(IMAGENETTE_CLASSES))
    nette = _write_folder(tmp_path / "nette", ("train", "val"), wnids, (3, 1), 32)
    return cifar, nette


def _args(tmp_path, cifar, nette, *extra):
    args = [
        "--preset", "smoke", "--data-dir", str(cifar), "--imagenette-dir", str(nette),
        "--out", str(tmp_path / "docs" / "results"), "--work", str(tmp_path / "work"),
        # one thread: on a shared (loaded) machine, 2-thread OpenMP barriers on these tiny tensors
        # cost ~100x the math itself
        "--threads", "1",
    ]
    for assignment in TINY:
        args += ["--set", assignment]
    return args + list(extra)


def _in_unit(x):
    return isinstance(x, float) and 0.0 <= x <= 1.0


def test_pipeline_end_to_end_and_resume(tmp_path, folders, monkeypatch):
    cifar, nette = folders
    results = cli.main(_args(tmp_path, cifar, nette))

    json_path = tmp_path / "docs" / "results" / "results_smoke.json"
    doc = tmp_path / "docs" / "results.md"
    assert json_path.is_file() and doc.is_file()
    saved = json.loads(json_path.read_text())
    assert set(saved["tasks"]) == {"cifar", "imagenette"}
    assert saved["hardware"]["threads"] >= 1 and saved["command"].startswith("python -m benchmarks.reproduce")

    task = saved["tasks"]["cifar"]
    assert set(task["pretrain"]["swap_val_acc"]) == {"2.0", "5.0", "10.0"}
    assert all(_in_unit(a) for a in task["pretrain"]["swap_val_acc"].values())
    assert set(task["eval"]) == {"vanilla", "wd", "r2et", "r2et_noh"}
    # sweep: both grid points trained and recorded, the selected one among them
    sel = task["selection"]
    assert len(sel["r2et"]["points"]) == 2 and sel["r2et"]["run"] in sel["r2et"]["points"]
    assert sel["r2et"]["value"] in (0.1, 1.0)
    assert sel["r2et_noh"]["value"] == sel["r2et"]["value"]
    assert sel["r2et_noh"]["source"] == "inherited from r2et"
    assert sel["wd"]["floor"] == pytest.approx(task["runs"]["vanilla"]["sweep"]["val_acc"] - 0.02)
    for run in task["runs"].values():
        assert _in_unit(run["sweep"]["val_acc"]) and _in_unit(run["sweep"]["val_p_at_k"]["mean"])
        assert run["train_seconds"] > 0
    # every metric present and in range
    for method, ev in task["eval"].items():
        assert _in_unit(ev["test_acc"]) and _in_unit(ev["subset_acc"])
        for key in ("er", "mse", "smoothgrad", "integrated_gradients"):
            assert _in_unit(ev[key]["p_at_k"]["mean"]), (method, key)
            assert ev[key]["pred_flip"]["mean"] == 0.0  # the attacks keep the prediction
        assert -1.0 <= ev["er"]["spearman"]["mean"] <= 1.0 or math.isnan(ev["er"]["spearman"]["mean"])
        assert _in_unit(ev["thickness"]["mean"])
        assert [r["steps"] for r in ev["steps_curve"]] == [1, 3]
        assert _in_unit(ev["eps_curve"][0]["noise"]["mean"]) and _in_unit(ev["eps_curve"][0]["er"]["mean"])
        assert "frac_suppression" in ev["pse"] and "attack_success_rate" in ev["pse"]
        # ReLU models are also attacked through the Softplus surrogate; the reported value is the worse
        if ev["relu"]:
            assert ev["er"]["p_at_k"]["mean"] <= min(ev["er_direct"]["p_at_k"]["mean"], ev["er_surrogate"]["p_at_k"]["mean"]) + 1e-9
        else:
            assert "er_surrogate" not in ev
    nette_task = saved["tasks"]["imagenette"]
    assert set(nette_task["eval"]) == {"vanilla", "r2et"}
    assert _in_unit(nette_task["eval"]["r2et"]["er"]["p_at_k"]["mean"])

    text = doc.read_text()
    assert "| Method | Act. | Chosen |" in text and "Expected ordering" in text
    assert "R2ET vs Vanilla" in text and "R2ET vs WD" in text
    assert "Weight selection on the validation split" in text and "inherited from r2et" in text
    for png in ("cifar_pk_vs_acc", "cifar_pk_vs_steps", "cifar_thickness_vs_pk", "cifar_pk_vs_eps", "imagenette_pk_vs_acc"):
        assert (tmp_path / "docs" / "results" / f"{png}.png").stat().st_size > 1000
        assert f"results/{png}.png" in text or png.startswith("imagenette")
    assert results["tasks"]["cifar"]["selection"] == sel

    # a second invocation reuses every stage record: no training, no evaluation
    def boom(*args, **kwargs):
        raise AssertionError("a cached stage was recomputed")

    monkeypatch.setattr(pipeline.Study, "_fit", boom)
    monkeypatch.setattr(pipeline, "evaluate_model", boom)
    again = cli.main(_args(tmp_path, cifar, nette))
    assert again["tasks"]["cifar"]["eval"] == saved["tasks"]["cifar"]["eval"]
    # --report-only re-renders from the JSON; --compare adds the rerun-noise table
    doc.unlink()
    cli.main(_args(tmp_path, cifar, nette, "--report-only", "--compare", str(json_path)))
    text = doc.read_text()
    assert "### Rerun comparison" in text and "Largest difference over methods: test acc 0.000, ER P@k 0.000" in text


def test_presets_and_overrides():
    for name in PRESETS:
        preset = build_preset(name)
        for task in (preset.cifar, preset.imagenette):
            for method, parent in task.inherit.items():
                assert parent in task.methods and parent not in task.inherit
            assert task.eval.size <= max(task.eval.size, task.eval.thickness_size)
    preset = build_preset("cpu")
    assert preset.cifar.eval.attack_steps == 100 and preset.cifar.eval.eps == pytest.approx(8 / 255)
    apply_override(preset, "cifar.eval.size=7")
    apply_override(preset, "cifar.methods=[vanilla, r2et]")
    assert preset.cifar.eval.size == 7 and preset.cifar.methods == ("vanilla", "r2et")
    with pytest.raises(ValueError, match="no field"):
        apply_override(preset, "cifar.nonsense=1")


def test_balanced_order_prefixes_are_balanced():
    targets = [i % 3 for i in range(30)] + [0] * 5
    order = balanced_order(targets, 12)
    assert len(order) == len(set(order)) == 12
    assert sorted(targets[i] for i in order[:9]) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert balanced_order(targets, 12) == order  # seeded


def _fake_run(seed: int, pks: dict[str, float]) -> dict:
    """A results JSON reduced to what the rerun comparison reads: ER/MSE P@k, accuracy, thickness."""
    ev = {m: {"test_acc": 0.5, "er": {"p_at_k": {"mean": v, "se": 0.01}}, "mse": {"p_at_k": {"mean": v, "se": 0.01}},
              "thickness": {"mean": 0.98}} for m, v in pks.items()}
    return {"seed": seed, "hardware": {"threads": 2, "torch": "x"}, "json_path": f"run{seed}.json",
            "tasks": {"cifar": {"eval": ev}}}


def test_rerun_comparison_reports_the_ordering_run_by_run():
    from benchmarks.reproduce.report import compare_section

    this = _fake_run(0, {"vanilla": 0.30, "sp": 0.40, "est_h": 0.38, "wd": 0.31, "r2et": 0.45})
    other = _fake_run(1, {"vanilla": 0.35, "sp": 0.47, "est_h": 0.40, "wd": 0.33, "r2et": 0.44})
    other["_source"] = "moved/run1.json"
    lines = compare_section(this, [other])
    text = "\n".join(lines)
    assert "seed 1, 2 torch thread(s), torch x, `moved/run1.json`" in text
    assert "Largest difference over methods: test acc 0.000, ER P@k 0.070" in text
    row = next(line for line in lines if line.startswith("| SP |") and "+" in line)
    # R2ET - SP: +0.05 in this run, -0.03 in the other; mean +0.01, min -0.03, max +0.05
    assert row == "| SP | +0.050 | -0.030 | +0.010 | -0.030 | +0.050 |"
