"""Regularizer terms of the training objectives (DESIGN §4), per sample, batched.

Notation: g(x) = d l / d x (B x C x H x W), s(x) = sum_c |g| flattened to (B, n), pi(x) the
descending order of s(x) taken from the current model and detached.

- gap term R_G (pair sets):
    ``boundary``: -( sum_{r<=k} s_pi(r) - sum_{k<r<=2k} s_pi(r) )
    ``all``:      -( mean_{r<=k} s_pi(r) - mean_{r>k} s_pi(r) )
    ``minmax``:   -( sum_{k-m<r<=k} s_pi(r) - sum_{k<r<=k+m} s_pi(r) )   (R2ET-mm)
  When fewer features than asked follow the top-k block (2k > n, or k = n) the missing part
  counts as zero, so the term stays finite.
- curvature term R_H = || g(x + h u) - g(x) || / h with u = sign(g(x)) / sqrt(d), detached.
- gradient norm ||g(x)||^2.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from explanations.saliency import input_gradient, ranking, unit_sign_direction

PAIR_SETS: tuple[str, ...] = ("boundary", "all", "minmax")


def check_pair_set(pair_set: str) -> None:
    """Raise a clear error for an unknown pair set."""
    if pair_set not in PAIR_SETS:
        raise ValueError(f"pair_set={pair_set!r} is not known; valid: {PAIR_SETS}")


def default_minmax_m(k: int) -> int:
    """m for the ``minmax`` pair set when not given: a quarter of k, at least 1."""
    return max(1, k // 4)


def block_gap(s: Tensor, order: Tensor, k: int, pair_set: str = "boundary", m: int | None = None) -> Tensor:
    """Top-k block minus the block it competes with, per sample (B,), under a given order (B, n).

    With ranked = s gathered by ``order``: ``boundary`` sum_{r<=k} - sum_{k<r<=2k}; ``all``
    mean_{r<=k} - mean_{r>k}; ``minmax`` sum_{k-m<r<=k} - sum_{k<r<=k+m}. Missing features after
    the top-k block count as zero. The one gap implementation: R_G (:func:`gap_term`, order from
    s itself) and ERAttack's objective (order frozen at the clean image) both call it.
    """
    check_pair_set(pair_set)
    n = s.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is out of range for {n} features: valid is 1..{n}")
    ranked = s.gather(1, order)
    if pair_set == "boundary":
        return ranked[:, :k].sum(1) - ranked[:, k : 2 * k].sum(1)
    if pair_set == "all":
        top = ranked[:, :k].mean(1)
        return top - (ranked[:, k:].mean(1) if k < n else torch.zeros_like(top))
    m = default_minmax_m(k) if m is None else m
    if not 1 <= m <= k:
        raise ValueError(f"minmax m={m} must be in 1..k={k}")
    return ranked[:, k - m : k].sum(1) - ranked[:, k : k + m].sum(1)


def gap_term(s: Tensor, k: int, pair_set: str = "boundary", m: int | None = None) -> Tensor:
    """R_G per sample (B,) for saliency s (B, n): -block_gap under s's own detached order."""
    return -block_gap(s, ranking(s.detach()), k, pair_set, m)


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Extra forward passes inside a training step must not move BatchNorm running statistics."""
    saved = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            saved.append((module, module.momentum))
            module.momentum = 0.0
    try:
        yield
    finally:
        for module, momentum in saved:
            module.momentum = momentum


def safe_norm(v: Tensor) -> Tensor:
    """Euclidean norm over all but the batch dim, with a zero (not NaN) gradient at v = 0."""
    sq = v.flatten(1).pow(2).sum(1)
    positive = sq > 0
    return torch.where(positive, sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt(), torch.zeros_like(sq))


def curvature_term(
    model: nn.Module,
    x: Tensor,
    labels: Tensor | None,
    grad: Tensor,
    h: float = 1e-3,
    target: str = "loss",
) -> Tensor:
    """R_H per sample (B,): one extra graph-carrying input gradient at x + h u."""
    if not h > 0:
        raise ValueError(f"h={h!r} must be a positive step for the finite difference")
    x_shift = x.detach() + h * unit_sign_direction(grad)
    with frozen_batchnorm_stats(model):
        shifted = input_gradient(model, x_shift, labels, target, create_graph=True).grad
    return safe_norm(shifted - grad) / h


def grad_norm_term(grad: Tensor) -> Tensor:
    """||g(x)||^2 per sample (B,)."""
    return grad.flatten(1).pow(2).sum(1)


def adaptive_weight(base: float, ce: Tensor, term: Tensor, eps: float = 1e-12) -> Tensor:
    """lambda = w * (CE + 1) / |R|, both detached (the reference code's balancing).

    A term that is numerically zero (|R| <= eps: zero saliency, bf16 underflow, a locally linear
    model) gets lambda = 0 rather than ~1e12: its value adds nothing, and its gradient must not be
    amplified by the division.
    """
    magnitude = term.detach().abs()
    weight = base * (ce.detach() + 1.0) / magnitude.clamp_min(eps)
    return torch.where(magnitude > eps, weight, torch.zeros_like(weight))
