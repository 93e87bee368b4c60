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
from benchmarks.reproduce.data import IMAGENETTE_CLASSES, study_order
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
    # both tasks: a 4-wide ResNet-9, one epoch, 2-3 step attacks on a few images; CIFAR starts from
    # a "published" weights file the test writes (the adaptation path of the cpu preset)
    "cifar.backbone_kwargs={width: 4}", "cifar.pretrained=true", "cifar.train_size=60", "cifar.finetune_size=40",
    "cifar.val_size=10", "cifar.batch_size=20", "cifar.sweep_eval_size=4", "cifar.sweep_attack_steps=2",
    "cifar.methods=[vanilla, wd, sp, est_h, r2et, r2et_noh, at]", "cifar.grids={wd: [0.005, 0.05], r2et: [0.1, 1.0]}",
    "cifar.seed_methods=[sp, r2et]", "cifar.seeds=2",
    "cifar.val_sweep=[{name: r2et-k8, method: r2et, set: {weight: selected, k: 8, epochs: 2}},"
    " {name: sp-beta2, method: sp, set: {softplus_beta: 2.0}}]",
    "cifar.eval={size: 6, batch_size: 6, steps: 2, eps_list: [0.0078431, 0.0313725], eps: 0.0313725,"
    " thickness_samples: 1, thickness_points: 2, check_size: 4, check_steps: 4, paper_size: 4, paper_steps: 3,"
    " explainer_size: 2, explainer_steps: 1, smoothgrad_samples: 2, ig_steps: 2, pse_size: 2, pse_steps: 2,"
    " pse_group_size: 16, test_acc_size: 10}",
    "imagenette.backbone=resnet9", "imagenette.backbone_kwargs={width: 4}", "imagenette.image_size=32",
    "imagenette.pool=4", "imagenette.train_size=20", "imagenette.val_size=10", "imagenette.batch_size=10",
    "imagenette.eval={size: 2, batch_size: 2, steps: 2, eps_list: [0.0313725], eps: 0.0313725, thickness_samples: 1,"
    " thickness_points: 1, check_size: 0, paper_size: 0, explainer_size: 0, pse_size: 2, pse_steps: 1,"
    " pse_group_size: 16, test_acc_size: 10}",
]


# the study sets its own thread count (--threads); the fixture restores the previous one after each test
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture
def folders(tmp_path):
    cifar = _write_folder(tmp_path / "cifar", ("train", "test"), CIFAR10_CLASSES, (8, 2), 32)
    wnids = read_class_list(str(IMAGENETTE_CLASSES))
    nette = _write_folder(tmp_path / "nette", ("train", "val"), wnids, (3, 1), 32)
    return cifar, nette


def _weights(tmp_path):
    """A stand-in for the published CIFAR weights: a fresh 4-wide ResNet-9's state dict."""
    from lightning_modules.backbones import build_backbone

    path = tmp_path / "published.pth"
    if not path.is_file():
        torch.manual_seed(0)
        torch.save(build_backbone("resnet9", num_classes=10, width=4).state_dict(), path)
    return path


def _args(tmp_path, cifar, nette, *extra):
    args = [
        "--preset", "smoke", "--data-dir", str(cifar), "--imagenette-dir", str(nette),
        "--weights-file", str(_weights(tmp_path)),
        "--out", str(tmp_path / "docs" / "results"), "--work", str(tmp_path / "work"),
        # one thread: on a shared (loaded) machine, 2-thread OpenMP barriers on these tiny tensors
        # cost ~100x the math itself
        "--threads", "1",
    ]
    for assignment in TINY:
        args += ["--set", assignment]
    return args + list(extra)


def _spearman(a, b):
    """Spearman's rho written out: Pearson's r of the average ranks (ties share their mean rank)."""
    def ranks(v):
        return [sum(u < x for u in v) + (sum(u == x for u in v) + 1) / 2 for x in v]

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


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
    pre = task["pretrain"]
    # the adaptation starts from the weights file: its accuracy before and the start's after are recorded
    assert pre["published"]["weights_file"] == str(_weights(tmp_path)) and _in_unit(pre["published"]["test_acc"])
    assert _in_unit(pre["test_acc"]) and pre["test_size"] == 10
    assert set(pre["swap_val_acc"]) == {"2.0", "5.0", "10.0"}
    assert set(task["eval"]) == {"vanilla", "wd", "sp", "est_h", "r2et", "r2et_noh", "at"}
    # sweep: both grid points trained and recorded, the selected one among them
    sel = task["selection"]
    assert len(sel["r2et"]["points"]) == 2 and sel["r2et"]["run"] in sel["r2et"]["points"]
    assert sel["r2et"]["value"] in (0.1, 1.0)
    assert sel["r2et_noh"]["value"] == sel["r2et"]["value"]
    assert sel["r2et_noh"]["source"] == "inherited from r2et"
    assert sel["wd"]["floor"] == pytest.approx(task["runs"]["vanilla"]["sweep"]["val_acc"] - 0.02)
    # AT trains with the reference-strength attack: one l2 step
    at_kwargs = task["runs"]["at"]["model_kwargs"]["objective_kwargs"]
    assert at_kwargs["steps"] == 1 and at_kwargs["step"] == "l2"
    # training seeds: the seeded methods have two fine-tunes with different training seeds (other weights)
    assert task["seed_runs"]["r2et"] == {"0": sel["r2et"]["run"], "1": sel["r2et"]["run"] + "-seed1"}
    assert set(task["seed_runs"]["vanilla"]) == {"0"}
    seed1 = task["runs"][sel["r2et"]["run"] + "-seed1"]
    assert seed1["seed"] == 1 and task["runs"][sel["r2et"]["run"]]["seed"] == 0
    w0 = torch.load(task["runs"][sel["r2et"]["run"]]["checkpoint"], weights_only=True)["state_dict"]
    w1 = torch.load(seed1["checkpoint"], weights_only=True)["state_dict"]
    assert any(not torch.equal(w0[k], w1[k]) for k in w0 if w0[k].is_floating_point())
    tags = ["eps_2", "eps_8"]
    for method, seeds in task["seed_eval"].items():
        for seed, ev in seeds.items():
            assert _in_unit(ev["test_acc"]) and ev["sizes"]["main"] == 6
            worst = [ev["per_image"][f"worst/{t}"] for t in tags]
            # the worst case is per image at most every attack, and never rises with the budget
            for t, w in zip(tags, worst):
                for src, block in ev["p_at_k"].items():
                    assert ev["p_at_k"]["worst"][t]["mean"] <= block[t]["mean"] + 1e-9, (method, src, t)
                assert all(_in_unit(v) for v in w)
            assert all(b <= a + 1e-9 for a, b in zip(*worst))
            assert _in_unit(ev["thickness_boundary"]["mean"]) and _in_unit(ev["thickness_all_pairs"]["mean"])
            extras = ("paper", "step_check", "smoothgrad", "integrated_gradients", "pse")
            assert all((key in ev) == (seed == "0") for key in extras), (method, seed)
        ev = seeds["0"]
        assert ("er_surrogate" in ev["p_at_k"]) == ev["relu"]  # the surrogate attack only where ReLU is
        check = ev["step_check"]
        assert check["combined_worst"]["mean"] <= check["main_worst"]["mean"] + 1e-9
        assert _in_unit(ev["paper"]["p_at_k"]["mean"]) and len(ev["per_image"]["paper"]) == 4
        assert "frac_suppression" in ev["pse"]
    # paired comparisons, R2ET minus each method, one interval per R2ET seed
    comps = task["comparisons"]
    assert set(comps) == {"vanilla", "wd", "sp", "est_h", "r2et_noh", "at"}
    for other, c in comps.items():
        assert len(c["seeds"]) == 2 and c["ci_low"] <= c["paired_diff"] <= c["ci_high"]
        signs = {r["sign"] for r in c["seeds"]}
        assert c["seeds_agree"] == (len(signs) == 1 and 0 not in signs)
        assert [r["other_seed"] for r in c["seeds"]] == ([0, 1] if other == "sp" else [0, 0])
        mine = task["seed_eval"]["r2et"]["0"]["per_image"]["worst/eps_8"]
        theirs = task["seed_eval"][other]["0"]["per_image"]["worst/eps_8"]
        assert c["seeds"][0]["paired_diff"] == pytest.approx(sum(mine) / 6 - sum(theirs) / 6)
        # the headline difference is the seed average, its interval the one of the seed-averaged differences
        assert c["paired_diff"] == pytest.approx(sum(r["paired_diff"] for r in c["seeds"]) / 2)
    # the machine-readable summary the docs promise
    summ = saved["summary"]["cifar"]
    for method, row in summ["methods"].items():
        assert set(row["p_at_k_worst"]) == set(tags) and _in_unit(row["test_acc"]) and _in_unit(row["thickness_boundary"])
    for key, row in summ["comparisons"].items():
        assert key.startswith("r2et_vs_") and isinstance(row["seeds_agree"], bool)
        assert {"paired_diff", "ci_low", "ci_high"} <= set(row)
    # the thickness-P@k rank correlation across the methods, from the summary's own rows
    rows, head = list(summ["methods"].values()), summ["headline_eps"]
    for pairs in ("boundary", "all_pairs"):
        want = _spearman([r[f"thickness_{pairs}"] for r in rows], [r["p_at_k_worst"][head] for r in rows])
        assert summ["rank_correlation_thickness_p_at_k"][pairs] == pytest.approx(want, abs=1e-12), pairs
    # the validation-only sweep: its own fine-tunes, scored on val images only
    vs = task["val_sweep"]
    assert set(vs) == {"r2et-k8", "sp-beta2"}
    assert vs["r2et-k8"]["value"] == sel["r2et"]["value"] and vs["r2et-k8"]["model_kwargs"]["k"] == 8
    assert vs["r2et-k8"]["epochs"] == 2 and vs["sp-beta2"]["model_kwargs"]["softplus_beta"] == 2.0
    assert all(_in_unit(v["sweep"]["val_acc"]) and _in_unit(v["sweep"]["val_p_at_k"]["mean"]) for v in vs.values())
    nette_task = saved["tasks"]["imagenette"]
    assert set(nette_task["eval"]) == {"vanilla", "r2et"}
    assert _in_unit(nette_task["eval"]["r2et"]["p_at_k"]["worst"]["eps_8"]["mean"])

    text = doc.read_text()
    assert "| Method | Act. | Chosen | Seeds |" in text and "### Paired comparisons" in text
    assert "R2ET vs |" in text and "| SP |" in text and "rank correlation" in text
    assert "Weight selection on the validation split" in text and "inherited from r2et" in text
    assert "step check" in text and "AT at the reference strength" in text and "validation-only sweep" in text
    for png in ("cifar_pk_vs_acc", "cifar_thickness_vs_pk", "cifar_pk_vs_eps", "imagenette_pk_vs_acc"):
        assert (tmp_path / "docs" / "results" / f"{png}.png").stat().st_size > 1000
        assert f"results/{png}.png" in text
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
    assert "## Rerun comparison" in text and "Largest difference over methods: test acc 0.000, worst P@k 8/255 0.000" in text


def test_pretrained_preset_needs_its_weights_file(tmp_path, folders):
    cifar, nette = folders
    with pytest.raises(SystemExit, match="--weights-file"):
        cli.main(["--preset", "cpu", "--data-dir", str(cifar), "--work", str(tmp_path / "w"),
                  "--out", str(tmp_path / "o"), "--weights-file", str(tmp_path / "missing.th")])


def test_presets_and_overrides():
    assert PRESETS == ("smoke", "cpu", "cpu_small", "gpu")
    for name in PRESETS:
        preset = build_preset(name)
        for task in (preset.cifar, preset.imagenette):
            if task is None:
                continue
            for method, parent in task.inherit.items():
                assert parent in task.methods and parent not in task.inherit
            assert set(task.seed_methods) <= set(task.methods)
    # what the cpu study promises: the published ResNet-20, >= 10k fine-tuning images, >= 200
    # evaluation and >= 2000 accuracy images, four budgets, three seeds of the central methods
    cpu = build_preset("cpu").cifar
    assert cpu.backbone == "resnet20" and cpu.pretrained and cpu.finetune_size >= 10000
    assert cpu.eval.size >= 200 and cpu.eval.test_acc_size >= 2000 and cpu.seeds == 3
    assert cpu.eval.eps_list == pytest.approx((1 / 255, 2 / 255, 4 / 255, 8 / 255))
    assert {"sp", "est_h", "r2et"} <= set(cpu.seed_methods)
    gpu = build_preset("gpu").cifar
    assert gpu.train_size == 45000 and gpu.eval.size == 1000 and gpu.backbone_kwargs == {"width": 64}
    preset = build_preset("cpu")
    apply_override(preset, "cifar.eval.size=7")
    apply_override(preset, "cifar.methods=[vanilla, r2et]")
    assert preset.cifar.eval.size == 7 and preset.cifar.methods == ("vanilla", "r2et")
    with pytest.raises(ValueError, match="no field"):
        apply_override(preset, "cifar.nonsense=1")
    with pytest.raises(ValueError, match="valid: smoke, cpu, cpu_small, gpu"):
        build_preset("full")
    # settings the study cannot honour are refused before any work, naming the value
    bad = build_preset("smoke")
    apply_override(bad, "cifar.eval.eps=0.5")
    with pytest.raises(ValueError, match="eval.eps=0.5"):
        pipeline.check_task(bad.cifar)
    bad = build_preset("smoke")
    apply_override(bad, "cifar.val_sweep=[{name: x, method: wd, set: {weight: 1}}]")
    with pytest.raises(ValueError, match="'wd'.*not supported"):
        pipeline.check_task(bad.cifar)
    bad = build_preset("smoke")
    apply_override(bad, "cifar.val_sweep=[{name: x, method: r2et, set: {lr: 1}}]")
    with pytest.raises(ValueError, match="unknown keys \\['lr'\\]"):
        pipeline.check_task(bad.cifar)


def test_study_order_prefixes_are_balanced():
    targets = [i % 3 for i in range(30)] + [0] * 5
    order = study_order(targets, 12)
    assert len(order) == len(set(order)) == 12
    assert sorted(targets[i] for i in order[:9]) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


