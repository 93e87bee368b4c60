"""FinalSummary: print the run's final numbers (accuracy, regularizer terms, robustness) once."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

DEFAULT_PREFIXES = ("val/", "test/", "robustness/", "pse/")


class FinalSummary(L.Callback):
    """At the end of fit/validate/test, print every logged metric under the given prefixes."""

    def __init__(self, prefixes: list[str] | None = None) -> None:
        self.prefixes = tuple(prefixes or DEFAULT_PREFIXES)

    def summary(self, trainer: L.Trainer) -> dict[str, float]:
        """The final metrics as plain floats, sorted by name."""
        return {
            name: float(value)
            for name, value in sorted(trainer.callback_metrics.items())
            if name.startswith(self.prefixes) and value.numel() == 1
        }

    @rank_zero_only
    def _print(self, trainer: L.Trainer, stage: str) -> None:
        values = self.summary(trainer)
        if not values:
            return
        width = max(len(n) for n in values)
        lines = [f"{n:<{width}}  {v:.4f}" for n, v in values.items()]
        bar = "=" * max(len(line) for line in lines)
        print(f"\n{bar}\nFinal summary ({stage}, epoch {trainer.current_epoch})\n{bar}", *lines, bar, sep="\n")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print(trainer, "fit")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._print(trainer, "validate")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print(trainer, "test")
