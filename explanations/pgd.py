"""The one set of projected-gradient helpers: projection onto an l_inf / l2 ball and the [0, 1]
box, and random starts inside the ball (DESIGN §5, §6).

Two forms, used by the two attack families:

- point form (ranking attacks): :func:`project` maps a candidate x' to
  ``clip_[0,1](clip_[x0 - eps, x0 + eps](x'))`` (l_inf) or rescales ``x' - x0`` into the l2 ball
  and then clips; :func:`uniform_in_ball` draws ``clip_[0,1](x0 + U(-eps, eps))``.
- offset form (targeted PGD): :func:`project_delta` maps delta to the ball and clips so that
  ``x + delta`` lies in [0, 1]; :func:`random_start` draws a uniform point of the ball (l_inf: the
  cube, l2: the ball) as an offset.

Randomness is counter-based whenever a ``seed`` is given: sample i's draw is a pure function of
(seed, stream, ids[i]) (:func:`explanations.explainers.seeded_uniform`), so a batched run equals
per-sample runs and DDP shards equal one process. Without a seed, draws come from ``generator``
(or the global RNG), for training-time attacks that should see new noise every batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from explanations.explainers import seeded_normal, seeded_uniform
from explanations.streams import L2_RADIUS_OFFSET

NORMS: tuple[str, ...] = ("linf", "l2")


def check_norm(norm: str) -> None:
    """Raise a clear error for an unknown perturbation norm."""
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not a known perturbation norm; valid: {NORMS}")


def per_sample_norm(t: Tensor, norm: str) -> Tensor:
    """||t_i||_p per sample (B,) for t (B, ...), p = inf or 2."""
    flat = t.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)


def _view(t: Tensor, like: Tensor) -> Tensor:
    return t.view(-1, *([1] * (like.dim() - 1)))


def project_delta(delta: Tensor, x: Tensor, eps: float, norm: str = "linf") -> Tensor:
    """Offset form: delta projected onto the eps ball of ``norm``, then clipped so x + delta is in [0, 1]."""
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        scale = (eps / per_sample_norm(delta, "l2").clamp_min(1e-12)).clamp(max=1.0)
        delta = delta * _view(scale, delta)
    return (x + delta).clamp(0.0, 1.0) - x


def project(x_new: Tensor, x0: Tensor, eps: float, norm: str = "linf", clip: bool = True) -> Tensor:
    """Point form: x_new projected onto the eps ball of ``norm`` around x0, then (``clip``) onto [0, 1].

    l_inf: ``min(max(x_new, x0 - eps), x0 + eps)``; l2: ``x0 + (x_new - x0) * min(1, eps / ||x_new - x0||)``.
    Clipping to [0, 1] after the l_inf projection keeps the iterate in the ball (it moves every
    coordinate towards [0, 1], where x0 lies).
    """
    if norm == "linf":
        out = torch.minimum(torch.maximum(x_new, x0 - eps), x0 + eps)
    else:
        delta = x_new - x0
        scale = (eps / per_sample_norm(delta, "l2").clamp_min(1e-12)).clamp(max=1.0)
        out = x0 + delta * _view(scale, delta)
    return out.clamp_(0.0, 1.0) if clip else out


def uniform_in_ball(x0: Tensor, eps: float, ids: Tensor | None, seed: int | None, stream: int = 0) -> Tensor:
    """Point form: ``clip_[0,1](x0 + eps * (2u - 1))``, u uniform per pixel; counter-based when ``seed`` is given.

    ``ids`` (B,) default to 0..B-1. ``seed=None`` draws u from the global RNG.
    """
    if seed is None:
        u = torch.rand_like(x0)
    else:
        if ids is None:
            ids = torch.arange(x0.shape[0], device=x0.device)
        u = seeded_uniform(ids.to(x0.device), tuple(x0.shape[1:]), seed, stream, x0.dtype)
    return (x0 + eps * (2.0 * u - 1.0)).clamp(0.0, 1.0)


def random_start(
    x: Tensor, eps: float, norm: str = "linf", generator: torch.Generator | None = None,
    ids: Tensor | None = None, seed: int | None = None, stream: int = 0,
) -> Tensor:
    """Offset form: a uniform random point of the eps ball (l_inf: the cube; l2: the ball), clipped.

    With ``seed`` the draw is counter-based on (seed, stream, ids[i]); otherwise it is drawn on
    the CPU from ``generator`` (the global RNG when None) and moved to x's device.
    """
    check_norm(norm)
    shape = x.shape
    if seed is not None:
        ids = torch.arange(shape[0], device=x.device) if ids is None else ids.to(x.device)
        if norm == "linf":
            delta = (seeded_uniform(ids, tuple(shape[1:]), seed, stream, torch.float64) * 2 - 1) * eps
        else:
            direction = seeded_normal(ids, tuple(shape[1:]), seed, stream, torch.float64)
            direction = direction / _view(direction.flatten(1).norm(dim=1).clamp_min(1e-12), direction)
            u = seeded_uniform(ids, (1,), seed, stream + L2_RADIUS_OFFSET, torch.float64).view(-1)
            delta = direction * _view(eps * u ** (1.0 / direction[0].numel()), direction)
        return project_delta(delta.to(x.dtype), x, eps, norm)
    if norm == "linf":
        delta = (torch.rand(shape, generator=generator) * 2 - 1) * eps
    else:
        direction = torch.randn(shape, generator=generator)
        direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        d = direction[0].numel()
        radius = eps * torch.rand(shape[0], generator=generator) ** (1.0 / d)
        delta = direction * radius.view(-1, *([1] * (x.dim() - 1)))
    return project_delta(delta.to(x.device, x.dtype), x, eps, norm)
