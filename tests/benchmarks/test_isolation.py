"""The benchmarks' fresh-process layout: each invocation is its own process, and the reported
figure is the median over invocations with its min / max and spread."""

import json

import pytest

from benchmarks.attack_throughput import main as attack_throughput
from benchmarks.isolation import spread


def test_spread_is_median_min_max_over_invocations():
    s = spread([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"]) == (2.0, 1.0, 3.0)
    assert s["spread"] == pytest.approx(2.0)  # max / min - 1
    assert s["all"] == [3.0, 1.0, 2.0]


def test_attack_throughput_runs_each_invocation_in_a_fresh_process(tmp_path):
    out = tmp_path / "at.json"
    result = attack_throughput(["--out", str(out), "--num-images", "1", "--steps", "1", "--skip-callback",
                                "--invocations", "2", "--threads", "1"])
    stored = json.loads(out.read_text())
    ratios = stored["invocations"]["ratio"]["all"]
    assert len(ratios) == 2 and stored["ratio"] == pytest.approx(sorted(ratios)[0] / 2 + sorted(ratios)[1] / 2)
    # the first invocation's details, then the others'
    assert len(stored["details"]["invocation_details"]) == 1
    assert result["ratio"] == stored["ratio"] and "callback_overhead" not in stored


def test_step_profile_splits_the_step_and_counts_r2et_convolutions(tmp_path):
    """R2ET runs 4 forward convolutions per vanilla one (forward, curvature forward, and one per
    input gradient's double backward), the basis of the floor in docs/benchmarks.md."""
    from benchmarks.step_profile import main as step_profile

    out = tmp_path / "profile.json"
    result = step_profile(["--out", str(out), "--objectives", "vanilla", "r2et", "--resnet9-width", "4",
                           "--threads", "1", "--invocations", "1"])
    assert json.loads(out.read_text())["ratios"] == result["ratios"]
    for row in (result["vanilla"], result["r2et"]):
        assert row["conv_ms"] > 0 and row["total_ms"] == pytest.approx(row["conv_ms"] + row["other_ms"])
    forward = "aten::mkldnn_convolution"
    assert result["r2et"]["calls"][forward] == 4 * result["vanilla"]["calls"][forward]
    assert result["ratios"]["r2et"]["conv"]["median"] > 2


def test_evaluation_cost_compares_explaining_the_attacked_images_again_with_the_same_results(tmp_path):
    """Two variants in fresh processes: the shipped protocol explains each batch once (the clean
    pass), the one before explains every attacked image again (2 budgets x er and noise); reusing
    the attacks' scoring pass changes no bit of the per-image values."""
    from benchmarks.evaluation_cost import main as evaluation_cost

    out = tmp_path / "eval.json"
    result = evaluation_cost(["--out", str(out), "--images", "4", "--repeats", "1", "--invocations", "1",
                              "--threads", "1"])
    assert json.loads(out.read_text()) == result
    assert result["same_results"] is True
    assert result["protocol_explanations_per_evaluation"] == {"shipped": 1, "before": 5}
    assert set(result["ratio_over_shipped"]) == {"before"}
