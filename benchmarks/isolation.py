"""Run a benchmark's measurement in fresh processes and summarise it over invocations.

A measurement timed in one process next to other work is biased by it (allocator state, caches,
threads: a vanilla step timed beside memory-heavy objectives was 15-20% slower). The benchmarks
therefore run each measured variant in its own process (``python -m <module> --child-out FILE
...``: the module writes its result as JSON to FILE), alternate the variants' order between
invocations, and report the median, min and max over the invocations (:func:`spread`).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["fresh_process", "spread"]


def fresh_process(module: str, argv: Sequence[str], env: dict[str, str] | None = None) -> dict:
    """``python -m module --child-out FILE *argv`` from the project root; the JSON it wrote to FILE."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run([sys.executable, "-m", module, "--child-out", str(out), *argv], check=True, cwd=ROOT,
                       env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max of per-invocation values and the relative spread max / min - 1."""
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "spread": max(values) / min(values) - 1 if min(values) > 0 else float("nan"), "all": values}
