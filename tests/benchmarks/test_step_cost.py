import json

import pytest
import torch

from benchmarks.step_cost import _cpu_step_peak, build_model, main, naive_r2et
from explanations import build_objective


def test_naive_r2et_is_the_library_r2et_loss():
    model = build_model("resnet9", torch.device("cpu"), width=4)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 3, 32, 32, generator=gen), torch.tensor([0, 1, 2, 3])
    library = build_objective("r2et", k=100, h=1e-3, weight=0.1)(model, x, y).loss
    naive = naive_r2et(model, x, y, k=100, h=1e-3, weight=0.1)
    torch.testing.assert_close(naive, library, rtol=1e-4, atol=1e-6)


def test_cpu_peak_memory_counts_live_tensor_bytes():
    def step():
        a = torch.empty(2**20)  # 4 MiB
        b = torch.empty(2**21)  # 8 MiB, both alive
        del a
        c = torch.empty(2**19)  # 2 MiB, after a was freed
        return b, c

    assert _cpu_step_peak(step) == pytest.approx(12 * 2**20, rel=0.01)


def test_step_cost_writes_the_documented_json(tmp_path):
    out = tmp_path / "step_cost.json"
    main(["--out", str(out), "--interleaved", "--backbones", "resnet9", "--resnet9-width", "4", "--batch-size", "4",
          "--warmup", "0", "--repeats", "1", "--objectives", "vanilla", "r2et", "naive_r2et", "r2et/pytorch_layers"])
    data = json.loads(out.read_text())
    assert set(data) == {"resnet9"} and set(data["resnet9"]) == {"vanilla", "r2et", "naive_r2et", "r2et/pytorch_layers"}
    for row in data["resnet9"].values():
        assert {"ms_per_step", "ratio_to_vanilla", "peak_mem_mb"} <= set(row)
        assert row["ms_per_step"] > 0 and row["peak_mem_mb"] > 0
    assert data["resnet9"]["vanilla"]["ratio_to_vanilla"] == 1.0
    details = json.loads((tmp_path / "step_cost_details.json").read_text())
    assert details["settings"]["batch_size"] == 4 and "hardware" in details


def test_isolated_layout_pairs_fresh_processes_and_reports_the_spread(tmp_path):
    """Each objective in its own process beside a fresh vanilla one, per invocation: the ratio is
    the objective's median over the vanilla median of the same pair; min/max over invocations."""
    out = tmp_path / "step_cost.json"
    data = main(["--out", str(out), "--backbones", "resnet9", "--resnet9-width", "4", "--batch-size", "4",
                 "--warmup", "0", "--repeats", "1", "--objectives", "vanilla", "r2et_noh", "--invocations", "2",
                 "--threads", "1", "--no-memory"])
    details = json.loads((tmp_path / "step_cost_details.json").read_text())
    pairs = details["isolated"]["pairs"]["resnet9"]["r2et_noh"]
    assert len(pairs) == 2 and all(set(p) == {"vanilla", "r2et_noh"} for p in pairs)
    ratios = [p["r2et_noh"]["ms_per_step"] / p["vanilla"]["ms_per_step"] for p in pairs]
    row = data["resnet9"]["r2et_noh"]
    assert row["invocations"] == 2 and row["ratio_min"] == pytest.approx(min(ratios), abs=1e-3)
    assert row["ratio_max"] == pytest.approx(max(ratios), abs=1e-3)
    assert row["ratio_to_vanilla"] == pytest.approx(sum(ratios) / 2, abs=1e-3)  # the median of two
    # the fastest-step ratio: the objective's fastest step over vanilla's, each over every invocation
    fastest = min(p["r2et_noh"]["ms_min"] for p in pairs) / min(p["vanilla"]["ms_min"] for p in pairs)
    assert row["best_ratio_to_vanilla"] == pytest.approx(fastest, abs=1e-3)
    per_invocation = [p["r2et_noh"]["ms_min"] / p["vanilla"]["ms_min"] for p in pairs]
    assert row["best_ratio_min"] == pytest.approx(min(per_invocation), abs=1e-3)
    assert row["best_ratio_max"] == pytest.approx(max(per_invocation), abs=1e-3)
