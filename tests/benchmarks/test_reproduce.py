"""The frontier study end to end on tiny image folders the test writes itself (no shared data).

Covers: adaptation of a "published" weights file -> fine-tunes over each method's sweep with two
training seeds -> the matched accuracies and the near settings' third seed -> evaluation of every
model -> frontier and matched blocks -> JSON + markdown + plots; an interruption (SIGTERM) in the
middle of a stage, which leaves no record of it, then a rerun that continues, then a run that
reuses every record. Also: the validation/test split, the presets, and the matched comparison of
the pipeline's curves on synthetic per-image values against a hand computation.
"""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.reproduce import __main__ as cli
from benchmarks.reproduce import pipeline
from benchmarks.reproduce.data import eval_sets, split_test, study_order
from benchmarks.reproduce.presets import PRESETS, TaskConfig, apply_override, build_preset, estimate
from datamodules import CIFAR10_CLASSES


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


EPS4 = "[0.00392157, 0.00784314, 0.01568627, 0.03137255]"
TINY = [
    # a 4-wide ResNet-9 adapted from a "published" weights file the test writes, one epoch per fit,
    # 1-step attacks on 4 images at the four budgets, the paper protocol on 2
    "cifar.backbone_kwargs={width: 4}", "cifar.pretrained=true", "cifar.train_size=60", "cifar.finetune_size=40",
    "cifar.val_size=20", "cifar.batch_size=20",
    "cifar.frontier={vanilla: [null], sp: [10.0, 5.0], r2et: [0.1, 1.0], at: [1.0]}",
    "cifar.seeds=2", "cifar.near_seeds=3", "cifar.matched_drops=[0.0, 5.0]", "cifar.matched_resamples=200",
    f"cifar.eval={{size: 4, batch_size: 4, steps: 1, eps_list: {EPS4}, eps: 0.03137255, thickness_samples: 1,"
    " thickness_points: 2, paper_size: 2, paper_steps: 3, test_acc_size: null}",
]

# the study sets its own thread count (--threads); the fixture restores the previous one after each test
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture
def cifar(tmp_path):
    return _write_folder(tmp_path / "cifar", ("train", "test"), CIFAR10_CLASSES, (8, 4), 32)


def _weights(tmp_path):
    """A stand-in for the published CIFAR weights: a fresh 4-wide ResNet-9's state dict."""
    from lightning_modules.backbones import build_backbone

    path = tmp_path / "published.pth"
    if not path.is_file():
        torch.manual_seed(0)
        torch.save(build_backbone("resnet9", num_classes=10, width=4).state_dict(), path)
    return path


def _args(tmp_path, cifar, *extra):
    args = ["--preset", "smoke", "--data-dir", str(cifar), "--weights-file", str(_weights(tmp_path)),
            "--out", str(tmp_path / "docs" / "results"), "--work", str(tmp_path / "work"), "--threads", "1"]
    for assignment in TINY:
        args += ["--set", assignment]
    return args + list(extra)


def _in_unit(x):
    return isinstance(x, float) and 0.0 <= x <= 1.0


def test_sigterm_inside_a_fit_exits_130_with_the_message_and_no_record(tmp_path, cifar, monkeypatch, capsys):
    """Inside Lightning's fit a KeyboardInterrupt would end in Lightning's sys.exit(1) with no
    message; the study's stop is a SIGTERMException that Lightning re-raises."""
    from lightning_modules.classifier import RobustClassifier

    real_step = RobustClassifier.training_step

    def step_then_sigterm(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(RobustClassifier, "training_step", step_then_sigterm)
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stopped:
        cli.main(_args(tmp_path, cifar))
    assert stopped.value.code == 130 and signal.getsignal(signal.SIGINT) == previous
    assert "interrupted (SIGTERM) after 0 new stage(s)" in capsys.readouterr().out
    stages = tmp_path / "work" / "stages" / "cifar"
    assert not stages.exists() or not any(stages.rglob("*.json"))  # the interrupted pretrain left no record


def test_frontier_end_to_end_interrupted_and_resumed(tmp_path, cifar, monkeypatch):
    stages = tmp_path / "work" / "stages" / "cifar"
    real_eval = pipeline.evaluate_model
    calls = {"eval": 0, "fit": 0}

    def eval_then_sigterm(*args, **kwargs):
        calls["eval"] += 1
        if calls["eval"] == 3:  # SIGTERM arrives in the middle of the third evaluation
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not stop the stage")
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(pipeline, "evaluate_model", eval_then_sigterm)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        cli.main(_args(tmp_path, cifar))
    assert stopped.value.code == 130 and signal.getsignal(signal.SIGTERM) == previous
    fits = sorted(p.name for p in (stages / "finetune").iterdir())
    assert len(fits) >= 12 and all(p.endswith(".json") for p in fits)  # every fine-tune recorded, nothing partial
    assert len(list((stages / "eval").iterdir())) == 2  # two evaluations done, the interrupted one left no record

    # the same command continues: no fit, only the missing evaluations
    real_fit = pipeline.Study._fit

    def counted_fit(*args, **kwargs):
        calls["fit"] += 1
        return real_fit(*args, **kwargs)

    def counted_eval(*args, **kwargs):
        calls["eval"] += 1
        return real_eval(*args, **kwargs)

    calls.update(eval=0, fit=0)
    monkeypatch.setattr(pipeline.Study, "_fit", counted_fit)
    monkeypatch.setattr(pipeline, "evaluate_model", counted_eval)
    results = cli.main(_args(tmp_path, cifar))
    task = results["tasks"]["cifar"]
    assert calls["fit"] == 0 and calls["eval"] == len(task["eval"]) - 2

    json_path = tmp_path / "docs" / "results" / "results_smoke.json"
    doc = tmp_path / "docs" / "results.md"
    saved = json.loads(json_path.read_text())
    # the split: validation and test images from the test split, disjoint, stated
    split = saved["tasks"]["cifar"]["split"]
    assert (split["val"], split["test"], split["attack"]) == (20, 20, 4) and split["source"] == "CIFAR-10 test split"
    pre = saved["tasks"]["cifar"]["pretrain"]
    assert pre["published"]["weights_file"] == str(_weights(tmp_path)) and _in_unit(pre["published"]["val_acc"])
    assert pre["test_size"] == 20 and pre["sweep"]["val_size"] == 20

    # the frontier block: per method, per setting, per seed, with the four budgets and the paper column
    frontier = saved["frontier"]
    assert set(frontier) == {"vanilla", "sp", "r2et", "at"}
    assert frontier["r2et"]["order"] == ["w=0.1", "w=1"] and frontier["r2et"]["start"] == "sp beta=10"
    assert frontier["sp"]["start"] is None and frontier["vanilla"]["order"] == ["-"]
    plan = saved["tasks"]["cifar"]["plan"]
    for method, block in frontier.items():
        for label, seeds in block["settings"].items():
            assert {"0", "1"} <= set(seeds) <= {"0", "1", "2"}
            value = seeds["0"]["setting"]
            assert ("2" in seeds) == (value in plan["near"].get(method, [])), (method, label)
            for row in seeds.values():
                assert set(row["p_at_k_worst"]) == {"1/255", "2/255", "4/255", "8/255"}
                assert all(_in_unit(v) for v in row["p_at_k_worst"].values())
                assert _in_unit(row["p_at_k_paper"]) and _in_unit(row["val_acc"]) and _in_unit(row["test_acc"])
                ev = saved["tasks"]["cifar"]["eval"][row["run"]]
                assert ev["sizes"]["main"] == 4 and len(ev["per_image"]["paper"]) == 2
                worst = [ev["per_image"][f"worst/eps_{e}"] for e in (1, 2, 4, 8)]
                assert all(b <= a + 1e-9 for lo, hi in zip(worst, worst[1:]) for a, b in zip(lo, hi))
    # seeds differ (another training seed, other weights)
    runs = saved["tasks"]["cifar"]["runs"]
    w0 = torch.load(runs["r2et-w=0.1-seed0"]["checkpoint"], weights_only=True)["state_dict"]
    w1 = torch.load(runs["r2et-w=0.1-seed1"]["checkpoint"], weights_only=True)["state_dict"]
    assert any(not torch.equal(w0[k], w1[k]) for k in w0 if w0[k].is_floating_point())
    # AT at the reference strength: one l2 step of 1 normalised unit (pixel length = the model's std)
    at_run = runs["at-step=1-seed0"]
    assert at_run["model_kwargs"]["objective_kwargs"] == {"steps": 1, "step": "l2", "units": "normalized", "step_size": 1.0}
    at_row = frontier["at"]["settings"]["step=1"]["0"]
    std = (0.2470, 0.2435, 0.2616)  # the ResNet-9's CIFAR normalisation: the kept steps' pixel l2 lies in its range
    kept = 1.0 - at_row["attack_flipped"]
    assert min(std) * kept - 1e-6 <= at_row["attack_l2"] <= max(std) * kept + 1e-6

    # the matched block: per pair and budget, rows at the plan's accuracies (anchors at their own)
    matched = saved["matched"]
    assert set(matched) == {"r2et_vs_sp", "r2et_vs_at", "r2et_vs_vanilla"}
    assert plan["accuracies"][0] == pytest.approx(plan["reference"])
    for key, pair in matched.items():
        assert set(pair["by_budget"]) == {"1/255", "2/255", "4/255", "8/255", "paper"}
        short = pair["b"] in plan["short"]
        for budget, block in pair["by_budget"].items():
            grid = [r["accuracy"] for r in block["rows"] if r["at_setting"] is None]
            grid += [m for m in block["out_of_range"] if not isinstance(m, str)]
            own = [r["at_setting"] for r in block["rows"] if r["at_setting"] is not None]
            own += [m for m in block["out_of_range"] if isinstance(m, str)]
            if pair["anchor"]:
                assert grid == [] and own == ["-"]
            else:
                assert sorted(grid) == pytest.approx(sorted(plan["accuracies"]))
                assert own == (frontier[pair["b"]]["order"] if short else [])
            for r in block["rows"]:
                assert {"accuracy", "paired_diff", "ci_low", "ci_high", "seeds_agree"} <= set(r)
                assert r["ci_low"] <= r["paired_diff"] + 1e-9 and r["paired_diff"] <= r["ci_high"] + 1e-9

    text = doc.read_text()
    assert "## Findings" in text and "### Worst case at 1/255" in text and "### Paper protocol" in text
    assert text.index("### Worst case at 1/255") < text.index("### Worst case at 2/255") < text.index("### Worst case at 8/255")
    assert "R2ET − SP" in text and "CIFAR-10 test split" in text and "seed mean [min, max]" in text
    for budget in ("1_255", "2_255", "8_255", "paper"):
        png = tmp_path / "docs" / "results" / f"cifar_frontier_{budget}.png"
        assert png.stat().st_size > 1000 and f"results/cifar_frontier_{budget}.png" in text

    # a third invocation reuses every stage record: no training, no evaluation
    def boom(*args, **kwargs):
        raise AssertionError("a cached stage was recomputed")

    monkeypatch.setattr(pipeline.Study, "_fit", boom)
    monkeypatch.setattr(pipeline, "evaluate_model", boom)
    again = cli.main(_args(tmp_path, cifar))
    assert again["frontier"] == saved["frontier"] and again["matched"] == saved["matched"]
    text = doc.read_text()
    doc.unlink()
    cli.main(_args(tmp_path, cifar, "--report-only"))
    assert doc.read_text() == text


def test_validation_and_test_images_are_disjoint_balanced_halves_of_the_test_split(tmp_path, cifar):
    targets = [i % 10 for i in range(100)]
    val, test = split_test(targets, 40, seed=3)
    assert len(val) == 40 and len(test) == 60 and not set(val) & set(test) and set(val) | set(test) == set(range(100))
    assert sorted(targets[i] for i in val) == sorted(list(range(10)) * 4)
    assert sorted(targets[i] for i in test[:20]) == sorted(list(range(10)) * 2)  # prefixes of the test part too
    assert split_test(targets, 40, seed=3) == (val, test) and split_test(targets, 40, seed=4) != (val, test)
    with pytest.raises(ValueError, match="val_size=45 must be a multiple of the 10 classes"):
        split_test(targets, 45)
    with pytest.raises(ValueError, match="val_size=100 must be"):
        split_test(targets, 100)
    # the study's sets on real folders: val from the test split, attack images from the other part
    task = TaskConfig(val_size=20, batch_size=10, num_workers=0)
    task.eval.size, task.eval.paper_size, task.eval.test_acc_size = 6, 4, None
    sets = eval_sets(task, str(cifar))
    val_ids, test_ids = set(sets["val_acc"].indices), set(sets["test_acc"].indices)
    assert len(val_ids) == 20 and len(test_ids) == 20 and not val_ids & test_ids
    assert set(sets["test"].ids.tolist()) <= test_ids and len(sets["test"]) == 6
    task.eval.size = 30
    with pytest.raises(ValueError, match="needs 30 attack images but the test part has 20"):
        eval_sets(task, str(cifar))


def _synthetic(task: TaskConfig):
    """Runs and evaluations with chosen val accuracies and per-image worst-case P@k at 2/255."""
    runs, evals = {}, {}
    n = 4
    # (method, value) -> per seed (val acc, per-image values)
    table = {
        ("sp", 10.0): {0: (0.90, [0.2] * n), 1: (0.90, [0.4] * n)},
        ("sp", 5.0): {0: (0.80, [0.5] * n), 1: (0.80, [0.5] * n)},
        ("r2et", 0.1): {0: (0.88, [0.6, 0.6, 0.2, 0.2]), 1: (0.86, [0.8, 0.8, 0.4, 0.4])},
        ("r2et", 1.0): {0: (0.70, [0.9] * n), 1: (0.70, [0.9] * n)},
        ("vanilla", None): {0: (0.87, [0.1] * n), 1: (0.87, [0.3] * n)},
    }
    for (method, value), seeds in table.items():
        for seed, (acc, values) in seeds.items():
            run = pipeline.run_name(method, value, seed)
            runs[run] = {"run": run, "method": method, "setting": pipeline.setting_label(method, value),
                         "training_seed": seed, "sweep": {"val_acc": acc}}
            evals[run] = {"ids": list(range(n)), "protocol": {"settings": {}}, "per_image": {"worst/eps_2": values}}
    return {"runs": runs, "eval": evals}


def test_matched_block_on_the_pipeline_curves_known_answer():
    task = TaskConfig(frontier={"sp": [10.0, 5.0], "r2et": [0.1, 1.0], "vanilla": [None]}, softplus_beta=10.0,
                      matched_drops=(3.0,), matched_resamples=400)
    task.eval.eps_list, task.eval.eps, task.eval.paper_size = (2 / 255,), 2 / 255, 0
    result = _synthetic(task)
    result["plan"] = pipeline.near_settings(task, result["runs"])
    assert result["plan"]["reference"] == pytest.approx(0.90) and result["plan"]["accuracies"] == pytest.approx([0.87])
    # r2et's curve: SP(10) at 0.90, w=0.1 at 0.87 (seed mean), w=1 at 0.70 -> 0.87 is w=0.1 itself;
    # SP's curve: 0.90 -> 0.80, at 0.87 30% of the way
    assert result["plan"]["near"]["r2et"] == [0.1] and sorted(result["plan"]["near"]["sp"]) == [5.0, 10.0]
    matched = pipeline.matched_block(task, result)
    row = matched["r2et_vs_sp"]["by_budget"]["2/255"]["rows"][0]
    r2et = sum([0.7, 0.7, 0.3, 0.3]) / 4  # the seed mean of w=0.1
    sp = (0.3 + 0.3 * (0.5 - 0.3))  # seed means 0.3 (SP 10) and 0.5 (SP 5), 30% of the way
    assert row["value_a"] == pytest.approx(r2et) and row["value_b"] == pytest.approx(sp)
    assert row["paired_diff"] == pytest.approx(r2et - sp) and row["bracket_a"] == [0, 1]
    # the anchor: vanilla at its own accuracy 0.87, R2ET's curve there is w=0.1's seed mean again
    anchor = matched["r2et_vs_vanilla"]["by_budget"]["2/255"]["rows"][0]
    assert anchor["accuracy"] == pytest.approx(0.87) and anchor["paired_diff"] == pytest.approx(r2et - 0.2)
    # seed 0's own curve: SP(10) 0.90, w=0.1 0.88, w=1 0.70: 0.87 lies on the second segment
    per_seed = row["per_seed"]
    t0 = (0.87 - 0.88) / (0.70 - 0.88)
    want0 = sum(v + t0 * (0.9 - v) for v in [0.6, 0.6, 0.2, 0.2]) / 4 - (0.2 + 0.3 * 0.3)
    assert per_seed["0"]["paired_diff"] == pytest.approx(want0)


def test_presets_and_overrides():
    assert PRESETS == ("smoke", "cpu", "gpu")
    cpu = build_preset("cpu").cifar
    # what the cpu study promises: the published ResNet-20, five weights for each regularizer,
    # SP at beta 5 and 10, AT at the reference step and two stronger ones, two anchors, >= 3 epochs
    assert cpu.backbone == "resnet20" and cpu.pretrained and cpu.finetune_epochs >= 3
    for method in ("r2et", "est_h", "r2et_noh", "grad_norm"):
        assert len(cpu.frontier[method]) >= 5 and cpu.frontier[method] == sorted(cpu.frontier[method])
    assert {5.0, 10.0} <= set(cpu.frontier["sp"]) and cpu.frontier["at"][0] == 1.0 and len(cpu.frontier["at"]) >= 3
    assert cpu.frontier["vanilla"] == [None] and len(cpu.frontier["wd"]) == 1
    assert cpu.seeds >= 2 and cpu.near_seeds >= 3 and cpu.val_size == 5000
    assert cpu.eval.eps_list == pytest.approx((1 / 255, 2 / 255, 4 / 255, 8 / 255))
    # the stated time is the cost model's, and the cost model fits the budget
    est = estimate(cpu)
    assert est["total"] <= 3.6 * 3600 and f"estimated {est['total'] / 3600:.1f} h" in build_preset("cpu").description
    for name in PRESETS:
        pipeline.check_task(build_preset(name).cifar)
    preset = build_preset("cpu")
    apply_override(preset, "cifar.eval.size=7")
    apply_override(preset, "cifar.frontier={vanilla: [null], r2et: [0.1]}")
    assert preset.cifar.eval.size == 7 and preset.cifar.frontier == {"vanilla": [None], "r2et": [0.1]}
    with pytest.raises(ValueError, match="no field"):
        apply_override(preset, "cifar.nonsense=1")
    with pytest.raises(ValueError, match="valid: smoke, cpu, gpu"):
        build_preset("full")
    # settings the study cannot honour are refused before any work, naming the value
    for assignment, message in [
        ("cifar.eval.eps=0.5", "eval.eps=0.5"),
        ("cifar.frontier={r2et: [0.1]}", r"matched_reference='sp' is not in the frontier \['r2et'\]"),
        ("cifar.frontier={sp: [10.0], bogus: [1]}", r"frontier methods \['bogus'\] are not known"),
        ("cifar.frontier={sp: [10.0], vanilla: [1.0]}", r"vanilla has no swept parameter; use \[null\]"),
        ("cifar.frontier={sp: [10.0], r2et: [0.1, -1]}", r"must be positive numbers, weakest first"),
        ("cifar.frontier={sp: [10.0], r2et: []}", r"frontier.r2et is empty"),
        ("cifar.frontier={sp: [10.0, 10.0]}", r"lists a value twice"),
        ("cifar.near_seeds=1", r"seeds=2 and near_seeds=1 must satisfy"),
        ("cifar.matched_drops=[-1]", r"must be non-negative accuracy drops"),
    ]:
        bad = build_preset("smoke")
        apply_override(bad, assignment)
        with pytest.raises(ValueError, match=message):
            pipeline.check_task(bad.cifar)


def test_pretrained_preset_needs_its_weights_file(tmp_path, cifar):
    with pytest.raises(SystemExit, match="--weights-file"):
        cli.main(["--preset", "cpu", "--data-dir", str(cifar), "--work", str(tmp_path / "w"),
                  "--out", str(tmp_path / "o"), "--weights-file", str(tmp_path / "missing.th")])


def test_study_order_prefixes_are_balanced():
    targets = [i % 3 for i in range(30)] + [0] * 5
    order = study_order(targets, 12)
    assert len(order) == len(set(order)) == 12
    assert sorted(targets[i] for i in order[:9]) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_a_short_curve_is_also_compared_at_its_own_settings():
    """SP's curve (0.90 -> 0.80) reaches 0.87 but not 0.75: it is short, so all its settings are
    near and R2ET is compared at each SP setting's own accuracy too."""
    task = TaskConfig(frontier={"sp": [10.0, 5.0], "r2et": [0.1, 1.0]}, softplus_beta=10.0,
                      matched_drops=(3.0, 15.0), matched_resamples=100)
    task.eval.eps_list, task.eval.eps, task.eval.paper_size = (2 / 255,), 2 / 255, 0
    result = _synthetic(task)
    result["plan"] = pipeline.near_settings(task, result["runs"])
    assert result["plan"]["short"] == ["sp"] and sorted(result["plan"]["near"]["sp"]) == [5.0, 10.0]
    block = pipeline.matched_block(task, result)["r2et_vs_sp"]["by_budget"]["2/255"]
    assert block["out_of_range"] == [pytest.approx(0.75)]
    rows = {r["at_setting"]: r for r in block["rows"]}
    assert set(rows) == {None, "beta=10", "beta=5"}
    t = (0.80 - 0.87) / (0.70 - 0.87)  # R2ET at SP(5)'s accuracy: between w=0.1 (0.87) and w=1 (0.70)
    assert rows["beta=5"]["accuracy"] == pytest.approx(0.80)
    assert rows["beta=5"]["paired_diff"] == pytest.approx(0.5 + t * (0.9 - 0.5) - 0.5)
    assert rows["beta=10"]["paired_diff"] == pytest.approx(0.0)  # the shared start
