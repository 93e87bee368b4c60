"""torchmetrics wrappers of the ranking metrics, so values reduce correctly across DDP ranks.

Each metric keeps a sum and a count of per-sample values (``dist_reduce_fx="sum"``), so the
reduced value is the mean over all samples of all ranks, whatever the shard sizes. NaN values
(an undefined rank correlation) are left out of both. The per-sample math lives in
``explanations.ranking_metrics``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from explanations.ranking_metrics import (
    localization_share,
    precision_at_k,
    prediction_flips,
    rank_correlation,
)


class SampleMean(Metric):
    """Mean of per-sample values over every sample seen on every rank (NaNs ignored)."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, values: Tensor) -> None:
        values = values.detach().flatten().to(torch.float64)
        finite = ~torch.isnan(values)
        self.total += values[finite].sum()
        self.count += finite.sum().to(torch.float64)

    def update(self, values: Tensor) -> None:
        """Add per-sample values (B,)."""
        self._add(values)

    def compute(self) -> Tensor:
        return (self.total / self.count).float() if self.count > 0 else torch.tensor(float("nan"))


class PrecisionAtK(SampleMean):
    """P@k: ``update(s_clean, s_adv)`` with saliency maps (B, n)."""

    def __init__(self, k: int | float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.k = k

    def update(self, s_clean: Tensor, s_adv: Tensor) -> None:
        self._add(precision_at_k(s_clean, s_adv, self.k))


class UnionRankCorrelation(SampleMean):
    """Spearman or Kendall correlation on the union of both top-k sets: ``update(s_clean, s_adv)``."""

    def __init__(self, k: int | float, method: str = "spearman", **kwargs) -> None:
        super().__init__(**kwargs)
        self.k, self.method = k, method

    def update(self, s_clean: Tensor, s_adv: Tensor) -> None:
        self._add(rank_correlation(s_clean, s_adv, self.k, self.method))


class FlipRate(SampleMean):
    """Share of samples whose prediction changed: ``update(logits_clean, logits_adv)`` (or classes),
    or ``update(flipped)`` with a (B,) bool/float tensor."""

    higher_is_better = False

    def update(self, clean: Tensor, attacked: Tensor | None = None) -> None:
        self._add(clean.float() if attacked is None else prediction_flips(clean, attacked))


class TopKThickness(SampleMean):
    """Mean of per-sample thickness values (from ``explanations.ranking_metrics.topk_thickness``)."""


class LocalizationShare(SampleMean):
    """Share of the top-k saliency inside the ground-truth mask: ``update(s, mask)``."""

    def __init__(self, k: int | float, pool: int | None = None, weighted: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.k, self.pool, self.weighted = k, pool, weighted

    def update(self, s: Tensor, mask: Tensor) -> None:
        self._add(localization_share(s, mask, self.k, self.pool, self.weighted))
