"""Paired statistics for method comparisons: per-image differences, bootstrap intervals, seed agreement.

Two methods evaluated on the SAME test images give per-image values a_i, b_i (e.g. worst-case P@k).
The comparison statistic is the mean paired difference ``d = mean_i (a_i - b_i)``; its 95% interval
is the percentile bootstrap over images (resampling image indices, the same resample for both
methods, so image difficulty cancels). A claim "a > b" holds for one fine-tuning seed when the
interval excludes zero on the positive side, and holds overall only when it does so in every seed
(:func:`seeds_agree`): training noise is measured by the seeds, evaluation noise by the bootstrap.

Everything is vectorised: ``resamples`` draws are one (R, N) index tensor from a seeded generator,
so a given (values, seed) pair always gives the same interval.

**Matched accuracy** (:func:`matched_bootstrap`): two methods whose strength is swept (a
:class:`Curve` each: settings in order of strength, per setting and training seed an accuracy
and per-image values on the same N images) are compared at the same accuracy a. Each curve is
the piecewise-linear path through its settings in order of strength; its value at a lies on the
first segment (from the weakest setting) whose two accuracies bracket a, per image:
v(a) = v_j + t (v_{j+1} - v_j), t = (a - acc_j) / (acc_{j+1} - acc_j). The estimate uses each
setting's seed means; its interval is a two-level percentile bootstrap: every replicate redraws
each setting's training seeds (with replacement, independently per setting and method) and the
images (with replacement, one draw shared by both methods: paired; a setting both curves share,
named by the same key, is redrawn once for both), re-interpolates both curves
at a on the replicate's seed-mean accuracies and takes the mean per-image difference. Replicates
in which a curve does not reach a are left out (``defined`` is the share kept). A curve with one
setting (an anchor) is compared at its own accuracy (redrawn with its seeds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["Curve", "MatchedDiff", "PairedDiff", "interpolate_curve", "matched_bootstrap", "paired_bootstrap",
           "rank_correlation", "seeds_agree"]


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


# ------------------------------------------------------------------------------ matched accuracy
@dataclass(frozen=True)
class Curve:
    """One method's sweep: ``accuracy[j][seed]`` and ``values[j][seed]`` (per-image values (N,),
    the same images for every setting and seed) of setting j, settings in order of strength.
    Every setting needs at least one seed, and its two mappings the same seeds."""

    accuracy: Sequence[Mapping[int, float]]
    values: Sequence[Mapping[int, Tensor | Sequence[float]]]
    #: Optional names of the settings: a setting two curves share (the same runs under the same
    #: name, e.g. the SP run that starts every regularizer's curve) has its seeds redrawn once per
    #: bootstrap replicate for both curves.
    keys: Sequence[Any] | None = None

    def __post_init__(self) -> None:
        if not self.accuracy or len(self.accuracy) != len(self.values):
            raise ValueError(f"a curve needs accuracies and values for the same settings, got {len(self.accuracy)} "
                             f"and {len(self.values)}")
        if self.keys is not None and len(self.keys) != len(self.accuracy):
            raise ValueError(f"keys name {len(self.keys)} settings, the curve has {len(self.accuracy)}")
        for j, (acc, val) in enumerate(zip(self.accuracy, self.values)):
            if not acc or set(acc) != set(val):
                raise ValueError(f"setting {j}: seeds {sorted(acc)} of the accuracies and {sorted(val)} of the "
                                 "values must be the same non-empty set")

    @property
    def settings(self) -> int:
        return len(self.accuracy)

    def seeds(self, j: int) -> list[int]:
        return sorted(self.accuracy[j])

    def tensors(self, j: int) -> tuple[Tensor, Tensor]:
        """Setting j's accuracies (S,) and values (S, N) over its seeds, float64."""
        seeds = self.seeds(j)
        acc = torch.tensor([float(self.accuracy[j][s]) for s in seeds], dtype=torch.float64)
        val = torch.stack([torch.as_tensor(self.values[j][s], dtype=torch.float64).flatten() for s in seeds])
        return acc, val

    def seed_curve(self, seed: int) -> "Curve | None":
        """The settings that have ``seed``, with that seed only (None when none has it)."""
        keep = [j for j in range(self.settings) if seed in self.accuracy[j]]
        if not keep:
            return None
        return Curve([{seed: self.accuracy[j][seed]} for j in keep], [{seed: self.values[j][seed]} for j in keep],
                     None if self.keys is None else [self.keys[j] for j in keep])


def interpolate_curve(acc: Tensor, values: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Values of piecewise-linear curves at target accuracies, batched over R replicates.

    acc (P, R): the P settings' accuracies (strength order); values (P, R, N); target (R,).
    Returns (v (R, N), defined (R,) bool, segment (R,) long): v on the first segment j (from the
    weakest setting) with target between acc[j] and acc[j + 1]; where no segment brackets the
    target, defined is False and v is NaN. A single setting (P = 1) is defined only where its
    accuracy equals the target.
    """
    p, r = acc.shape
    if p == 1:
        defined = acc[0] == target
        v = torch.where(defined[:, None], values[0], torch.full_like(values[0], float("nan")))
        return v, defined, torch.zeros(r, dtype=torch.long)
    lo, hi = acc[:-1], acc[1:]
    inside = (torch.minimum(lo, hi) <= target) & (target <= torch.maximum(lo, hi))  # (P-1, R)
    defined = inside.any(0)
    seg = inside.long().argmax(0)  # the first bracketing segment
    a0, a1 = lo.gather(0, seg[None]).squeeze(0), hi.gather(0, seg[None]).squeeze(0)
    span = a1 - a0
    t = torch.where(span != 0, (target - a0) / torch.where(span != 0, span, torch.ones_like(span)), torch.zeros_like(span))
    idx = seg.view(1, r, 1).expand(1, r, values.shape[-1])
    v0, v1 = values[:-1].gather(0, idx).squeeze(0), values[1:].gather(0, idx).squeeze(0)
    v = v0 + t[:, None] * (v1 - v0)
    return torch.where(defined[:, None], v, torch.full_like(v, float("nan"))), defined, seg


def _curve_means(curve: Curve, weights: list[Tensor] | None) -> tuple[Tensor, Tensor]:
    """Per setting, the (weighted) seed means: accuracies (P, R) and values (P, R, N); without
    ``weights`` (the plain seed means) R = 1."""
    accs, vals = [], []
    for j in range(curve.settings):
        acc, val = curve.tensors(j)
        w = torch.full((1, acc.numel()), 1.0 / acc.numel(), dtype=torch.float64) if weights is None else weights[j]
        accs.append(w @ acc)
        vals.append(w @ val)
    return torch.stack(accs), torch.stack(vals)


def _seed_weights(curve: Curve, tag: str, r: int, gen: torch.Generator, drawn: dict) -> list[Tensor]:
    """Per setting, (R, S) weights of a resample of its S seeds with replacement (counts / S);
    a setting named in ``drawn`` (by its key, shared with the other curve) reuses that draw."""
    out = []
    for j in range(curve.settings):
        key = (tag, j) if curve.keys is None else ("key", curve.keys[j])
        s = len(curve.accuracy[j])
        if key not in drawn:
            draws = torch.randint(0, s, (r, s), generator=gen)
            drawn[key] = torch.nn.functional.one_hot(draws, s).sum(1).double() / s
        if drawn[key].shape != (r, s):
            raise ValueError(f"setting {curve.keys[j]!r} is shared by both curves with other seeds")
        out.append(drawn[key])
    return out


@dataclass(frozen=True)
class MatchedDiff:
    """a - b at accuracy ``accuracy`` (see the module docstring): ``paired_diff`` and its interval
    [ci_low, ci_high] over ``defined`` (share of replicates where both curves reach the accuracy),
    each curve's value there (``value_a``, ``value_b``), its bracketing settings (``bracket_a``,
    ``bracket_b``: indices into the curve, one index for an anchor), the per-seed image-bootstrap
    intervals (``per_seed``: seed -> PairedDiff, for the seeds whose own curves reach the
    accuracy) and ``seeds_agree`` (at least two such seeds, all resolved on one side)."""

    accuracy: float
    paired_diff: float
    ci_low: float
    ci_high: float
    n: int
    level: float
    defined: float
    value_a: float
    value_b: float
    bracket_a: tuple[int, ...]
    bracket_b: tuple[int, ...]
    per_seed: dict[int, PairedDiff] = field(default_factory=dict)
    seeds_agree: bool = False

    @property
    def sign(self) -> int:
        return 1 if self.ci_low > 0 else (-1 if self.ci_high < 0 else 0)

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "per_seed"}
        out.update(sign=self.sign, bracket_a=list(self.bracket_a), bracket_b=list(self.bracket_b),
                   per_seed={str(s): d.as_dict() for s, d in self.per_seed.items()})
        return out


def _bracket(curve: Curve, seg: int) -> tuple[int, ...]:
    return (0,) if curve.settings == 1 else (seg, seg + 1)


def matched_bootstrap(
    a: Curve, b: Curve, accuracy: float | None = None, resamples: int = 10_000, level: float = 0.95,
    seed: int = 0, chunk: int = 1_000,
) -> MatchedDiff | None:
    """a - b at matched accuracy (module docstring). ``accuracy`` None: b must have one setting
    (an anchor) and the accuracy is b's own. Returns None when a seed-mean curve does not reach
    the accuracy. Raises ValueError on curves over different numbers of images, a bad level or
    resamples, or ``accuracy`` None with b a sweep."""
    if not 0 < level < 1:
        raise ValueError(f"level={level!r} must be in (0, 1)")
    if resamples < 1:
        raise ValueError(f"resamples={resamples!r} must be a positive integer")
    if accuracy is None and b.settings != 1:
        raise ValueError(f"accuracy=None compares at b's own accuracy, which needs b with one setting, got {b.settings}")
    acc_a, val_a = _curve_means(a, None)
    acc_b, val_b = _curve_means(b, None)
    n = val_a.shape[-1]
    if val_b.shape[-1] != n:
        raise ValueError(f"matched comparisons need the same images: got {n} and {val_b.shape[-1]} values")
    target = acc_b[0] if accuracy is None else torch.tensor([float(accuracy)], dtype=torch.float64)
    va, ok_a, seg_a = interpolate_curve(acc_a, val_a, target)
    vb, ok_b, seg_b = interpolate_curve(acc_b, val_b, target)
    if not (bool(ok_a[0]) and bool(ok_b[0])):
        return None
    d = (va - vb)[0]
    gen = torch.Generator().manual_seed(seed)
    diffs = []
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        drawn: dict = {}
        ra = _curve_means(a, _seed_weights(a, "a", r, gen, drawn))
        wb = _curve_means(b, _seed_weights(b, "b", r, gen, drawn))
        tgt = wb[0][0] if accuracy is None else torch.full((r,), float(accuracy), dtype=torch.float64)
        xa, da, _ = interpolate_curve(*ra, tgt)
        xb, db, _ = interpolate_curve(*wb, tgt)
        idx = torch.randint(0, n, (r, n), generator=gen)
        rep = (xa - xb).gather(1, idx).mean(1)
        diffs.append(rep[da & db])
    reps = torch.cat(diffs)
    defined = reps.numel() / resamples
    alpha = (1 - level) / 2
    lo, hi = (torch.quantile(reps, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
              if reps.numel() else (float("nan"), float("nan")))
    per_seed: dict[int, PairedDiff] = {}
    seeds = sorted(set().union(*(set(m) for m in a.accuracy)) & set().union(*(set(m) for m in b.accuracy)))
    for s in seeds:
        ca, cb = a.seed_curve(s), b.seed_curve(s)
        sa, sb = _curve_means(ca, None), _curve_means(cb, None)
        tgt = sb[0][0] if accuracy is None else target
        xa, oka, _ = interpolate_curve(*sa, tgt)
        xb, okb, _ = interpolate_curve(*sb, tgt)
        if bool(oka[0]) and bool(okb[0]) and n >= 2:
            per_seed[s] = paired_bootstrap(xa[0], xb[0], resamples=resamples, level=level, seed=seed + s)
    return MatchedDiff(
        accuracy=float(target[0]), paired_diff=float(d.mean()), ci_low=float(lo), ci_high=float(hi), n=int(n),
        level=float(level), defined=float(defined), value_a=float(va[0].mean()), value_b=float(vb[0].mean()),
        bracket_a=_bracket(a, int(seg_a[0])), bracket_b=_bracket(b, int(seg_b[0])), per_seed=per_seed,
        seeds_agree=len(per_seed) >= 2 and seeds_agree(list(per_seed.values())),
    )
