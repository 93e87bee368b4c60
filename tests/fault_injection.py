"""Callbacks that inject faults into a training run (used by tests through the CLI config).

- :class:`PauseAtStep` writes a marker file and sleeps when ``global_step`` reaches ``step`` (at
  the start of the next batch, after that step's checkpoint was saved), so that a test can kill
  the process with SIGKILL at a known point mid-epoch.
- :class:`RandomJitter` adds uniform noise from the *global* torch RNG to every training batch, a
  stand-in for random augmentation, so that exact resume also needs the RNG state restored.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch


class PauseAtStep(L.Callback):
    def __init__(self, step: int, marker: str, seconds: float = 600.0) -> None:
        self.step, self.marker, self.seconds = int(step), marker, float(seconds)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(f"{trainer.current_epoch} {batch_idx}\n")
            time.sleep(self.seconds)


class RandomJitter(L.Callback):
    def __init__(self, amplitude: float = 0.02) -> None:
        self.amplitude = float(amplitude)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x = batch[0]
        if x.numel():
            x.add_(self.amplitude * torch.rand_like(x)).clamp_(0.0, 1.0)
