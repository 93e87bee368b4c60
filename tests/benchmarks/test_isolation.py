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
