"""Training throughput of a ``train.py fit`` run, for comparing 1 process with all GPUs (DDP).

Add the callback to a run's config::

    trainer:
      callbacks:
        - class_path: benchmarks.ddp_throughput.StepTimer
          init_args: {out: results/ddp_4.json, warmup: 3}

After ``warmup`` steps, the wall time of every training step (``on_train_batch_start`` to ``on_train_batch_end``, device
synchronized; under DDP it includes the gradient all-reduce) is recorded on rank 0;
``images_per_s = global batch / median step time`` with global batch = per-process batch x world
size. The JSON holds ``world_size``, ``global_batch``, ``steps_timed``, ``median_step_s`` and
``images_per_s``; scripts/device_check.sh reports ``images_per_s(all GPUs) / images_per_s(1)``
(ideal: the number of GPUs).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch


class StepTimer(L.Callback):
    """Median training-step time and images/s of the run (rank 0 writes ``out``)."""

    def __init__(self, out: str, warmup: int = 3) -> None:
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.out, self.warmup = Path(out), int(warmup)
        self.times: list[float] = []
        self.batch = 0
        self._start = 0.0

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()
        self.batch = int(batch[0].shape[0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._start)

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        if not self.times:
            raise RuntimeError(f"StepTimer: no step after the {self.warmup} warm-up steps was timed; "
                               "train for more steps (trainer.max_steps) or lower warmup")
        median = statistics.median(self.times)
        global_batch = self.batch * trainer.world_size
        result = {"world_size": trainer.world_size, "global_batch": global_batch, "steps_timed": len(self.times),
                  "median_step_s": median, "images_per_s": global_batch / median,
                  "device": pl_module.device.type}
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(result, indent=2) + "\n")
