"""Attacks on the explanation ranking (DESIGN §5): ERAttack and the MSE attack, batched.

Both are torchattacks-shaped: ``attack = ERAttack(model, eps=8/255, steps=20)`` then
``x_adv = attack(images, labels)``. ``model`` is any ``nn.Module`` mapping images in [0, 1] to
logits; the attacks run it in eval mode (restoring every submodule's flag afterwards), inside
``torch.enable_grad()``, with ``torch.autograd.grad`` w.r.t. the input only, so parameter
``.grad`` is never touched.

- **ERAttack** freezes the clean order pi0 and minimises
  ``J(x') = sum_{r<=k} s_pi0(r)(x') - sum_{k<r<=2k} s_pi0(r)(x')`` (pair set ``boundary``; ``all``
  uses the mean over the top-k minus the mean over the rest; ``minmax`` the m lowest top-k
  scores minus the m highest others), i.e. it pushes the clean top-k features down and the next
  ones up.
- **MSEAttack** maximises ``||s(x') - s(x)||_2^2`` (same ascent direction as the norm). Its
  gradient vanishes at x' = x, so it always starts from a random point (``random_start=True`` by
  default; with ``False`` it starts from a tiny 1e-3 * eps uniform perturbation).

Constraints: x' stays in the l_inf ball of radius ``eps`` around x, clipped to [0, 1]. Steps are
signed (``step="sign"``: x += step_size * sign(grad)) or l2-normalised (``step="l2"``:
x += step_size * sqrt(d) * grad / ||grad||_2, the same Euclidean length as a signed step), each
followed by the projection. ``step_size`` defaults to 2.5 * eps / steps.

Prediction preserved: after each step every sample's prediction is checked against its clean
prediction; a sample whose prediction flipped goes back to its last unflipped iterate and stops
(batched masks; later steps only compute on the samples still active). A random start that flips
the prediction is replaced by the clean image. The prediction of an iterate is read from the
forward pass of the next step, so the check costs no extra forward except after the last step.
After a call, ``attack.flipped`` (B,) tells which samples were stopped by a flip,
``attack.steps_taken`` (B,) how many steps each kept, ``attack.clean_logits`` (B, K) the clean
logits (eval mode, detached).

Randomness (random start) is counter-based: sample i's start depends only on (``seed``, ``ids[i]``)
(``ids`` defaults to 0..B-1; the evaluation callback passes dataset indices), so batched runs equal
per-sample runs and DDP shards equal one process. ``seed=None`` draws from the global RNG instead
(adversarial training, where each batch should see new noise).

``surrogate_beta``: for ReLU networks, take the attack's gradient on a copy of the model whose
ReLU-type activations are Softplus(beta) (Dombrowski et al. 2019); the prediction check (and any
metric) uses the real model.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from explanations.explainers import (
    Explanation,
    check_method,
    eval_mode,
    explain_with_logits,
    seeded_uniform,
)
from explanations.regularizers import check_pair_set, default_minmax_m
from explanations.saliency import check_target, num_features, ranking, resolve_k

STEPS: tuple[str, ...] = ("sign", "l2")
_RELU_TYPES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU)


def softplus_surrogate(model: nn.Module, beta: float) -> nn.Module:
    """A deep copy of ``model`` with ReLU-type activation modules replaced by Softplus(beta)."""
    if not beta > 0:
        raise ValueError(f"surrogate_beta={beta!r} must be a positive number")
    surrogate = copy.deepcopy(model)
    for module in list(surrogate.modules()):
        for name, child in list(module._modules.items()):
            if isinstance(child, _RELU_TYPES):
                setattr(module, name, nn.Softplus(beta=beta))
    return surrogate


def frozen_gap(s: Tensor, order: Tensor, k: int, pair_set: str = "boundary", m: int | None = None) -> Tensor:
    """ERAttack's J per sample (B,): the top-k/next block gap of s (B, n) under a frozen order."""
    n = s.shape[1]
    ranked = s.gather(1, order)
    if pair_set == "boundary":
        return ranked[:, :k].sum(1) - ranked[:, k : 2 * k].sum(1)
    if pair_set == "all":
        rest = ranked[:, k:].mean(1) if k < n else torch.zeros_like(ranked[:, 0])
        return ranked[:, :k].mean(1) - rest
    m = default_minmax_m(k) if m is None else m
    return ranked[:, k - m : k].sum(1) - ranked[:, k : k + m].sum(1)


def project(x_new: Tensor, x0: Tensor, eps: float) -> Tensor:
    """Project onto the l_inf ball of radius eps around x0, then clip to [0, 1]."""
    return torch.minimum(torch.maximum(x_new, x0 - eps), x0 + eps).clamp_(0.0, 1.0)


def uniform_in_ball(x0: Tensor, eps: float, ids: Tensor | None, seed: int | None, stream: int = 0) -> Tensor:
    """x0 + U(-eps, eps) per pixel, clipped to [0, 1]; counter-based when ``seed`` is given."""
    if seed is None:
        u = torch.rand_like(x0)
    else:
        if ids is None:
            ids = torch.arange(x0.shape[0], device=x0.device)
        u = seeded_uniform(ids.to(x0.device), tuple(x0.shape[1:]), seed, stream, x0.dtype)
    return (x0 + eps * (2.0 * u - 1.0)).clamp(0.0, 1.0)


class RankingAttack:
    """Shared machinery of the explanation attacks (see the module docstring).

    Args:
        model: classifier in pixel space.
        eps: l_inf radius (pixel units, e.g. 8/255). steps: number of projected steps T.
        step_size: per-step size (l_inf units; default 2.5 * eps / steps). step: ``sign`` or ``l2``.
        k: top-k size (int or fraction of the n features). pair_set, minmax_m: ERAttack's J.
        method, method_kwargs: explanation method attacked (see ``explanations.explainers``).
        target: explained scalar (``loss`` or ``logit``). pool: saliency pooling.
        random_start: start from a uniform point in the ball. seed: see module docstring.
        surrogate_beta: attack gradient through a Softplus(beta) copy of a ReLU model.
    """

    name = "attack"
    default_random_start = False

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        steps: int = 10,
        step_size: float | None = None,
        k: int | float = 0.1,
        pair_set: str = "boundary",
        minmax_m: int | None = None,
        method: str = "gradient",
        method_kwargs: dict[str, Any] | None = None,
        target: str = "loss",
        pool: int | None = None,
        step: str = "sign",
        random_start: bool | None = None,
        seed: int | None = 0,
        surrogate_beta: float | None = None,
    ) -> None:
        if not eps >= 0:
            raise ValueError(f"eps={eps!r} must be a non-negative budget in pixel units")
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps={steps!r} must be a non-negative integer")
        if step not in STEPS:
            raise ValueError(f"step={step!r} is not known; valid: {STEPS}")
        check_pair_set(pair_set)
        check_target(target)
        check_method(method, method_kwargs)
        if surrogate_beta is not None and not surrogate_beta > 0:
            raise ValueError(f"surrogate_beta={surrogate_beta!r} must be a positive number or None")
        self.model, self.eps, self.steps = model, float(eps), steps
        self.step_size = float(step_size) if step_size is not None else (2.5 * self.eps / max(steps, 1))
        self.k, self.pair_set, self.minmax_m = k, pair_set, minmax_m
        self.method, self.method_kwargs = method, dict(method_kwargs or {})
        self.target, self.pool, self.step = target, pool, step
        self.random_start = self.default_random_start if random_start is None else bool(random_start)
        self.seed, self.surrogate_beta = seed, surrogate_beta
        self.flipped: Tensor | None = None
        self.steps_taken: Tensor | None = None
        self.clean_logits: Tensor | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(eps={self.eps:.4g}, steps={self.steps}, step_size={self.step_size:.4g}, "
            f"k={self.k}, method={self.method!r}, target={self.target!r}, step={self.step!r}, "
            f"random_start={self.random_start})"
        )

    # ------------------------------------------------------------------ hooks for subclasses
    def _reference(self, s_clean: Tensor, k: int) -> Tensor:
        """What the objective compares against, from the clean saliency (detached)."""
        raise NotImplementedError

    def _ascent_objective(self, s: Tensor, reference: Tensor, k: int) -> Tensor:
        """Per-sample (B,) objective to *increase*."""
        raise NotImplementedError

    def _start(self, x0: Tensor, ids: Tensor | None) -> Tensor:
        return uniform_in_ball(x0, self.eps, ids, self.seed) if self.random_start else x0

    # ------------------------------------------------------------------ the attack
    def _explain(self, model: nn.Module, x: Tensor, labels: Tensor | None, create_graph: bool,
                 classes: Tensor | None) -> Explanation:
        return explain_with_logits(
            model, x, labels, self.method, self.target, self.pool, create_graph, classes=classes,
            **self.method_kwargs,
        )

    def _step(self, grad: Tensor) -> Tensor:
        if self.step == "sign":
            return self.step_size * grad.sign()
        d = grad[0].numel()
        norm = grad.flatten(1).norm(dim=1).clamp_min(torch.finfo(grad.dtype).tiny)
        return (self.step_size * math.sqrt(d)) * grad / norm.view(-1, *([1] * (grad.dim() - 1)))

    def __call__(self, images: Tensor, labels: Tensor | None = None, ids: Tensor | None = None) -> Tensor:
        """Attacked images (B, C, H, W), detached, same dtype/device as ``images``."""
        if images.dim() != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
        if self.target == "loss" and labels is None:
            raise ValueError("target='loss' needs labels: call attack(images, labels)")
        x0 = images.detach()
        b = x0.shape[0]
        device = x0.device
        k = resolve_k(self.k, num_features(*x0.shape[-2:], self.pool))
        if self.pair_set == "minmax":
            m = default_minmax_m(k) if self.minmax_m is None else self.minmax_m
            if not 1 <= m <= k:
                raise ValueError(f"minmax m={m} must be in 1..k={k}")
        model = self.model
        with eval_mode(model), torch.enable_grad():
            grad_model = model if self.surrogate_beta is None else softplus_surrogate(model, self.surrogate_beta)
            x_cur = self._start(x0, ids).clone()
            pred0 = reference = None
            if self.steps == 0 or grad_model is not model or not torch.equal(x_cur, x0):
                clean = self._explain(model, x0, labels, False, None)
                pred0 = clean.logits.detach().argmax(1)
                reference = self._reference(clean.saliency.detach(), k)
                self.clean_logits = clean.logits.detach()
            x_keep = x0.clone()
            active = torch.ones(b, dtype=torch.bool, device=device)
            flipped = torch.zeros(b, dtype=torch.bool, device=device)
            taken = torch.zeros(b, dtype=torch.long, device=device)
            for t in range(self.steps + 1):
                idx = active.nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                last = t == self.steps
                xa = x_cur[idx]
                lab = None if labels is None else labels[idx]
                if last:
                    with torch.no_grad():
                        logits = model(xa)
                else:
                    xa = xa.detach().requires_grad_(True)
                    out = self._explain(grad_model, xa, lab, True, None if pred0 is None else pred0[idx])
                    if pred0 is None:  # t == 0 at the clean image: this pass is the clean pass
                        pred0 = out.logits.detach().argmax(1)
                        reference = self._reference(out.saliency.detach(), k)
                        self.clean_logits = out.logits.detach()
                    if grad_model is model:
                        logits = out.logits
                    else:
                        with torch.no_grad():
                            logits = model(xa)
                ok = logits.detach().argmax(1) == pred0[idx]
                bad, good = idx[~ok], idx[ok]
                if bad.numel():
                    # at t == 0 the iterate is the random start: fall back to the clean image
                    x_cur[bad] = x0[bad] if t == 0 else x_keep[bad]
                    if t > 0:
                        active[bad] = False
                        flipped[bad] = True
                x_keep[good] = x_cur[good]
                if last:
                    break
                objective = self._ascent_objective(out.saliency, reference[idx], k)
                (grad,) = torch.autograd.grad(objective.sum(), xa, allow_unused=True)
                if grad is None:
                    grad = torch.zeros_like(xa)
                if good.numel():
                    rows = ok.nonzero().squeeze(1)
                    stepped = project(x_cur[good] + self._step(grad[rows].detach()), x0[good], self.eps)
                    x_cur[good] = stepped
                    taken[good] += 1
        self.flipped, self.steps_taken = flipped, taken
        return x_keep.detach()

    forward = __call__


class ERAttack(RankingAttack):
    """Explanation-ranking attack: minimise the frozen top-k gap J (DESIGN §5)."""

    name = "er"

    def _reference(self, s_clean: Tensor, k: int) -> Tensor:
        return ranking(s_clean)

    def _ascent_objective(self, s: Tensor, reference: Tensor, k: int) -> Tensor:
        return -frozen_gap(s, reference, k, self.pair_set, self.minmax_m)


class MSEAttack(RankingAttack):
    """Maximise ||s(x') - s(x)||_2 (Ghorbani et al. 2019), prediction preserved."""

    name = "mse"
    default_random_start = True

    def _reference(self, s_clean: Tensor, k: int) -> Tensor:
        return s_clean

    def _ascent_objective(self, s: Tensor, reference: Tensor, k: int) -> Tensor:
        return (s - reference).pow(2).sum(1)

    def _start(self, x0: Tensor, ids: Tensor | None) -> Tensor:
        if self.random_start:
            return uniform_in_ball(x0, self.eps, ids, self.seed)
        return uniform_in_ball(x0, 1e-3 * self.eps, ids, self.seed)


ATTACKS: dict[str, type[RankingAttack]] = {"er": ERAttack, "mse": MSEAttack}


def build_attack(name: str, model: nn.Module, **kwargs: Any) -> RankingAttack:
    """``ATTACKS[name](model, **kwargs)`` with a clear error for unknown names."""
    if name not in ATTACKS:
        raise ValueError(f"attack={name!r} is not known; valid: {sorted(ATTACKS)}")
    return ATTACKS[name](model, **kwargs)
