"""FinalSummary: the run's final numbers in sections a person reads in ten seconds.

Sections: What was measured (model, weights and their hash, data, split; from the evaluation
callback's report), Accuracy, Regularizer terms (the loss and what each weighted term adds),
Robustness, PSE, then where the logs, the W&B run and the checkpoints (or, for validate/test, the
evaluated checkpoint and the report) are. A NaN is explained on its line
(what had no sample to average), a share is printed beside the count it was computed from.
"""

from __future__ import annotations

import math
import os

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

DEFAULT_PREFIXES = ("train/", "val/", "test/", "robustness/", "pse/")

#: (title, predicate on the metric name) in print order; a metric goes to the first that matches.
SECTIONS: tuple[tuple[str, object], ...] = (
    ("Accuracy", lambda n: n.endswith("/acc")),
    ("Regularizer terms", lambda n: n.startswith(("val/", "test/", "train/"))),
    ("Robustness", lambda n: n.startswith("robustness/")),
    ("PSE", lambda n: n.startswith("pse/")),
)

_NAN_REASONS = (
    ("pse/", "no sample to average: no attack succeeded or none was analysed (see pse/num_success)"),
    ("robustness/", "no sample to average: no correctly classified sample, or the metric needs a "
                    "setting that was off"),
    ("", "no batch contributed a finite value"),
)


def explain_nan(name: str) -> str:
    """Why ``name`` can be NaN (one line)."""
    return next(reason for prefix, reason in _NAN_REASONS if name.startswith(prefix))


def _share_count(name: str, values: dict[str, float]) -> str:
    """``"of N counted"`` for a PSE share, from the count it was computed over."""
    if not name.startswith("pse/") or "frac_" not in name.rsplit("/", 1)[-1]:
        return ""
    counted = values.get("pse/num_counted")
    if counted is None or math.isnan(counted):
        return ""
    note = "; fewer than 5: the share is noise" if counted < 5 else ""
    return f"  (over {int(counted)} counted sample{'s' if counted != 1 else ''}{note})"


def _format_value(name: str, value: float) -> str:
    if math.isnan(value):
        return f"nan  ({explain_nan(name)})"
    if name.rsplit("/", 1)[-1].startswith("num_") and float(value).is_integer():
        return f"{int(value)}"
    return f"{value:.4f}"


class FinalSummary(L.Callback):
    """At the end of fit/validate/test, print the final metrics in sections, and where things are.

    Args:
        prefixes: metric name prefixes to include (default: train/ (epoch means), val/, test/,
            robustness/, pse/).

    Examples:
        ``trainer.callbacks: [{class_path: callbacks.FinalSummary}]``
    """

    def __init__(self, prefixes: list[str] | None = None) -> None:
        self.prefixes = tuple(prefixes or DEFAULT_PREFIXES)

    def final_metrics(self, trainer: L.Trainer) -> dict[str, float]:
        """The final metrics as plain floats, sorted by name."""
        metrics = trainer.callback_metrics
        return {
            name: float(value)
            for name, value in sorted(metrics.items())
            if name.startswith(self.prefixes) and value.numel() == 1 and not name.endswith("_step")
            and not (name.endswith("_epoch") and name[: -len("_epoch")] in metrics)
        }

    def sections(self, values: dict[str, float]) -> list[tuple[str, list[tuple[str, str]]]]:
        """``[(title, [(name, text), ...]), ...]``: the metrics grouped as in :data:`SECTIONS`."""
        grouped: dict[str, list[tuple[str, str]]] = {title: [] for title, _ in SECTIONS}
        other: list[tuple[str, str]] = []
        for name, value in values.items():
            text = _format_value(name, value) + _share_count(name, values)
            title = next((t for t, match in SECTIONS if match(name)), None)
            (grouped[title] if title else other).append((name, text))
        out = [(title, rows) for title, rows in grouped.items() if rows]
        return out + ([("Other", other)] if other else [])

    @staticmethod
    def locations(trainer: L.Trainer) -> list[tuple[str, str]]:
        """(what, where) for the log folders, the W&B run and the checkpoints of this run."""
        rows: list[tuple[str, str]] = []
        for logger in trainer.loggers:
            kind = type(logger).__name__
            run = getattr(logger, "_experiment", None)
            if run is not None and hasattr(run, "id") and hasattr(run, "dir"):
                mode = getattr(getattr(run, "settings", None), "mode", None)
                folder = os.path.dirname(str(run.dir)) if run.dir else ""
                if mode == "disabled" or not (folder and os.path.isdir(folder)):
                    rows.append(("W&B run", "none (W&B disabled: WANDB_MODE=disabled)" if mode == "disabled"
                                 else f"{run.id}: no local run folder"))
                    continue
                url = getattr(run, "url", None)
                rows.append(("W&B run", f"{run.id}  {url or ''}  {folder}".strip()))
                continue
            log_dir = getattr(logger, "log_dir", None)
            if log_dir:
                rows.append((f"{kind} logs", str(log_dir)))
        if trainer.state.fn in ("validate", "test"):  # nothing is written: say what was evaluated
            ckpt = getattr(trainer, "ckpt_path", None)
            rows.append(("evaluated checkpoint", str(ckpt) if ckpt else "none (see What was measured)"))
            for callback in trainer.callbacks:
                for path in getattr(callback, "last_report_paths", [])[:1]:
                    rows.append(("robustness report", str(path.parent)))
            return rows
        for callback in trainer.checkpoint_callbacks:
            for label, path in (("best checkpoint", getattr(callback, "best_model_path", "")),
                                ("last checkpoint", getattr(callback, "last_model_path", ""))):
                if path:
                    rows.append((label, str(path)))
            dirpath = getattr(callback, "dirpath", None)
            if not any(r[0].endswith("checkpoint") for r in rows) and dirpath and os.path.isdir(dirpath):
                rows.append(("checkpoints", str(dirpath)))  # a folder that exists (validate writes none)
        return rows

    @staticmethod
    def measured(trainer: L.Trainer) -> list[str]:
        """'What was measured' lines of the evaluation callbacks' last report (model, weights, data, split)."""
        from explanations.report import measured_lines

        for callback in trainer.callbacks:
            report = getattr(callback, "last_report", None)
            if isinstance(report, dict) and report.get("measured"):
                return [line.removeprefix("- ") for line in measured_lines(report["measured"])]
        return []

    def render(self, trainer: L.Trainer, stage: str) -> str:
        """The summary text (what is printed)."""
        values = self.final_metrics(trainer)
        blocks = self.sections(values)
        places = self.locations(trainer)
        measured = self.measured(trainer)
        if not blocks and not places:
            return ""
        names = [n for _, rows in blocks for n, _ in rows] + [w for w, _ in places]
        width = max(len(n) for n in names)
        ckpt = getattr(trainer, "ckpt_path", None) if stage in ("validate", "test") else None
        if ckpt:  # the trainer's counters are 0 here: say where the evaluated weights were saved
            from lightning_modules.checkpoints import checkpoint_progress

            saved = checkpoint_progress(ckpt)
            when = f"of the checkpoint saved at epoch {saved.get('epoch', '?')}, step {saved.get('global_step', '?')}"
        else:
            when = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
        lines = [f"Final summary ({stage} {when})" if ckpt else f"Final summary ({stage}, {when})"]
        if measured:
            lines += ["", "-- What was measured"] + [f"  {line}" for line in measured]
        for title, rows in blocks:
            note = ("  (loss = ce + reg; reg = sum of weighted_<term> = lambda_<term> * <term>)"
                    if title == "Regularizer terms" and any(n.endswith("/reg") for n, _ in rows) else "")
            lines += ["", f"-- {title}{note}"] + [f"  {n:<{width}}  {t}" for n, t in rows]
        if places:
            lines += ["", "-- Where"] + [f"  {w:<{width}}  {p}" for w, p in places]
        bar = "=" * min(100, max(len(line) for line in lines))
        return "\n".join([bar, *lines, bar])

    @rank_zero_only
    def _print(self, trainer: L.Trainer, stage: str) -> None:
        text = self.render(trainer, stage)
        if text:
            print("\n" + text)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print(trainer, "fit")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._print(trainer, "validate")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print(trainer, "test")
