"""Ranking metrics of explanations (DESIGN §5), per sample and batched.

Every function returns one value per sample (B,); averaging (and reducing across processes) is
the caller's job (the evaluation protocol keeps float64 sums and counts, ``explanations.evaluation``).

- :func:`precision_at_k`: |T_k(x) ∩ T_k(x')| / k.
- :func:`rank_correlation`: Spearman (average ranks for ties) or Kendall tau-b between s(x) and
  s(x') restricted to the union T_k(x) ∪ T_k(x') (k to 2k features). NaN where undefined
  (constant values on the union).
- :func:`prediction_flips`: 1.0 where the predicted class changed.
- :func:`kept_pair_fraction`: the fraction of pairs (i in T, j in O; O = not T by default) with
  i ranked above j in a saliency map, counted with one sort (O(n log n)), never with an n x n
  matrix. Ties break by index, as in :func:`explanations.saliency.ranking`.
- :func:`topk_thickness` / :func:`thickness_estimates`: Monte-Carlo top-k thickness: x' uniform
  in the l_inf ball of radius eps (clipped to [0, 1]), the kept-pair fraction w.r.t. the clean
  top-k along the segment x + t (x' - x), integrated over t in [0, 1] by the trapezoid rule on
  t = 0, 1/m, ..., 1, averaged over draws. Pair sets: ``all`` (top-k vs the rest) and
  ``boundary`` (top-k vs the next k, the pairs that decide P@k). 1 means the ranking never
  changes in the ball.

Every metric is computed and returned in at least float32 (bf16 / fp16 saliency is upcast).
- :func:`localization_share`: the share of the top-k saliency features that lie inside a
  ground-truth mask (synthetic data); with pooling a feature counts by the fraction of its pixels
  inside the mask; ``weighted=True`` weighs features by their saliency instead of counting them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explanations.pgd import uniform_in_ball
from explanations.explainers import eval_mode, explain_unchecked
from explanations.saliency import num_features, ranking, resolve_k, topk_mask
from explanations.streams import THICKNESS_STREAM
from explanations.validation import check_eps, check_images, check_pool, check_positive_int

CORRELATIONS: tuple[str, ...] = ("spearman", "kendall")

# Pairwise work per chunk of the batch (elements of a (chunk, L, L) tensor).
_PAIR_BUDGET = 1 << 24


def metric_dtype(t: Tensor) -> torch.dtype:
    """Metrics are computed and returned in at least float32 (bf16 / fp16 inputs are upcast)."""
    return torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32


def _check_pair(s_clean: Tensor, s_adv: Tensor) -> None:
    if s_clean.dim() != 2 or s_clean.shape != s_adv.shape:
        raise ValueError(
            f"expected two saliency batches of the same shape (B, n), got {tuple(s_clean.shape)} "
            f"and {tuple(s_adv.shape)}"
        )


def precision_at_k(s_clean: Tensor, s_adv: Tensor, k: int | float) -> Tensor:
    """P@k per sample (B,): the share of the clean top-k features still in the attacked top-k."""
    _check_pair(s_clean, s_adv)
    k = resolve_k(k, s_clean.shape[1])
    both = topk_mask(s_clean, k) & topk_mask(s_adv, k)
    return both.sum(1).to(metric_dtype(s_clean)) / k


def union_values(s_clean: Tensor, s_adv: Tensor, k: int | float) -> tuple[Tensor, Tensor, Tensor]:
    """The two maps on the union of both top-k sets, padded: a, b (B, L), valid (B, L) bool.

    L = min(2k, n); the first ``|union|`` columns of each row hold the union's features (in
    feature-index order), the rest are padding.
    """
    _check_pair(s_clean, s_adv)
    n = s_clean.shape[1]
    k = resolve_k(k, n)
    union = topk_mask(s_clean, k) | topk_mask(s_adv, k)
    width = min(2 * k, n)
    idx = torch.sort(union.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :width]
    valid = torch.arange(width, device=union.device).unsqueeze(0) < union.sum(1, keepdim=True)
    return s_clean.gather(1, idx), s_adv.gather(1, idx), valid


def _average_ranks(v: Tensor, valid: Tensor) -> Tensor:
    """1-based ranks among the valid entries of each row, ties get their average rank."""
    vi, vj = v.unsqueeze(2), v.unsqueeze(1)
    w = valid.unsqueeze(1).to(v.dtype)
    less = ((vj < vi).to(v.dtype) * w).sum(2)
    equal = ((vj == vi).to(v.dtype) * w).sum(2)
    return less + 0.5 * equal + 0.5


def _pearson(a: Tensor, b: Tensor, valid: Tensor) -> Tensor:
    w = valid.to(a.dtype)
    cnt = w.sum(1, keepdim=True)
    a = (a - (a * w).sum(1, keepdim=True) / cnt) * w
    b = (b - (b * w).sum(1, keepdim=True) / cnt) * w
    den = (a.pow(2).sum(1) * b.pow(2).sum(1)).sqrt()
    num = (a * b).sum(1)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(a.dtype).tiny), torch.full_like(num, float("nan")))


def _spearman(a: Tensor, b: Tensor, valid: Tensor) -> Tensor:
    return _pearson(_average_ranks(a, valid), _average_ranks(b, valid), valid)


def _kendall(a: Tensor, b: Tensor, valid: Tensor) -> Tensor:
    """Kendall tau-b: (C - D) / sqrt((n0 - n1)(n0 - n2)) over the valid pairs."""
    sa = torch.sign(a.unsqueeze(2) - a.unsqueeze(1))
    sb = torch.sign(b.unsqueeze(2) - b.unsqueeze(1))
    length = a.shape[1]
    pair = valid.unsqueeze(2) & valid.unsqueeze(1) & ~torch.eye(length, dtype=torch.bool, device=a.device)
    w = pair.to(a.dtype)
    n0 = w.sum((1, 2))
    concord = (sa * sb * w).sum((1, 2))
    untied_a = n0 - ((sa == 0).to(a.dtype) * w).sum((1, 2))
    untied_b = n0 - ((sb == 0).to(a.dtype) * w).sum((1, 2))
    den = (untied_a * untied_b).sqrt()
    return torch.where(den > 0, concord / den.clamp_min(torch.finfo(a.dtype).tiny), torch.full_like(den, float("nan")))


def rank_correlation(s_clean: Tensor, s_adv: Tensor, k: int | float, method: str = "spearman") -> Tensor:
    """Spearman or Kendall (tau-b) correlation per sample (B,) on the union of both top-k sets."""
    if method not in CORRELATIONS:
        raise ValueError(f"method={method!r} is not a known rank correlation; valid: {CORRELATIONS}")
    a, b, valid = union_values(s_clean.double(), s_adv.double(), k)
    fn = _spearman if method == "spearman" else _kendall
    chunk = max(1, _PAIR_BUDGET // max(1, a.shape[1] ** 2))
    out = torch.cat([fn(ca, cb, cv) for ca, cb, cv in zip(a.split(chunk), b.split(chunk), valid.split(chunk))])
    return out.to(metric_dtype(s_clean))


def prediction_flips(logits_clean: Tensor, logits_adv: Tensor) -> Tensor:
    """1.0 where the predicted class changed, else 0.0: (B, K), (B, K) -> (B,).

    Either argument may also be a (B,) tensor of predicted classes.
    """
    pc = logits_clean if logits_clean.dim() == 1 else logits_clean.argmax(1)
    pa = logits_adv if logits_adv.dim() == 1 else logits_adv.argmax(1)
    return (pc != pa).float()


def kept_pair_fraction(s: Tensor, top: Tensor, others: Tensor | None = None) -> Tensor:
    """Fraction of pairs (i in top, j in others) with i ranked above j in s: (B, n) masks -> (B,).

    ``others`` defaults to every feature not in ``top`` (all pairs); the boundary variant passes
    the next-k block. One stable sort per row: walking the ranking, each top feature keeps its
    pairs with the ``others`` ranked after it. 1.0 when every top feature outranks every other;
    rows with no pairs give 1.0. Computed in float64, returned in at least float32.
    """
    if s.shape != top.shape:
        raise ValueError(f"saliency {tuple(s.shape)} and top mask {tuple(top.shape)} differ in shape")
    others = ~top if others is None else others & ~top
    order = ranking(s)
    top_sorted = top.gather(1, order)
    other = others.gather(1, order).to(torch.int64)
    others_after = other.sum(1, keepdim=True) - other.cumsum(1)
    kept = (others_after * top_sorted).sum(1)
    pairs = top.sum(1) * others.sum(1)
    frac = kept.to(torch.float64) / pairs.clamp_min(1).to(torch.float64)
    return torch.where(pairs > 0, frac, torch.ones_like(frac)).to(metric_dtype(s))


def next_block_mask(s: Tensor, k: int) -> Tensor:
    """Boolean membership of the k features ranked right after the top-k (ranks k+1..2k): (B, n)."""
    mask = torch.zeros_like(s, dtype=torch.bool)
    return mask.scatter_(1, ranking(s)[:, k : 2 * k], True)


#: Pair sets of the thickness (the ``pairs`` argument): top-k vs the rest, top-k vs the next k.
THICKNESS_PAIR_SETS: tuple[str, ...] = ("all", "boundary")


def thickness_estimates(
    model: nn.Module,
    x: Tensor,
    labels: Tensor | None,
    k: int | float,
    eps: float = 8 / 255,
    num_samples: int = 8,
    num_points: int = 4,
    method: str = "gradient",
    target: str = "loss",
    pool: int | None = None,
    ids: Tensor | None = None,
    seed: int | None = 0,
    method_kwargs: dict[str, Any] | None = None,
    s_clean: Tensor | None = None,
    classes: Tensor | None = None,
    pairs: tuple[str, ...] = THICKNESS_PAIR_SETS,
) -> dict[str, Tensor]:
    """Top-k thickness per sample (B,) for each pair set in ``pairs``, from one set of passes.

    For end points x'_d = clip(x + U(-eps, eps)) (d = 1..S, counter-based on (seed, ids)) and
    f_d(t) = kept-pair fraction of s(x + t (x'_d - x)) against the clean top-k, the estimate is
    the trapezoid rule on t_j = j / m including t = 0, averaged over draws:
    ``mean_d (1/m) [f_d(0)/2 + f_d(t_1) + ... + f_d(t_{m-1}) + f_d(1)/2]`` with f_d(0) = 1 (the
    clean map keeps every pair). Pair sets: ``all`` = (top-k, every other feature), k(n-k)
    pairs; ``boundary`` = (top-k, next k by the clean ranking), the k^2 pairs R2ET's gap term and
    ERAttack work on. Images x (B, C, H, W) float in [0, 1] and eps in (0, 1] are checked once;
    the model runs in eval mode (restored); the m points of one draw are one
    batch of m * B images; the draws loop. ``s_clean`` (and ``classes`` for ``target='logit'``)
    reuse a clean pass already made; it must come from the same method and settings.
    """
    unknown = [p for p in pairs if p not in THICKNESS_PAIR_SETS]
    if unknown or not pairs:
        raise ValueError(f"pairs={pairs!r}: each must be one of {THICKNESS_PAIR_SETS}")
    check_images(x)
    check_eps(eps)
    check_positive_int(num_samples, "num_samples")
    check_positive_int(num_points, "num_points")
    check_pool(pool)
    method_kwargs = dict(method_kwargs or {})
    b = x.shape[0]
    x = x.detach()
    kk = resolve_k(k, num_features(*x.shape[-2:], pool))
    with eval_mode(model):
        if s_clean is None or (target == "logit" and classes is None):
            clean = explain_unchecked(model, x, labels, method, target, pool, **method_kwargs)
            s0 = clean.saliency.detach() if s_clean is None else s_clean.detach()
            classes = clean.logits.detach().argmax(1) if classes is None else classes
        else:
            s0 = s_clean.detach()
        classes_rep = None if classes is None else classes.repeat(num_points)
        top = topk_mask(s0, kk)
        masks = {"all": None, "boundary": next_block_mask(s0, kk)}
        others_rep = {p: None if masks[p] is None else masks[p].repeat(num_points, 1) for p in pairs}
        # trapezoid weights of t_1..t_m (t_0 = 0 adds 1/2 * f(0) = 1/2)
        weights = torch.ones(num_points, dtype=torch.float64, device=x.device)
        weights[-1] = 0.5
        totals = {p: torch.zeros(b, dtype=torch.float64, device=x.device) for p in pairs}
        ts = torch.arange(1, num_points + 1, dtype=x.dtype, device=x.device).div_(num_points)
        top_rep = top.repeat(num_points, 1)
        labels_rep = None if labels is None else labels.repeat(num_points)
        for draw in range(num_samples):
            end = uniform_in_ball(x, eps, ids, seed, stream=THICKNESS_STREAM + draw)
            points = (x.unsqueeze(0) + ts.view(-1, 1, 1, 1, 1) * (end - x).unsqueeze(0)).reshape(-1, *x.shape[1:])
            s = explain_unchecked(
                model, points, labels_rep, method, target, pool, classes=classes_rep,
                **method_kwargs,
            ).saliency.detach()
            for p in pairs:
                f = kept_pair_fraction(s, top_rep, others_rep[p]).view(num_points, b).double()
                totals[p] += 0.5 + (weights.view(-1, 1) * f).sum(0)
    out_dtype = metric_dtype(x)
    return {p: (totals[p] / (num_samples * num_points)).to(out_dtype) for p in pairs}


def topk_thickness(
    model: nn.Module,
    x: Tensor,
    labels: Tensor | None,
    k: int | float,
    eps: float = 8 / 255,
    num_samples: int = 8,
    num_points: int = 4,
    method: str = "gradient",
    target: str = "loss",
    pool: int | None = None,
    ids: Tensor | None = None,
    seed: int | None = 0,
    method_kwargs: dict[str, Any] | None = None,
    s_clean: Tensor | None = None,
    classes: Tensor | None = None,
    pairs: str = "all",
) -> Tensor:
    """Top-k thickness per sample (B,) on one pair set (``all`` or ``boundary``); see
    :func:`thickness_estimates` (trapezoid rule including t = 0)."""
    if pairs not in THICKNESS_PAIR_SETS:
        raise ValueError(f"pairs={pairs!r} is not known; valid: {THICKNESS_PAIR_SETS}")
    return thickness_estimates(
        model, x, labels, k, eps, num_samples, num_points, method, target, pool, ids, seed,
        method_kwargs, s_clean, classes, (pairs,),
    )[pairs]


def localization_share(
    s: Tensor, mask: Tensor, k: int | float, pool: int | None = None, weighted: bool = False
) -> Tensor:
    """Share of the top-k saliency inside the ground-truth mask per sample (B,).

    s: (B, n) saliency over the (pooled) features; mask: (B, H, W) (bool or [0, 1]) at pixel
    resolution. Unweighted: |T_k ∩ M| / k (fractional membership when pooled). Weighted: the
    saliency mass of T_k inside M over the saliency mass of T_k.
    """
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() != 3:
        raise ValueError(f"expected masks of shape (B, H, W), got {tuple(mask.shape)}")
    m = mask.to(s.dtype)
    if pool is not None and pool > 1:
        m = F.avg_pool2d(m.unsqueeze(1), pool).squeeze(1)
    m = m.flatten(1)
    if m.shape != s.shape:
        raise ValueError(f"mask has {m.shape[1]} features but the saliency has {s.shape[1]}")
    kk = resolve_k(k, s.shape[1])
    top = topk_mask(s, kk).to(s.dtype)
    if not weighted:
        return (m * top).sum(1) / kk
    mass = (s * top).sum(1)
    return torch.where(mass > 0, (s * top * m).sum(1) / mass.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(mass))
