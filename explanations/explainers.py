"""Explanation methods beyond the plain gradient, batched and differentiable (DESIGN §5).

Every method maps a batch of images x (B, C, H, W) in [0, 1] to a saliency map (B, n) over the
same H x W features as the plain gradient saliency (DESIGN §3): an attribution a(x) of shape
(B, C, H, W) is reduced by ``s = sum_c |a_c|`` (optionally p x p average pooled).

==========================  =================================================================
method                      attribution a(x)
==========================  =================================================================
``gradient``                g(x) = d l / d x
``grad_x_input``            g(x) * x
``smoothgrad``              saliency averaged over N noisy copies x + sigma * z, z ~ N(0, I)
                            (Smilkov et al. 2017): s = mean_j sum_c |g_c(x + sigma z_j)|
``integrated_gradients``    (x - b) * mean_{j=1..m} g(b + (j/m) (x - b))   (right Riemann sum,
                            Sundararajan et al. 2017; baseline b = 0 (black) by default)
==========================  =================================================================

The methods are registered (:func:`register_method`, ``METHODS``): a new method is one function
``fn(model, x, labels, target, pool, create_graph, classes, **options) -> Explanation`` with the
decorator; its keyword parameters are its options (``method_kwargs``), checked by
:func:`check_method`, and the tests that iterate ``METHODS`` cover it.

Batching: SmoothGrad and Integrated Gradients stack their N (or m) evaluation points into one big
batch of N * B images, so one forward and one backward serve the whole batch; no Python loop over
images. ``create_graph=True`` keeps the saliency differentiable in x (attacks descend through it).

Determinism: SmoothGrad's noise comes from a ``torch.Generator`` seeded by ``seed`` (default 0)
and is shared by the images of a batch (noise of shape (N, 1, C, H, W)), so with a fixed seed each
method is a deterministic function of the single image: results do not depend on the batch it
sits in (batched == per-sample, and DDP shards == one process).

The explained scalar (``target``): ``loss`` = cross-entropy with the label, or ``logit`` = the
logit of the class predicted at x. For SmoothGrad and IG the *same* class (the one predicted at
the clean x, or ``classes`` when given) is explained at every noisy or path point.

The public entry points :func:`explain` and :func:`explain_with_logits` check the images once
(:func:`explanations.validation.check_images`: float (B, C, H, W), finite, in [0, 1]) and run the
model in eval mode (:func:`eval_mode`, every submodule's flag restored), so a saliency never
depends on the batch it sits in and BatchNorm statistics never move. :func:`explain_unchecked` is
the inner pass for callers that checked the images and chose the mode themselves (the attacks'
loops, the evaluation protocol, the thickness estimate). Training-time regularizers call
:func:`explanations.saliency.input_gradient` directly and keep the caller's (train) mode.
Gradients are taken with ``torch.autograd.grad`` w.r.t. the input only, so parameter ``.grad``
is never written.

This module also holds :func:`seeded_uniform` / :func:`seeded_normal`, counter-based noise keyed
by (seed, stream, sample id): the attacks' random starts, the noise baseline and the thickness
estimate use it so that a sample's noise does not depend on its batch or on the process that
evaluates it.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from explanations.saliency import (
    check_target,
    explained_scalar,
    input_gradient,
    saliency_from_gradient,
    scalar_gradient,
)
from explanations.validation import (
    check_images,
    check_pool,
    check_positive_int,
    check_steps,
)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore every submodule's own training flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


@dataclass
class Explanation:
    """saliency: (B, n); logits: (B, K) at x itself (graph-carrying when the forward was)."""

    saliency: Tensor
    logits: Tensor


@dataclass(frozen=True)
class ExplanationMethod:
    """A registered explanation method: ``fn(model, x, labels, target, pool, create_graph,
    classes, **options) -> Explanation`` and the keyword ``options`` it takes."""

    name: str
    fn: Callable[..., Explanation]
    options: tuple[str, ...]


#: name -> :class:`ExplanationMethod`, filled by :func:`register_method` (iterate it for the names).
METHODS: dict[str, ExplanationMethod] = {}

#: The arguments every method function takes before its own keyword options.
_METHOD_PARAMS = ("model", "x", "labels", "target", "pool", "create_graph", "classes")


def register_method(name: str) -> Callable[[Callable[..., Explanation]], Callable[..., Explanation]]:
    """Decorator: register ``fn(model, x, labels, target, pool, create_graph, classes, **options)``
    under ``name``; its options are the keyword parameters after those seven (with defaults)."""

    def decorator(fn: Callable[..., Explanation]) -> Callable[..., Explanation]:
        params = list(inspect.signature(fn).parameters)
        if tuple(params[: len(_METHOD_PARAMS)]) != _METHOD_PARAMS:
            raise TypeError(f"explanation method {name!r}: {fn.__name__} must take {_METHOD_PARAMS} first, got {params}")
        METHODS[name] = ExplanationMethod(name, fn, tuple(params[len(_METHOD_PARAMS):]))
        return fn

    return decorator


def check_method(method: str, method_kwargs: dict[str, Any] | None = None) -> None:
    """Raise a clear error for an unknown method or a keyword the method does not take."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a known explanation method; valid: {tuple(METHODS)}")
    options = METHODS[method].options
    unknown = sorted(set(method_kwargs or {}) - set(options))
    if unknown:
        raise ValueError(f"method={method!r} does not take {unknown}; its options are {list(options)}")


def _require_grad(x: Tensor) -> Tensor:
    return x if x.requires_grad else x.detach().requires_grad_(True)


def _gradient(
    model: nn.Module, x: Tensor, labels: Tensor | None, target: str, classes: Tensor | None,
    create_graph: bool,
) -> tuple[Tensor, Tensor]:
    """(g(x), logits) from :func:`explanations.saliency.input_gradient`."""
    out = input_gradient(model, x, labels, target, create_graph, classes)
    return out.grad, out.logits


def _repeat(t: Tensor | None, times: int) -> Tensor | None:
    return None if t is None else t.repeat(times)


def smoothgrad_noise(
    shape: tuple[int, ...], num_samples: int, noise_std: float, seed: int | None = 0,
    generator: torch.Generator | None = None, device=None, dtype=None,
) -> Tensor:
    """SmoothGrad's noise (N, 1, *shape): drawn on the CPU from ``generator`` (or one seeded
    with ``seed``; ``seed=None`` uses the global RNG), then moved to ``device``."""
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    z = torch.randn((num_samples, 1, *shape), generator=generator, dtype=torch.float64)
    return (noise_std * z).to(device=device, dtype=dtype)


def explain_with_logits(
    model: nn.Module,
    x: Tensor,
    labels: Tensor | None = None,
    method: str = "gradient",
    target: str = "loss",
    pool: int | None = None,
    create_graph: bool = False,
    classes: Tensor | None = None,
    **method_kwargs: Any,
) -> Explanation:
    """Saliency (B, n) of ``method`` plus the logits at x, from as few passes as possible.

    x: images (B, C, H, W), float, finite, in [0, 1] (checked once). The model runs in eval mode
    (every submodule's flag restored). ``classes`` (B,): the class whose logit is explained for
    ``target='logit'`` (default: the class predicted at x). ``method_kwargs``: smoothgrad
    ``num_samples`` (16), ``noise_std`` (0.15, pixel units), ``seed`` (0) or ``generator``;
    integrated_gradients ``steps`` (16), ``baseline`` (0.0: a float or a tensor broadcastable to x).
    """
    check_images(x)
    check_pool(pool)
    with eval_mode(model):
        return explain_unchecked(model, x, labels, method, target, pool, create_graph, classes, **method_kwargs)


def explain_unchecked(
    model: nn.Module,
    x: Tensor,
    labels: Tensor | None = None,
    method: str = "gradient",
    target: str = "loss",
    pool: int | None = None,
    create_graph: bool = False,
    classes: Tensor | None = None,
    **method_kwargs: Any,
) -> Explanation:
    """The pass behind :func:`explain_with_logits` without its image check and eval-mode switch.

    For callers that checked the images once (:func:`explanations.validation.check_images`) and
    run the model in the mode they chose (the attacks' loops inside their own :func:`eval_mode`,
    the evaluation protocol, the thickness estimate), so nothing is re-checked per step.
    """
    check_target(target)
    check_method(method, method_kwargs)
    if x.dim() != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
    with torch.enable_grad():
        return METHODS[method].fn(model, x, labels, target, pool, create_graph, classes, **method_kwargs)


# ------------------------------------------------------------------ the registered methods
@register_method("gradient")
def gradient_saliency(
    model: nn.Module, x: Tensor, labels: Tensor | None, target: str, pool: int | None, create_graph: bool,
    classes: Tensor | None,
) -> Explanation:
    """a(x) = g(x)."""
    x = _require_grad(x)
    g, logits = _gradient(model, x, labels, target, classes, create_graph)
    return Explanation(saliency_from_gradient(g, pool), logits)


@register_method("grad_x_input")
def grad_x_input_saliency(
    model: nn.Module, x: Tensor, labels: Tensor | None, target: str, pool: int | None, create_graph: bool,
    classes: Tensor | None,
) -> Explanation:
    """a(x) = g(x) * x."""
    x = _require_grad(x)
    g, logits = _gradient(model, x, labels, target, classes, create_graph)
    return Explanation(saliency_from_gradient(g * x, pool), logits)


@register_method("smoothgrad")
def smoothgrad_saliency(
    model: nn.Module, x: Tensor, labels: Tensor | None, target: str, pool: int | None, create_graph: bool,
    classes: Tensor | None, num_samples: int = 16, noise_std: float = 0.15, seed: int | None = 0,
    generator: torch.Generator | None = None,
) -> Explanation:
    """s = mean_j s(x + sigma z_j) over ``num_samples`` noisy copies, one batch of N * B images."""
    b = x.shape[0]
    num = check_positive_int(num_samples, "smoothgrad num_samples")
    noise = smoothgrad_noise(tuple(x.shape[1:]), num, float(noise_std), seed, generator, x.device, x.dtype)
    logits = model(x)  # logits at x: prediction check and the class to explain
    if target == "logit" and classes is None:
        classes = logits.detach().argmax(dim=1)
    noisy = (x.unsqueeze(0) + noise).reshape(num * b, *x.shape[1:])
    g, _ = _gradient(model, noisy, _repeat(labels, num), target, _repeat(classes, num), create_graph)
    s = saliency_from_gradient(g, pool).view(num, b, -1).mean(0)
    return Explanation(s, logits)


@register_method("integrated_gradients")
def integrated_gradients_saliency(
    model: nn.Module, x: Tensor, labels: Tensor | None, target: str, pool: int | None, create_graph: bool,
    classes: Tensor | None, steps: int = 16, baseline: float | Tensor = 0.0,
) -> Explanation:
    """a(x) = (x - b) * mean_{j=1..m} g(b + (j/m)(x - b)), right Riemann sum: the last point is x."""
    b = x.shape[0]
    steps = check_steps(steps, "integrated_gradients steps")
    baseline = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    diff = x - baseline
    alphas = torch.arange(1, steps + 1, dtype=x.dtype, device=x.device).div_(steps)
    path = (baseline + alphas.view(-1, 1, 1, 1, 1) * diff.unsqueeze(0)).reshape(steps * b, *x.shape[1:])
    path = _require_grad(path)
    path_logits = model(path)
    logits = path_logits.view(steps, b, -1)[-1]
    if target == "logit" and classes is None:
        classes = logits.detach().argmax(dim=1)
    scalar = explained_scalar(path_logits, _repeat(labels, steps), target, _repeat(classes, steps))
    g = scalar_gradient(scalar, path, create_graph).view(steps, *x.shape).mean(0)
    return Explanation(saliency_from_gradient(diff * g, pool), logits)


def explain(
    model: nn.Module,
    x: Tensor,
    labels: Tensor | None = None,
    method: str = "gradient",
    target: str = "loss",
    pool: int | None = None,
    create_graph: bool = False,
    **method_kwargs: Any,
) -> Tensor:
    """Batched saliency (B, n) of an explanation method (see the module docstring); images
    (B, C, H, W) float in [0, 1] (checked), the model in eval mode (restored)."""
    return explain_with_logits(model, x, labels, method, target, pool, create_graph, **method_kwargs).saliency


# ------------------------------------------------------------------ counter-based noise
_M32 = 0xFFFFFFFF


def _mix32(v: Tensor) -> Tensor:
    """A 32-bit integer hash (bijective on [0, 2^32)), vectorised on int64 tensors."""
    v = v & _M32
    v = ((v >> 16) ^ v) * 0x45D9F3B & _M32
    v = ((v >> 16) ^ v) * 0x45D9F3B & _M32
    return (v >> 16) ^ v


def _mix32_int(v: int) -> int:
    return int(_mix32(torch.tensor(v & _M32, dtype=torch.int64)))


def _hash_bits(ids: Tensor, numel: int, seed: int, stream: int) -> Tensor:
    """(B, numel) 32-bit hashes of (seed, stream, sample id, element index)."""
    key = _mix32_int(_mix32_int(int(seed)) ^ _mix32_int(int(stream) * 0x9E3779B9 + 1))
    ids = ids.to(torch.int64).reshape(-1, 1)
    sample_key = _mix32((_mix32(ids) + key) ^ (ids >> 32))
    counter = _mix32(torch.arange(numel, dtype=torch.int64, device=ids.device) ^ key)
    return _mix32(_mix32(counter.unsqueeze(0) ^ sample_key) + sample_key)


def seeded_uniform(
    ids: Tensor, shape: tuple[int, ...], seed: int = 0, stream: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Uniform noise in (0, 1) of shape (B, *shape), a pure function of (seed, stream, ids[i]).

    Sample i's noise depends on its id only, never on the batch: batched and per-sample calls
    agree, and so do DDP shards and one process (ids = dataset indices). Computed on ids.device.
    """
    numel = math.prod(shape)
    bits = _hash_bits(ids, numel, seed, stream)
    u = (bits.to(torch.float64) + 0.5) / 2.0**32
    return u.to(dtype).view(ids.numel(), *shape)


def seeded_normal(
    ids: Tensor, shape: tuple[int, ...], seed: int = 0, stream: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise (B, *shape) from :func:`seeded_uniform` by Box-Muller."""
    u1 = seeded_uniform(ids, shape, seed, 2 * stream, torch.float64)
    u2 = seeded_uniform(ids, shape, seed, 2 * stream + 1, torch.float64)
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).to(dtype)
