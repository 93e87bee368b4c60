"""Per-epoch evaluation callbacks and the run summary."""

from callbacks.summary import FinalSummary

__all__ = ["FinalSummary"]
