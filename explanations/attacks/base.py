"""Shared machinery of the ranking attacks (DESIGN §5): best-iterate PGD on an explanation
objective, batched, with APGD's step-size schedule, flip undo, restarts and surrogate gradients.

The attack of a batch x0 (B, C, H, W) in [0, 1] ascends a per-sample objective J(x') (subclass
hook) over the l_inf ball of radius ``eps`` around x0, clipped to [0, 1]:

- **best iterate**: every iterate is scored on the *real* model by P@k of its saliency against
  the clean top-k; among the iterates that keep the clean prediction, each sample keeps the one
  with the lowest P@k (ties: the higher J) and returns it. The clean image is the first
  candidate, so a sample never comes back worse than clean, and more restarts never make the
  result worse.
- **flip undo**: a step that changes a sample's prediction is undone; that sample goes back to
  its best iterate of the run, halves its step size and continues (it does not stop).
- **step size**: ``step_size=None`` (default) runs APGD's schedule (:mod:`.schedule`: start at
  2 eps, halve at checkpoints when progress stalls, restart from the best point, momentum 0.75);
  a float keeps that fixed step (no momentum, no checkpoints; a flip still halves it for the
  sample). Steps are signed (``step="sign"``: x += eta sign(g); eta = ``step_size`` is the step's
  l_inf length, pixel units) or l2-normalised (``"l2"``: x += eta g / ||g||_2; eta = ``step_size``
  is the step's **l2 length** in pixel units, before the projection). Without a ``step_size`` an
  l2 step takes the Euclidean length of the signed step it replaces, sqrt(d) times the l_inf
  default (d values per image): 2 eps sqrt(d) to start the APGD schedule, 2.5 eps sqrt(d) / steps
  with ``legacy``.
- **restarts**: ``restarts=N`` runs N starts; restart 0 starts at the clean image (or at
  ``x_init``, or at a random point when ``random_start``), restart r >= 1 at a random point of
  the ball. Random points are counter-based: sample i's start depends only on
  (``seed``, ``ids[i]``, r) (``ids`` default 0..B-1), so batched equals per-sample and DDP shards
  equal one process. ``seed=None`` draws from the global RNG.
- **warm start**: ``attack(x, y, ids, x_init=x_prev)`` starts restart 0 at ``x_prev`` (projected
  into this ball); the result is never worse than ``x_prev`` when x_prev keeps the prediction, so
  a larger ball warm-started from a smaller one is never weaker.
- **surrogate** (``surrogate_beta``): the gradient pass runs under
  :class:`explanations.activations.SoftplusMode` (every ReLU-type module or call computes
  Softplus(beta); nothing is copied); P@k and the prediction check use the real model, at the
  cost of one extra first-order explanation on the real model per step. ``"auto"`` (default)
  uses beta = 10 exactly when the model has ReLU-type activations (resolved on the first call),
  ``None`` never; an explicit beta on a model without ReLU-type activations is an error naming
  the model.

Cost per call: one graph-carrying pass at the clean image (shared by the restarts), then one per
step and per random start (the last step of a run skips its second backward). Every sample runs
every step (masks, no per-sample Python loop).

``legacy=True`` runs the previous first-flip attack instead (fixed step, default
2.5 eps / steps (l2: times sqrt(d)), one start; a sample stops at its first prediction flip and returns its last
unflipped iterate), for comparison and to reproduce earlier numbers; adversarial training uses it
as its cheap fixed-budget training attack.

After a call: ``p_at_k`` (B,) best P@k (float32; None with ``legacy``), ``objective`` (B,) J at
the returned point, ``flipped`` (B,) bool (some step flipped the prediction), ``undone`` (B,)
number of undone steps, ``steps_taken`` (B,) accepted steps over all restarts, ``clean_logits``
(B, K), ``surrogate`` (the beta used, or None) and ``explanation``: the real model's saliency
(B, n) and logits (B, K) at the returned images, as scored (detached; None with ``legacy``), so a
caller need not explain them again.

The model runs in eval mode (every submodule's flag restored), inside ``torch.enable_grad()``,
with ``torch.autograd.grad`` w.r.t. the input only: parameter ``.grad`` is never touched.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor, nn

from explanations.activations import SoftplusMode, check_beta, resolve_surrogate
from explanations.attacks.schedule import ALPHA, RHO, apgd_checkpoints
from explanations.explainers import Explanation, check_method, eval_mode, explain_unchecked
from explanations.pgd import project, uniform_in_ball
from explanations.ranking_metrics import metric_dtype, precision_at_k
from explanations.regularizers import check_pair_set, default_minmax_m
from explanations.saliency import check_target, num_features, resolve_k
from explanations.validation import (
    check_eps,
    check_images,
    check_pool,
    check_positive,
    check_positive_int,
    check_steps,
)

STEPS: tuple[str, ...] = ("sign", "l2")


def _where(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Per-sample select: a[i] where mask[i] else b[i] (mask (B,), a and b (B, ...))."""
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)


def _step_dtype(device: torch.device) -> torch.dtype:
    """Per-sample step sizes in float64 (exact halving), float32 where float64 is missing (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _better(p: Tensor, obj: Tensor, best_p: Tensor, best_obj: Tensor) -> Tensor:
    """Lower P@k, ties broken by the higher objective."""
    return (p < best_p) | ((p == best_p) & (obj > best_obj))


class RankingAttack:
    """Best-iterate ranking attack (see the module docstring); subclasses define J.

    Args:
        model: classifier mapping images in [0, 1] to logits.
        eps: l_inf radius in (0, 1] (pixel units, e.g. 8/255). steps: steps per restart T >= 1.
        step_size: None = APGD schedule; a float = fixed step length in pixel units: its l_inf
            length under ``step="sign"``, its **l2 length** under ``step="l2"``.
        step: ``sign`` (signed steps) or ``l2`` (l2-normalised steps).
        k: top-k size (int or fraction of the n features). pair_set, minmax_m: ERAttack's J.
        method, method_kwargs: explanation method attacked (``explanations.explainers``).
        target: explained scalar (``loss`` or ``logit``). pool: saliency pooling.
        random_start: restart 0 from a random point of the ball. seed: see the module docstring.
        surrogate_beta: ``"auto"`` (default), None or a positive beta (see the module docstring).
        restarts: number of starts N >= 1; the best over them is returned.
        legacy: run the previous first-flip attack (one start, fixed step).

    Returns:
        ``attack(images, labels=None, ids=None, x_init=None)``: attacked images (B, C, H, W),
        detached, same dtype/device, in the ball and in [0, 1], with every prediction kept.
        ``images`` must be float (B, C, H, W), finite, in [0, 1]
        (:func:`explanations.validation.check_images`, once per call, not per step).

    Examples:
        >>> from explanations.attacks import ERAttack
        >>> attack = ERAttack(model, eps=8 / 255, steps=20, k=0.1)
        >>> x_adv = attack(images, labels)
        >>> attack.p_at_k.shape  # P@k per image of the returned x_adv
        torch.Size([4])
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
        surrogate_beta: float | str | None = "auto",
        restarts: int = 1,
        legacy: bool = False,
    ) -> None:
        steps = check_steps(steps)
        eps = self._check_eps(eps)
        if step not in STEPS:
            raise ValueError(f"step={step!r} is not known; valid: {STEPS}")
        if step_size is not None:
            check_positive(step_size, "step_size (None: the APGD schedule)")
        check_pool(pool)
        check_positive_int(restarts, "restarts")
        if legacy and restarts != 1:
            raise ValueError(f"restarts={restarts} needs the best-iterate attack; legacy=True runs one start")
        if isinstance(surrogate_beta, str):
            if surrogate_beta != "auto":
                raise ValueError(f"surrogate_beta={surrogate_beta!r} is not valid; use a positive number, 'auto' or None")
        elif surrogate_beta is not None:
            check_beta(surrogate_beta, "surrogate_beta")
        check_pair_set(pair_set)
        check_target(target)
        check_method(method, method_kwargs)
        self.model, self.eps, self.steps = model, float(eps), steps
        self.legacy = bool(legacy)
        if step_size is None and self.legacy and step == "sign":
            step_size = 2.5 * self.eps / steps  # l2: resolved per call (_default_step needs d)
        self.step_size = None if step_size is None else float(step_size)
        self.k, self.pair_set, self.minmax_m = k, pair_set, minmax_m
        self.method, self.method_kwargs = method, dict(method_kwargs or {})
        self.target, self.pool, self.step = target, pool, step
        self.random_start = self.default_random_start if random_start is None else bool(random_start)
        self.seed, self.surrogate_beta, self.restarts = seed, surrogate_beta, restarts
        self._resolved: tuple[float | None] | None = None
        self.surrogate: float | None = None
        self.flipped: Tensor | None = None
        self.undone: Tensor | None = None
        self.steps_taken: Tensor | None = None
        self.clean_logits: Tensor | None = None
        self.p_at_k: Tensor | None = None
        self.explanation: Explanation | None = None
        self.objective: Tensor | None = None

    def __repr__(self) -> str:
        size = f"{self.step_size:.4g}" if self.step_size is not None else ("2.5eps*sqrt(d)/steps" if self.legacy else "apgd")
        return (
            f"{type(self).__name__}(eps={self.eps:.4g}, steps={self.steps}, step_size={size}, "
            f"k={self.k}, method={self.method!r}, target={self.target!r}, step={self.step!r}, "
            f"random_start={self.random_start}, restarts={self.restarts}, "
            f"surrogate_beta={self.surrogate_beta!r}, legacy={self.legacy})"
        )

    # ------------------------------------------------------------------ hooks for subclasses
    def _check_eps(self, eps: float) -> float:
        """The budget as a float: an l_inf radius in (0, 1], pixel units."""
        return check_eps(eps)

    def _reference(self, s_clean: Tensor, k: int) -> Tensor:
        """What the objective compares against, from the clean saliency (detached)."""
        raise NotImplementedError

    def _ascent_objective(self, s: Tensor, reference: Tensor, k: int) -> Tensor:
        """Per-sample (B,) objective J to *increase*."""
        raise NotImplementedError

    def _start(self, x0: Tensor, ids: Tensor | None, restart: int) -> Tensor:
        """Start point of a restart: random in the ball (stream = restart index) or x0."""
        if self.random_start or restart > 0:
            return uniform_in_ball(x0, self.eps, ids, self.seed, stream=restart)
        return x0

    def _project(self, x: Tensor, x0: Tensor) -> Tensor:
        """Onto the threat model: the l_inf eps ball around x0, then [0, 1]."""
        return project(x, x0, self.eps)

    def _direction(self, grad: Tensor, eta: Tensor) -> Tensor:
        """The step for step lengths eta (B,): eta sign(g) (l_inf length eta), or eta g / ||g||_2
        (l2 length eta)."""
        eta = eta.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))
        if self.step == "sign":
            return eta * grad.sign()
        norm = grad.flatten(1).norm(dim=1).clamp_min(torch.finfo(grad.dtype).tiny)
        return eta * grad / norm.view(-1, *([1] * (grad.dim() - 1)))

    def _default_step(self, d: int) -> float:
        """The step length without a ``step_size`` for images of d values: 2 eps (the APGD
        schedule's start) or 2.5 eps / steps (``legacy``), times sqrt(d) for ``l2`` steps (the
        Euclidean length of that signed step, so both step kinds travel alike)."""
        base = 2.5 * self.eps / self.steps if self.legacy else 2.0 * self.eps
        return base * math.sqrt(d) if self.step == "l2" else base

    def _initial_step(self, d: int) -> float:
        return self._default_step(d) if self.step_size is None else self.step_size

    # ------------------------------------------------------------------ passes
    def _explain(self, x: Tensor, labels: Tensor | None, create_graph: bool, classes: Tensor | None) -> Explanation:
        return explain_unchecked(
            self.model, x, labels, self.method, self.target, self.pool, create_graph, classes=classes,
            **self.method_kwargs,
        )

    def _surrogate_for(self, x0: Tensor) -> float | None:
        """The beta of the gradient pass, resolved once per attack (on the first call)."""
        if self._resolved is None:
            self._resolved = (resolve_surrogate(self.model, self.surrogate_beta, x0[:1]),)
        return self._resolved[0]

    @staticmethod
    def _mode(beta: float | None):
        return contextlib.nullcontext() if beta is None else SoftplusMode(beta)

    def _k(self, x0: Tensor) -> int:
        k = resolve_k(self.k, num_features(*x0.shape[-2:], self.pool))
        if self.pair_set == "minmax":
            m = default_minmax_m(k) if self.minmax_m is None else self.minmax_m
            if not 1 <= m <= k:
                raise ValueError(f"minmax m={m} must be in 1..k={k}")
        return k

    def _check_call(self, images: Tensor, labels: Tensor | None) -> None:
        """Once per call (never inside the loop): the image contract and the labels."""
        check_images(images)
        if self.target == "loss" and labels is None:
            raise ValueError("target='loss' needs labels: call attack(images, labels)")

    # ------------------------------------------------------------------ the attack
    def __call__(
        self, images: Tensor, labels: Tensor | None = None, ids: Tensor | None = None,
        x_init: Tensor | None = None,
    ) -> Tensor:
        """Attacked images (B, C, H, W), detached, same dtype/device as ``images``."""
        self._check_call(images, labels)
        if self.legacy:
            if x_init is not None:
                raise ValueError("x_init (warm start) needs the best-iterate attack; legacy=True does not take it")
            return self._legacy_call(images, labels, ids)
        x0 = images.detach()
        k = self._k(x0)
        with eval_mode(self.model), torch.enable_grad():
            beta = self.surrogate = self._surrogate_for(x0)
            # the clean pass: gradient pass at x0 (with the real model's saliency and logits)
            if beta is None:
                xa0 = x0.clone().requires_grad_(True)
                clean = self._explain(xa0, labels, True, None)
                s_clean, logits0 = clean.saliency.detach(), clean.logits.detach()
            else:
                real = self._explain(x0, labels, False, None)
                s_clean, logits0 = real.saliency.detach(), real.logits.detach()
            pred0 = logits0.argmax(1)
            classes = pred0 if self.target == "logit" else None
            reference = self._reference(s_clean, k)

            def gradient(xa: Tensor, out: Explanation) -> tuple[Tensor, Tensor]:
                obj = self._ascent_objective(out.saliency, reference, k)
                (g,) = torch.autograd.grad(obj.sum(), xa, allow_unused=True)
                g = torch.zeros_like(xa) if g is None else torch.nan_to_num(g.detach(), 0.0, 0.0, 0.0)
                return obj.detach(), g

            def evaluate(x: Tensor, need_grad: bool = True):
                """(J, P@k, prediction kept, dJ/dx or None, real saliency, real logits) at x, batched."""
                xa = x.detach().requires_grad_(True)
                with self._mode(beta):
                    out = self._explain(xa, labels, need_grad, classes)
                    if need_grad:
                        obj, g = gradient(xa, out)
                    else:
                        obj, g = self._ascent_objective(out.saliency, reference, k).detach(), None
                if beta is None:
                    s_real, logits = out.saliency.detach(), out.logits.detach()
                else:
                    real = self._explain(x.detach(), labels, False, classes)
                    s_real, logits = real.saliency.detach(), real.logits.detach()
                return obj, precision_at_k(s_clean, s_real, k), logits.argmax(1) == pred0, g, s_real, logits

            if beta is None:
                obj0, g0 = gradient(xa0, clean)
            else:
                obj0, _, _, g0, _, _ = evaluate(x0)
            p0 = torch.ones(x0.shape[0], dtype=metric_dtype(s_clean), device=x0.device)
            best_x, best_p, best_obj = x0.clone(), p0.clone(), obj0.clone()
            best_s, best_logits = s_clean, logits0
            b = x0.shape[0]
            undone = torch.zeros(b, dtype=torch.long, device=x0.device)
            taken = torch.zeros_like(undone)
            for restart in range(self.restarts):
                if restart == 0 and x_init is not None:
                    start = self._project(x_init.detach().to(x0.dtype), x0)
                else:
                    start = self._start(x0, ids, restart)
                run = self._run(x0, start, (obj0, p0, g0, s_clean, logits0), evaluate, undone, taken)
                improved = _better(run[1], run[2], best_p, best_obj)
                best_x = _where(improved, run[0], best_x)
                best_p = torch.where(improved, run[1], best_p)
                best_obj = torch.where(improved, run[2], best_obj)
                best_s, best_logits = _where(improved, run[3], best_s), _where(improved, run[4], best_logits)
        self.clean_logits, self.p_at_k, self.objective = logits0, best_p, best_obj
        self.explanation = Explanation(best_s, best_logits)
        self.undone, self.flipped, self.steps_taken = undone, undone > 0, taken
        return best_x.detach()

    def _run(self, x0: Tensor, start: Tensor, clean: tuple[Tensor, ...], evaluate, undone: Tensor,
             taken: Tensor) -> tuple[Tensor, ...]:
        """One start: returns the run's best (x, P@k, J, real saliency, real logits) per sample;
        counts undone/accepted steps."""
        obj0, p0, g0, s0, l0 = clean
        if torch.equal(start, x0):
            obj, p, ok, g, sal, logits = obj0, p0, torch.ones_like(p0, dtype=torch.bool), g0, s0, l0
        else:
            obj, p, ok, g, sal, logits = evaluate(start)
        # the run's best starts as the clean image; a start that flips falls back to it
        start_better = ok & _better(p, obj, p0, obj0)
        ax, ag = _where(start_better, start, x0), _where(start_better, g, g0)
        ap, aobj = torch.where(start_better, p, p0), torch.where(start_better, obj, obj0)
        asal, alogits = _where(start_better, sal, s0), _where(start_better, logits, l0)
        x, grad = _where(ok, start, x0), _where(ok, g, g0)
        cur_obj = torch.where(ok, obj, obj0)
        x_prev = x
        eta = torch.full_like(p0, self._initial_step(x0[0].numel()), dtype=_step_dtype(x0.device))
        schedule = self.step_size is None
        checkpoints = dict(apgd_checkpoints(self.steps)) if schedule else {}
        increases = torch.zeros_like(undone)
        reduced_last = torch.zeros_like(ok)
        p_last, obj_last = ap.clone(), aobj.clone()
        fresh = torch.ones_like(ok)  # no momentum on the first step and after a restart
        for t in range(self.steps):
            z = self._project(x + self._direction(grad, eta), x0)
            if schedule:
                moved = self._project(x + ALPHA * (z - x) + (1 - ALPHA) * (x - x_prev), x0)
                x_new = _where(fresh, z, moved)
            else:
                x_new = z
            last = t == self.steps - 1
            obj, p, ok, g, sal, logits = evaluate(x_new, need_grad=not last)
            if g is None:
                g = grad
            undone += (~ok).long()
            taken += ok.long()
            increases += (ok & (obj > cur_obj)).long()
            improved = ok & _better(p, obj, ap, aobj)
            ax, ag = _where(improved, x_new, ax), _where(improved, g, ag)
            ap, aobj = torch.where(improved, p, ap), torch.where(improved, obj, aobj)
            asal, alogits = _where(improved, sal, asal), _where(improved, logits, alogits)
            # accepted steps move on; flipped ones go back to the best iterate with half the step
            x_prev = _where(ok, x, ax)
            x = _where(ok, x_new, ax)
            grad = _where(ok, g, ag)
            cur_obj = torch.where(ok, obj, aobj)
            eta = torch.where(ok, eta, eta / 2)
            fresh = ~ok
            if t + 1 in checkpoints:
                stalled = increases <= RHO * checkpoints[t + 1]
                unchanged = ~reduced_last & (ap == p_last) & (aobj == obj_last)
                halve = stalled | unchanged
                reduced_last, p_last, obj_last = halve, ap.clone(), aobj.clone()
                eta = torch.where(halve, eta / 2, eta)
                x, grad = _where(halve, ax, x), _where(halve, ag, grad)
                x_prev = _where(halve, ax, x_prev)
                cur_obj = torch.where(halve, aobj, cur_obj)
                fresh = fresh | halve
                increases = torch.zeros_like(increases)
        return ax, ap, aobj, asal, alogits

    # ------------------------------------------------------------------ the previous attack
    def _legacy_call(self, images: Tensor, labels: Tensor | None, ids: Tensor | None) -> Tensor:
        """First-flip attack: fixed step; a flipped sample returns its last unflipped iterate and stops."""
        x0 = images.detach()
        b, device = x0.shape[0], x0.device
        k = self._k(x0)
        step = torch.full((b,), self._initial_step(x0[0].numel()), dtype=_step_dtype(device), device=device)
        with eval_mode(self.model), torch.enable_grad():
            beta = self.surrogate = self._surrogate_for(x0)
            x_cur = self._start(x0, ids, 0).clone()
            pred0 = reference = None
            if beta is not None or not torch.equal(x_cur, x0):
                clean = self._explain(x0, labels, False, None)
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
                        logits = self.model(xa)
                else:
                    xa = xa.detach().requires_grad_(True)
                    with self._mode(beta):
                        out = self._explain(xa, lab, True, None if pred0 is None else pred0[idx])
                        if pred0 is None:  # t == 0 at the clean image: this pass is the clean pass
                            pred0 = out.logits.detach().argmax(1)
                            reference = self._reference(out.saliency.detach(), k)
                            self.clean_logits = out.logits.detach()
                        objective = self._ascent_objective(out.saliency, reference[idx], k)
                        (grad,) = torch.autograd.grad(objective.sum(), xa, allow_unused=True)
                    if beta is None:
                        logits = out.logits
                    else:
                        with torch.no_grad():
                            logits = self.model(xa)
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
                if grad is None:
                    grad = torch.zeros_like(xa)
                if good.numel():
                    rows = ok.nonzero().squeeze(1)
                    moved = x_cur[good] + self._direction(grad[rows].detach(), step[good])
                    x_cur[good] = self._project(moved, x0[good])
                    taken[good] += 1
        self.flipped, self.steps_taken, self.undone = flipped, taken, flipped.long()
        self.p_at_k = self.objective = self.explanation = None
        return x_keep.detach()

    forward = __call__

