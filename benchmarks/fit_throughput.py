"""FitThroughput: the images/s of a ``train.py fit`` run (``python -m benchmarks.step_cost --fit``).

A Lightning callback: the training steps after the first ``skip`` are timed (start-up, the first
batches' allocations and the data loader's start are left out) and ``{"images_per_s", "steps",
"seconds"}`` is written as JSON to ``out`` at the end of the first training epoch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L


class FitThroughput(L.Callback):
    """Args: out: the JSON file to write. skip: first training steps not timed."""

    def __init__(self, out: str, skip: int = 3) -> None:
        if skip < 0:
            raise ValueError(f"skip={skip!r} must be >= 0")
        self.out, self.skip = Path(out), int(skip)
        self.start: float | None = None
        self.images = self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.skip:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            self.images += int(batch[0].shape[0])
            self.steps += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.start is None:
            raise RuntimeError(f"FitThroughput: the epoch had no more than skip={self.skip} steps; nothing was timed")
        seconds = time.perf_counter() - self.start
        self.out.write_text(json.dumps({"images_per_s": self.images / seconds, "steps": self.steps, "seconds": seconds}))
