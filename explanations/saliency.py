"""Gradient saliency and top-k rankings (DESIGN §3).

For an image x (B x C x H x W) and an explained scalar l, the gradient is g(x) = d l / d x and the
saliency map is s(x) = sum_c |g_c(x)|, a map of H x W features flattened to n = H * W (or
(H/p) * (W/p) with p x p average pooling). Everything is batched: one backward pass serves the
whole batch because sample i's scalar depends on sample i's input only (the model must be in eval
mode, or free of batch-coupling layers, for that to hold exactly: :func:`saliency` runs it in eval
mode; :func:`input_gradient`, the training-time helper, keeps the caller's mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Target = Literal["loss", "logit"]
TARGETS: tuple[str, ...] = ("loss", "logit")


def check_target(target: str) -> None:
    """Raise a clear error for an unknown explained scalar."""
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is not a known explained scalar; valid: {TARGETS}")


def resolve_k(k: int | float, n: int) -> int:
    """Turn k (an integer count, or a fraction of the n features in (0, 1)) into a count in [1, n]."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ValueError(f"k={k!r} must be an integer in [1, {n}] or a fraction in (0, 1)")
    if isinstance(k, float) and not k.is_integer():
        if not 0.0 < k < 1.0:
            raise ValueError(f"k={k!r} must be an integer in [1, {n}] or a fraction in (0, 1)")
        return max(1, min(n, int(round(k * n))))
    count = int(k)
    if not 1 <= count <= n:
        raise ValueError(
            f"k={k!r} is out of range for {n} features: give an integer in [1, {n}] "
            "or a fraction in (0, 1)"
        )
    return count


def explained_scalar(
    logits: Tensor, labels: Tensor | None, target: str = "loss", classes: Tensor | None = None
) -> Tensor:
    """Per-sample scalar l (B,): cross-entropy with the label, or the logit of ``classes``
    (default: the class predicted from ``logits``)."""
    check_target(target)
    if target == "loss":
        if labels is None:
            raise ValueError("target='loss' needs labels; pass labels or use target='logit'")
        return F.cross_entropy(logits, labels, reduction="none")
    if classes is None:
        classes = logits.detach().argmax(dim=1)
    return logits.gather(1, classes[:, None]).squeeze(1)


@dataclass
class InputGradient:
    """An input gradient with the forward results it came from.

    grad: (B, C, H, W); logits: (B, K); scalar: (B,) the explained scalar per sample.
    """

    grad: Tensor
    logits: Tensor
    scalar: Tensor


def input_gradient(
    model: nn.Module,
    x: Tensor,
    labels: Tensor | None = None,
    target: str = "loss",
    create_graph: bool = False,
    classes: Tensor | None = None,
) -> InputGradient:
    """g(x) = d l / d x for a batch, via ``torch.autograd.grad`` (parameter ``.grad`` untouched).

    The one input-gradient helper (explainers, objectives and regularizers call it). ``x`` is
    used as given when it already requires grad (so callers can differentiate through it), else
    a detached leaf. ``classes`` (B,): the class explained for ``target='logit'``. With
    ``create_graph=True`` the gradient is part of the graph (double backprop: regularizers,
    attacks). An input the scalar does not depend on gets a zero gradient. The caller decides
    the model's mode; the analysis helpers use eval mode.
    """
    with torch.enable_grad():
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        logits = model(x)
        scalar = explained_scalar(logits, labels, target, classes)
        grad = scalar_gradient(scalar, x, create_graph)
    return InputGradient(grad=grad, logits=logits, scalar=scalar)


def scalar_gradient(scalar: Tensor, x: Tensor, create_graph: bool = False) -> Tensor:
    """d sum_i scalar_i / d x (zeros where x is unused), via ``torch.autograd.grad`` on x only."""
    (grad,) = torch.autograd.grad(scalar.sum(), x, create_graph=create_graph, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def saliency_from_gradient(grad: Tensor, pool: int | None = None) -> Tensor:
    """s = sum_c |g_c|, optionally p x p average pooled, flattened: (B, C, H, W) -> (B, n)."""
    if grad.dim() != 4:
        raise ValueError(f"expected a gradient of shape (B, C, H, W), got {tuple(grad.shape)}")
    s = grad.abs().sum(dim=1)
    if pool is not None and pool > 1:
        h, w = s.shape[-2:]
        if h % pool or w % pool:
            raise ValueError(f"pool={pool} must divide the image size {h}x{w}")
        s = F.avg_pool2d(s.unsqueeze(1), pool).squeeze(1)
    return s.flatten(1)


def num_features(height: int, width: int, pool: int | None = None) -> int:
    """n, the number of saliency features of an H x W image (after optional pooling)."""
    p = pool if pool and pool > 1 else 1
    return (height // p) * (width // p)


def saliency(
    model: nn.Module,
    x: Tensor,
    labels: Tensor | None = None,
    target: str = "loss",
    pool: int | None = None,
    create_graph: bool = False,
) -> Tensor:
    """Batched saliency map s(x): (B, C, H, W) -> (B, n); the ``gradient`` method of
    :func:`explanations.explainers.explain` (images checked, the model in eval mode, restored).
    Training code that needs the caller's mode uses :func:`input_gradient`."""
    from explanations.explainers import explain  # explainers builds on this module

    return explain(model, x, labels, "gradient", target, pool, create_graph)


def ranking(s: Tensor) -> Tensor:
    """pi(x): feature indices in descending saliency, ties broken by index (stable). (B, n) -> (B, n)."""
    return torch.sort(s, dim=1, descending=True, stable=True).indices


def topk_indices(s: Tensor, k: int) -> Tensor:
    """T_k(x): the k most salient feature indices, stable under ties. (B, n) -> (B, k)."""
    return ranking(s)[:, :k]


def topk_mask(s: Tensor, k: int) -> Tensor:
    """Boolean membership of T_k(x): (B, n) -> (B, n)."""
    mask = torch.zeros_like(s, dtype=torch.bool)
    return mask.scatter_(1, topk_indices(s, k), True)


def unit_sign_direction(grad: Tensor) -> Tensor:
    """u = sign(g) / sqrt(d), detached, with d = C * H * W: (B, C, H, W) -> (B, C, H, W)."""
    d = grad[0].numel()
    return torch.sign(grad.detach()) / math.sqrt(d)
