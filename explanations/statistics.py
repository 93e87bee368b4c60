"""Paired statistics for method comparisons: per-image differences, bootstrap intervals, seed agreement.

Two methods evaluated on the SAME test images give per-image values a_i, b_i (e.g. worst-case P@k).
The comparison statistic is the mean paired difference ``d = mean_i (a_i - b_i)``; its 95% interval
is the percentile bootstrap over images (resampling image indices, the same resample for both
methods, so image difficulty cancels). A claim "a > b" holds for one fine-tuning seed when the
interval excludes zero on the positive side, and holds overall only when it does so in every seed
(:func:`seeds_agree`): training noise is measured by the seeds, evaluation noise by the bootstrap.

Everything is vectorised: ``resamples`` draws are one (R, N) index tensor from a seeded generator,
so a given (values, seed) pair always gives the same interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

__all__ = ["PairedDiff", "paired_bootstrap", "rank_correlation", "seeds_agree"]


@dataclass(frozen=True)
class PairedDiff:
    """Mean paired difference a - b over ``n`` images with its bootstrap interval [ci_low, ci_high]."""

    paired_diff: float
    ci_low: float
    ci_high: float
    n: int
    level: float

    @property
    def sign(self) -> int:
        """+1 / -1 when the interval excludes zero above / below, else 0 (not resolved)."""
        return 1 if self.ci_low > 0 else (-1 if self.ci_high < 0 else 0)

    def as_dict(self) -> dict:
        return asdict(self) | {"sign": self.sign}


def paired_bootstrap(
    a: Tensor | Sequence[float], b: Tensor | Sequence[float], resamples: int = 10_000,
    level: float = 0.95, seed: int = 0, chunk: int = 2_000,
) -> PairedDiff:
    """Percentile-bootstrap interval of mean(a - b) for paired per-image values a, b (N,).

    NaN pairs (either side undefined) are dropped before resampling. Raises ValueError on
    mismatched lengths, fewer than 2 valid pairs, or a level outside (0, 1).
    """
    a = torch.as_tensor(a, dtype=torch.float64).flatten()
    b = torch.as_tensor(b, dtype=torch.float64).flatten()
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same images: got {a.numel()} and {b.numel()} values")
    if not 0 < level < 1:
        raise ValueError(f"level={level!r} must be in (0, 1)")
    if resamples < 1:
        raise ValueError(f"resamples={resamples!r} must be a positive integer")
    d = a - b
    d = d[~torch.isnan(d)]
    n = d.numel()
    if n < 2:
        raise ValueError(f"a paired bootstrap needs at least 2 images with both values, got {n}")
    gen = torch.Generator().manual_seed(seed)
    means = torch.empty(resamples, dtype=torch.float64)
    for start in range(0, resamples, chunk):  # bounded memory: chunk x n indices at a time
        r = min(chunk, resamples - start)
        idx = torch.randint(0, n, (r, n), generator=gen)
        means[start : start + r] = d[idx].mean(1)
    alpha = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return PairedDiff(float(d.mean()), float(lo), float(hi), int(n), float(level))


def seeds_agree(diffs: Sequence[PairedDiff]) -> bool:
    """True when every seed's interval excludes zero on the same side (a resolved, stable claim)."""
    signs = {d.sign for d in diffs}
    return len(diffs) > 0 and len(signs) == 1 and 0 not in signs


def _ranks(v: Tensor) -> Tensor:
    """Average ranks (ties share the mean rank), 1-based, float64."""
    order = torch.argsort(v, stable=True)
    ranks = torch.empty_like(v, dtype=torch.float64)
    ranks[order] = torch.arange(1, v.numel() + 1, dtype=torch.float64)
    for value in torch.unique(v):
        tie = v == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation of two per-method sequences (e.g. thickness vs P@k); NaN if undefined."""
    xt = torch.as_tensor(x, dtype=torch.float64).flatten()
    yt = torch.as_tensor(y, dtype=torch.float64).flatten()
    if xt.shape != yt.shape:
        raise ValueError(f"rank correlation needs as many x as y values, got {xt.numel()} and {yt.numel()}")
    ok = ~(torch.isnan(xt) | torch.isnan(yt))
    xt, yt = xt[ok], yt[ok]
    if xt.numel() < 3:
        return float("nan")
    rx, ry = _ranks(xt), _ranks(yt)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.square().sum() * ry.square().sum()).sqrt()
    return float("nan") if denom == 0 else float((rx * ry).sum() / denom)
