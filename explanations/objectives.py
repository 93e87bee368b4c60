"""Training objectives: cross-entropy plus a regularizer (DESIGN §4), selectable by name.

Every objective is called as ``out = objective(model, x, y)`` on a batch of images in [0, 1] and
returns the scalar loss to backpropagate, the clean logits (for accuracy) and detached scalar terms
for logging. Cost: one forward pass and one graph-carrying input gradient are shared by CE and the
gap term; the curvature term adds exactly one more input gradient; the caller does one backward.

=============  ==========================================================
name           loss
=============  ==========================================================
vanilla        CE
r2et           CE + l_G R_G (pair set ``boundary`` or ``all``) + l_H R_H
r2et_noh       CE + l_G R_G                       (R2ET\\H)
r2et_mm        CE + l_G R_G (pair set ``minmax``) + l_H R_H
r2et_mm_noh    CE + l_G R_G (pair set ``minmax``) (R2ET-mm\\H)
est_h          CE + l_H R_H
grad_norm      CE + w ||g||^2
=============  ==========================================================

With ``adaptive=True`` each l_m = w_m (CE + 1) / |R_m| (detached), else l_m = w_m, where
w_m = ``weight_gap`` / ``weight_curvature`` when given, else ``weight``.

``OBJECTIVES`` maps each name to an :class:`ObjectiveEntry` (factory plus the metadata that
RobustClassifier and the CLI check: options, uses_k, k_option, double_backprop), filled by
:func:`register_objective` (``at`` is registered in :mod:`explanations.adversarial_training`).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explanations.regularizers import (
    adaptive_weight,
    capture_rng_state,
    check_pair_set,
    curvature_term,
    gap_term,
    grad_norm_term,
)
from explanations.saliency import (
    check_target,
    input_gradient,
    num_features,
    resolve_k,
    saliency_from_gradient,
)
from explanations.validation import check_pool


#: Smallest curvature step h whose finite difference survives bf16 autocast (docs/benchmarks.md).
AUTOCAST_MIN_H = 0.1


@dataclass
class ObjectiveOutput:
    """loss: scalar to backprop; logits: (B, K) of the clean forward; terms: detached scalars."""

    loss: Tensor
    logits: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


class Objective:
    """Base class: ``objective(model, x, y) -> ObjectiveOutput``."""

    name: str = "objective"
    double_backprop: bool = False

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        raise NotImplementedError

    def check_model(self, model: nn.Module) -> None:
        """Refuse (ValueError) a model this objective cannot train; called once when the
        classifier is built, before any step. The default accepts every model."""


class Vanilla(Objective):
    """Plain cross-entropy."""

    name = "vanilla"

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        return ObjectiveOutput(ce, logits, {"ce": ce.detach()})


def _check_weight(name: str, value: float | None) -> None:
    if value is not None and (not isinstance(value, (int, float)) or value < 0):
        raise ValueError(f"{name}={value!r} must be a non-negative number")


class _InputGradientObjective(Objective):
    """Shared first half: one forward with input gradients enabled, CE, graph-carrying g(x)."""

    double_backprop = True

    def __init__(self, target: str = "loss") -> None:
        check_target(target)
        self.target = target

    def _forward(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = x.detach().requires_grad_(True)
        out = input_gradient(model, x, y, self.target, create_graph=True)
        ce_per_sample = out.scalar if self.target == "loss" else F.cross_entropy(out.logits, y, reduction="none")
        return x, out.logits, ce_per_sample.mean(), out.grad


class ThicknessSurrogate(_InputGradientObjective):
    """R2ET family: CE + l_G R_G (optional) + l_H R_H (optional)."""

    def __init__(
        self,
        gap: bool = True,
        curvature: bool = True,
        k: int | float = 0.1,
        pair_set: str = "boundary",
        minmax_m: int | None = None,
        h: float = 1e-3,
        adaptive: bool = True,
        weight: float = 1.0,
        weight_gap: float | None = None,
        weight_curvature: float | None = None,
        target: str = "loss",
        pool: int | None = None,
        name: str = "r2et",
    ) -> None:
        super().__init__(target)
        if not (gap or curvature):
            raise ValueError("a thickness surrogate needs the gap term, the curvature term, or both")
        check_pair_set(pair_set)
        for label, value in (("weight", weight), ("weight_gap", weight_gap), ("weight_curvature", weight_curvature)):
            _check_weight(label, value)
        if not h > 0:
            raise ValueError(f"h={h!r} must be a positive finite-difference step")
        check_pool(pool)
        self.gap, self.curvature = gap, curvature
        self.k, self.pair_set, self.minmax_m, self.h = k, pair_set, minmax_m, h
        self.adaptive, self.pool, self.name = adaptive, pool, name
        self.weight_gap = weight if weight_gap is None else weight_gap
        self.weight_curvature = weight if weight_curvature is None else weight_curvature

    #: Optional ``reduce_stats(t) -> t``: averages the detached batch statistics behind the
    #: adaptive weights, the vector (CE, R_G, R_H), across data-parallel ranks (one all-reduce per
    #: step), so that every rank uses the weights of the global batch. RobustClassifier sets it
    #: under DDP (``sync_adaptive: true``); None (the default) uses the local batch.
    reduce_stats: Callable[[Tensor], Tensor] | None = None

    _warned_autocast = False

    def _check_autocast_h(self, x: Tensor) -> None:
        """Warn once when the curvature finite difference is below the autocast dtype's resolution."""
        if self._warned_autocast or self.h >= AUTOCAST_MIN_H or not torch.is_autocast_enabled(x.device.type):
            return
        self._warned_autocast = True
        dtype = torch.get_autocast_dtype(x.device.type)
        warnings.warn(
            f"{self.name}: the curvature term (g(x + h u) - g(x)) / h with h={self.h} runs under "
            f"{dtype} autocast, whose rounding (~4e-3 relative for bfloat16) swamps a step that small: "
            f"R_H becomes rounding noise (measured ~30x its fp32 value at h=1e-3, within 6% at "
            f"h=0.1). Use h >= {AUTOCAST_MIN_H} with mixed precision, or precision 32-true.",
            UserWarning,
            stacklevel=3,
        )

    def _lambdas(self, ce: Tensor, bases: list[float], values: list[Tensor]) -> list[Tensor]:
        if not self.adaptive:
            return [torch.as_tensor(b, dtype=v.dtype, device=v.device) for b, v in zip(bases, values)]
        stats = torch.stack([ce.detach(), *(v.detach() for v in values)])
        if self.reduce_stats is not None:
            stats = self.reduce_stats(stats)
        return [adaptive_weight(b, stats[0], stats[i + 1]) for i, b in enumerate(bases)]

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        # the curvature pass replays the generators of the clean pass: same dropout masks
        rng_state = capture_rng_state(x.device) if self.curvature and model.training else None
        x, logits, ce, grad = self._forward(model, x, y)
        names: list[str] = []
        bases: list[float] = []
        values: list[Tensor] = []
        if self.gap:
            s = saliency_from_gradient(grad, self.pool)
            k = resolve_k(self.k, num_features(*x.shape[-2:], self.pool))
            names.append("gap")
            bases.append(self.weight_gap)
            values.append(gap_term(s, k, self.pair_set, self.minmax_m).mean())
        if self.curvature:
            self._check_autocast_h(x)
            names.append("curvature")
            bases.append(self.weight_curvature)
            values.append(curvature_term(model, x, y, grad, self.h, self.target, rng_state).mean())
        loss = ce
        terms: dict[str, Tensor] = {"ce": ce.detach()}
        for name, value, lam in zip(names, values, self._lambdas(ce, bases, values)):
            loss = loss + lam * value
            terms.update({name: value.detach(), f"lambda_{name}": lam.detach()})
            if name == "gap":
                terms["topk_margin"] = -value.detach()
        terms["loss"] = loss.detach()
        return ObjectiveOutput(loss, logits, terms)


class GradientNorm(_InputGradientObjective):
    """Double backprop (Drucker & LeCun; Ross & Doshi-Velez): CE + w ||g(x)||^2."""

    name = "grad_norm"

    def __init__(self, weight: float = 1.0, target: str = "loss") -> None:
        super().__init__(target)
        _check_weight("weight", weight)
        self.weight = weight

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        _, logits, ce, grad = self._forward(model, x, y)
        norm = grad_norm_term(grad).mean()
        loss = ce + self.weight * norm
        return ObjectiveOutput(loss, logits, {"ce": ce.detach(), "grad_norm": norm.detach(), "loss": loss.detach()})


#: The objective settings every factory is offered: the top-level ``model.*`` arguments of
#: RobustClassifier (an objective takes those it knows); anything else is an objective option.
SHARED_SETTINGS: tuple[str, ...] = (
    "k", "pair_set", "minmax_m", "h", "adaptive", "weight", "weight_gap", "weight_curvature", "target", "pool",
)


@dataclass(frozen=True)
class ObjectiveEntry:
    """A registered objective and its metadata (read by RobustClassifier and the CLI).

    factory: ``factory(**config) -> Objective``, given the shared settings and the options
        (it takes those it knows). options: the ``model.objective_kwargs`` keys it takes (every
        other key is refused). uses_k: it reads ``k`` (checked against the image size).
        k_option: the option that replaces ``k`` for it when given (checked the same way).
        double_backprop: its loss differentiates an input gradient (no fp16, no SyncBatchNorm,
        no torch.compile).
    """

    name: str
    factory: Callable[..., Objective]
    options: tuple[str, ...] = ()
    uses_k: bool = False
    k_option: str | None = None
    double_backprop: bool = False


#: name -> :class:`ObjectiveEntry`, filled by :func:`register_objective`.
OBJECTIVES: dict[str, ObjectiveEntry] = {}


def _class_factory(cls: type[Objective]) -> Callable[..., Objective]:
    """``cls(**the config keys its constructor takes)``."""
    takes = set(inspect.signature(cls).parameters)
    return lambda **config: cls(**{key: value for key, value in config.items() if key in takes})


def register_objective(
    name: str,
    factory: Callable[..., Objective] | None = None,
    *,
    options: Sequence[str] | None = None,
    uses_k: bool | None = None,
    k_option: str | None = None,
    double_backprop: bool | None = None,
):
    """Register an objective under ``name``, as a call or as a decorator (of a factory function
    or of an :class:`Objective` subclass):

        register_objective("mine", build_mine, options=("alpha",), uses_k=True, double_backprop=True)

        @register_objective("mine")
        class Mine(Objective): ...

    For a class, the factory passes the config keys its constructor takes, and the metadata
    default to its signature: options = its parameters that are not ``SHARED_SETTINGS``, uses_k =
    it takes ``k``, double_backprop = its class attribute. For a function they default to
    none / False. The built objective must agree on ``double_backprop`` (:func:`build_objective`).
    """

    def add(target: Callable[..., Objective]) -> Callable[..., Objective]:
        is_class = isinstance(target, type)
        params = set(inspect.signature(target).parameters) if is_class else set()
        OBJECTIVES[name] = ObjectiveEntry(
            name=name,
            factory=_class_factory(target) if is_class else target,
            options=tuple(options) if options is not None else tuple(sorted(params - set(SHARED_SETTINGS))),
            uses_k=bool(uses_k) if uses_k is not None else "k" in params,
            k_option=k_option,
            double_backprop=(bool(double_backprop) if double_backprop is not None
                             else bool(getattr(target, "double_backprop", False)) if is_class else False),
        )
        return target

    return add if factory is None else add(factory)


def _thickness(name: str, **fixed: object) -> None:
    """Register the R2ET-family member ``name``: ThicknessSurrogate with ``fixed`` settings."""
    def factory(**config: object) -> ThicknessSurrogate:
        return ThicknessSurrogate(name=name, **{**{a: config[a] for a in SHARED_SETTINGS if a in config}, **fixed})

    register_objective(name, factory, uses_k=bool(fixed["gap"]), double_backprop=True)


register_objective("vanilla", Vanilla)
_thickness("r2et", gap=True, curvature=True)
_thickness("r2et_noh", gap=True, curvature=False)
_thickness("r2et_mm", gap=True, curvature=True, pair_set="minmax")
_thickness("r2et_mm_noh", gap=True, curvature=False, pair_set="minmax")
_thickness("est_h", gap=False, curvature=True)
register_objective("grad_norm", GradientNorm)


def objective_entry(name: str) -> ObjectiveEntry:
    """``OBJECTIVES[name]`` with a clear error naming the valid names."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective={name!r} is not known; valid: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def build_objective(name: str, **config) -> Objective:
    """Build the objective ``name`` from the shared config keys (unused keys are ignored)."""
    entry = objective_entry(name)
    objective = entry.factory(**config)
    if bool(getattr(objective, "double_backprop", False)) != entry.double_backprop:
        raise ValueError(
            f"objective {name!r} is registered with double_backprop={entry.double_backprop} but builds "
            f"{type(objective).__name__} with double_backprop={objective.double_backprop}; register it with "
            f"double_backprop={objective.double_backprop}"
        )
    return objective
