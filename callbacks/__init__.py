"""Per-epoch evaluation callbacks and the run summary."""

from callbacks.base import EvaluationCallback
from callbacks.pse_analysis import PSEAnalysis
from callbacks.ranking_robustness import RankingRobustness
from callbacks.summary import FinalSummary

__all__ = ["EvaluationCallback", "FinalSummary", "PSEAnalysis", "RankingRobustness"]
