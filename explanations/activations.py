"""ReLU-type activations -> Softplus(beta): the one home for the swap, for modules and calls alike.

Used by Softplus training (SP, ``activation: softplus``) and by the attacks' surrogate gradients
(Dombrowski et al. 2019: the saliency of a piecewise-linear network has zero input derivative
almost everywhere, so gradient attacks on it need a smooth stand-in).

ReLU-type = ``relu``, ``relu6``, ``leaky_relu``, ``prelu``, ``rrelu``, ``elu``, ``celu`` (and
``hardtanh(0, 6)``, which is how ``nn.ReLU6`` computes), whether called as a module
(``nn.ReLU``...), a function (``F.relu``, ``torch.relu``, ``x.relu()``, ``relu_``...) or a function
held as a module attribute (timm's ``act_fn``). Each becomes ``softplus(x, beta)``.

- :class:`SoftplusMode` is a ``TorchFunctionMode``: inside ``with SoftplusMode(beta):`` every
  ReLU-type call computes softplus instead (in-place variants write into their input). Nothing is
  copied or modified; this is what the attack surrogate uses.
- :func:`trace_activations` runs one forward pass (eval mode, no grad, mode restored) and lists the
  ReLU-type calls and the smooth nonlinearities it saw, by calling module.
- :func:`swap_activations` makes the swap persistent in place (SP training): ReLU-type modules
  become ``nn.Softplus(beta)``, function attributes a softplus function, and ReLU calls written in
  ``forward`` code are caught by a :class:`SoftplusMode` entered around the model's forward
  (forward hooks; no change to the state dict). It refuses a model with nothing to swap.
- :func:`resolve_surrogate` turns a surrogate setting (``None``, a beta, ``"auto"``) into a beta
  or ``None`` for a given model.

Examples:
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    >>> x = torch.rand(1, 3, 8, 8)
    >>> trace_activations(model, x).relu
    ['1 (relu)']
    >>> with SoftplusMode(10.0):
    ...     smooth_logits = model(x)
    >>> report = swap_activations(model, beta=10.0, example=x)
    >>> report["modules"]
    ['1 (ReLU)']
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
from collections import Counter
from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from explanations.validation import check_positive

__all__ = [
    "DEFAULT_SURROGATE_BETA",
    "RELU_MODULES",
    "ActivationTrace",
    "SoftplusMode",
    "check_beta",
    "example_input",
    "resolve_surrogate",
    "swap_activations",
    "trace_activations",
    "traces_reused",
]

#: Softplus beta of the attack surrogate under ``surrogate_beta: auto``.
DEFAULT_SURROGATE_BETA = 10.0

#: Activation modules swapped by :func:`swap_activations` (``nn.ReLU6`` subclasses ``Hardtanh``;
#: other ``Hardtanh`` ranges are left alone and reported as kinked).
RELU_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU,
)


def _unique(fns: list[Any]) -> tuple[Any, ...]:
    out: list[Any] = []
    for f in fns:
        if f is not None and not any(f is g for g in out):
            out.append(f)
    return tuple(out)


# Function-level ReLU-type calls (what modules call, what user code calls).
_RELU_OUT_OF_PLACE = _unique([
    F.relu, torch.relu, torch.Tensor.relu, F.relu6, F.leaky_relu, F.prelu, torch.prelu, F.rrelu,
    F.elu, F.celu, torch.celu, getattr(torch._C._nn, "relu6", None), getattr(torch._C._nn, "leaky_relu", None),
    getattr(torch._C._nn, "elu", None),
])
_RELU_IN_PLACE = _unique([
    F.relu_, torch.relu_, torch.Tensor.relu_, F.leaky_relu_, F.rrelu_, F.elu_, torch.celu_,
    getattr(F, "celu_", None), getattr(torch._C._nn, "leaky_relu_", None), getattr(torch._C._nn, "elu_", None),
])
_HARDTANH = _unique([F.hardtanh, getattr(torch._C._nn, "hardtanh", None)])
_HARDTANH_IN_PLACE = _unique([F.hardtanh_, getattr(torch._C._nn, "hardtanh_", None)])

# Smooth nonlinearities (their presence makes a model not piecewise linear).
_SMOOTH = _unique([
    F.gelu, F.silu, F.mish, F.softplus, F.selu, F.sigmoid, torch.sigmoid, torch.Tensor.sigmoid,
    F.tanh, torch.tanh, torch.Tensor.tanh, F.softmax, torch.softmax, torch.Tensor.softmax,
    F.log_softmax, torch.exp, torch.Tensor.exp, torch.erf, torch.Tensor.erf, F.logsigmoid,
    getattr(F, "scaled_dot_product_attention", None),
])
# Kinked but not swapped (reported so the trace says what it saw).
_KINKED = _unique([F.hardswish, F.hardsigmoid, torch.abs, torch.Tensor.abs, torch.maximum, torch.minimum])

_NAME_CACHE: dict[int, str] = {}


def _name(func: Any) -> str:
    key = id(func)
    if key not in _NAME_CACHE:
        _NAME_CACHE[key] = getattr(func, "__name__", None) or repr(func)
    return _NAME_CACHE[key]


def _in(func: Any, group: tuple[Any, ...]) -> bool:
    return any(func is f for f in group)


# Position of the ``inplace`` argument of the functional ReLU-type calls that have one.
_INPLACE_POS = {"relu": 1, "relu6": 1, "leaky_relu": 2, "elu": 2, "celu": 2, "rrelu": 4}


def _relu_kind(func: Any, args: tuple, kwargs: dict) -> Literal["out", "in", None]:
    """Whether a call is ReLU-type: 'out' (returns a new tensor), 'in' (in place) or None."""
    if _in(func, _RELU_OUT_OF_PLACE):
        pos = _INPLACE_POS.get(_name(func))
        inplace = kwargs.get("inplace", args[pos] if pos is not None and len(args) > pos else False)
        return "in" if inplace is True else "out"
    if _in(func, _RELU_IN_PLACE):
        return "in"
    hard = _in(func, _HARDTANH)
    if hard or _in(func, _HARDTANH_IN_PLACE):
        lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
        hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
        if float(lo) == 0.0 and float(hi) == 6.0:
            inplace = (not hard) or kwargs.get("inplace", args[3] if len(args) > 3 else False) is True
            return "in" if inplace else "out"
    return None


def check_beta(beta: Any, what: str = "softplus_beta") -> float:
    """``beta`` as a positive finite float, else ValueError naming ``what`` and the value."""
    return check_positive(beta, what)


class SoftplusMode(TorchFunctionMode):
    """Inside this context every ReLU-type call computes ``softplus(x, beta)`` instead.

    ``F.relu(x)``, ``torch.relu(x)``, ``x.relu()``, ``nn.ReLU()(x)``, ``F.relu6``, ``F.leaky_relu``,
    ``nn.ReLU6`` (= ``hardtanh(x, 0, 6)``), ``F.prelu``, ``F.rrelu``, ``F.elu``, ``F.celu`` and
    their in-place forms (``relu_``, ``inplace=True``), which overwrite their input with the
    softplus value as the original would. Every other call runs unchanged. Works on any model,
    copies nothing; gradients flow through the softplus (``1/beta * log(1 + exp(beta x))``).

    Args:
        beta: softplus sharpness (> 0); larger is closer to ReLU.

    Examples:
        >>> with SoftplusMode(10.0):
        ...     y = F.relu(torch.zeros(2))       # = log(2) / 10
    """

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = check_beta(beta, "beta")
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _relu_kind(func, args, kwargs) if args else None
        if kind is None:
            return func(*args, **kwargs)
        self.calls += 1
        x = args[0]
        if kind == "out":
            return F.softplus(x, beta=self.beta)
        # In place: softplus saves its own copy of the input, then the input is overwritten.
        return x.copy_(F.softplus(x.clone(), beta=self.beta))


# --------------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------------


@dataclass
class ActivationTrace:
    """What one forward pass called: ``"<module path> (<function>)"`` entries, counted once each.

    Attributes:
        relu: ReLU-type calls (swappable). smooth: smooth nonlinearities (gelu, silu, softplus,
        sigmoid, tanh, softmax, exp, ...). kinked: other kinks seen (hardswish, abs, max...).
    """

    relu: list[str] = field(default_factory=list)
    smooth: list[str] = field(default_factory=list)
    kinked: list[str] = field(default_factory=list)

    @property
    def piecewise_linear(self) -> bool:
        """True when the pass had ReLU-type calls and no smooth nonlinearity."""
        return bool(self.relu) and not self.smooth

    def describe(self, limit: int = 4) -> str:
        def short(items: list[str]) -> str:
            more = f", ... ({len(items)} in all)" if len(items) > limit else ""
            return ", ".join(items[:limit]) + more

        parts = [f"ReLU-type: {short(self.relu) or 'none'}"]
        if self.smooth:
            parts.append(f"smooth: {short(sorted({s.rsplit(' (', 1)[-1][:-1] for s in self.smooth}))}")
        return "; ".join(parts)


class _TraceMode(TorchFunctionMode):
    def __init__(self, where: list[str]) -> None:
        super().__init__()
        self.where = where
        self.found: dict[str, Counter] = {"relu": Counter(), "smooth": Counter(), "kinked": Counter()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        here = self.where[-1] if self.where else "<root>"
        if args and _relu_kind(func, args, kwargs) is not None:
            self.found["relu"][f"{here} ({_name(func)})"] += 1
        elif _in(func, _SMOOTH):
            self.found["smooth"][f"{here} ({_name(func)})"] += 1
        elif _in(func, _KINKED) or (_in(func, _HARDTANH + _HARDTANH_IN_PLACE)):
            self.found["kinked"][f"{here} ({_name(func)})"] += 1
        return func(*args, **kwargs)


_TRACES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("activation_traces", default=None)


@contextlib.contextmanager
def traces_reused() -> Iterator[None]:
    """Inside the block, :func:`trace_activations` traces a model once per input shape, dtype and
    device and reuses that trace (an evaluation resolves every attack's surrogate from one trace,
    not one per batch, budget and member). Leave the block before changing the model's activations."""
    token = _TRACES.set({} if _TRACES.get() is None else _TRACES.get())
    try:
        yield
    finally:
        _TRACES.reset(token)


def trace_activations(model: nn.Module, example: Tensor) -> ActivationTrace:
    """Run ``model(example[:1])`` once (eval mode, no grad, modes restored) and list its activations.

    Args:
        model: any module. example: an input batch (only the first item is used).
    Returns:
        :class:`ActivationTrace` with the calls, each named by the innermost calling module
        (inside :func:`traces_reused`, the model's earlier trace for this input kind).
    """
    cache = _TRACES.get()
    key = (id(model), tuple(example.shape[1:]), example.dtype, example.device)
    if cache is not None and key in cache and cache[key][0] is model:
        return cache[key][1]
    trace = _trace(model, example)
    if cache is not None:
        cache[key] = (model, trace)
    return trace


def _trace(model: nn.Module, example: Tensor) -> ActivationTrace:
    where: list[str] = []
    names = {id(m): n or "<root>" for n, m in model.named_modules()}
    handles = []

    def enter(module: nn.Module, args: Any) -> None:
        where.append(names.get(id(module), "?"))

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        where.pop()

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave, always_call=True))
    modes = [(m, m.training) for m in model.modules()]
    mode = _TraceMode(where)
    try:
        model.eval()
        with torch.no_grad(), mode:
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
        for m, flag in modes:
            m.training = flag
    return ActivationTrace(
        relu=list(mode.found["relu"]), smooth=list(mode.found["smooth"]), kinked=list(mode.found["kinked"])
    )


def example_input(model: nn.Module, in_chans: int | None = None) -> Tensor | None:
    """A (1, C, H, W) input in [0, 1] for tracing: H, W from a ViT-style ``patch_embed.img_size``
    (timm keeps the 224 px ``pretrained_cfg`` when built with another ``img_size``), else from the
    timm ``pretrained_cfg`` (``input_size``), else 32 x 32; C = ``in_chans`` (or the config's, or
    the first conv's)."""
    gen = torch.Generator().manual_seed(0)
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(size, (tuple, list)) and len(size) == 2:
        c = in_chans if in_chans is not None else getattr(getattr(model, "patch_embed", None), "in_chans", 3)
        return torch.rand(1, int(c), int(size[0]), int(size[1]), generator=gen)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if size is not None and len(size) == 3:
        c, h, w = (int(v) for v in size)
        if in_chans is not None:
            c = in_chans
        return torch.rand(1, c, h, w, generator=gen)
    if in_chans is None:
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            return None
        in_chans = conv.in_channels
    return torch.rand(1, in_chans, 32, 32, generator=gen)


# --------------------------------------------------------------------------------------------
# Persistent swap (SP training)
# --------------------------------------------------------------------------------------------


class _SoftplusFn:
    """Softplus in place of a ReLU-type function held as a module attribute (timm's ``act_fn``)."""

    def __init__(self, beta: float) -> None:
        self.beta = beta

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return F.softplus(x, beta=self.beta)

    def __repr__(self) -> str:
        return f"softplus(beta={self.beta})"


def _is_relu_function(obj: Any) -> bool:
    if isinstance(obj, functools.partial):
        obj = obj.func
    return _in(obj, _RELU_OUT_OF_PLACE + _RELU_IN_PLACE)


_HOOK_STATE = threading.local()


def _enter_mode(beta: float) -> Callable:
    def pre_hook(module: nn.Module, args: Any) -> None:
        stack = getattr(_HOOK_STATE, "stack", None)
        if stack is None:
            stack = _HOOK_STATE.stack = []
        mode = SoftplusMode(beta)
        mode.__enter__()
        stack.append(mode)

    return pre_hook


def _exit_mode(module: nn.Module, args: Any, output: Any) -> None:
    _HOOK_STATE.stack.pop().__exit__(None, None, None)


def _install_mode_hooks(model: nn.Module, beta: float) -> None:
    if getattr(model, "_softplus_mode_beta", None) is not None:
        return
    model.register_forward_pre_hook(_enter_mode(beta))
    model.register_forward_hook(_exit_mode, always_call=True)
    model._softplus_mode_beta = beta


def swap_activations(model: nn.Module, beta: float, example: Tensor | None = None) -> dict[str, Any]:
    """Make ``model`` compute Softplus(beta) wherever it computed a ReLU-type activation (in place).

    Modules in :data:`RELU_MODULES` become ``nn.Softplus(beta)`` (a module shared by several
    parents maps to one shared Softplus), ReLU-type function attributes a softplus function, and
    ReLU-type calls in ``forward`` code (``F.relu(x)``, ``x.relu_()``) are caught by a
    :class:`SoftplusMode` around ``model``'s forward (hooks; the state dict is unchanged).

    Args:
        model: any module. beta: softplus sharpness (> 0).
        example: an input for the traced forward (default: :func:`example_input`). Without a
            traceable input only modules and attributes are swapped, and a model whose code calls
            ReLU-type functions is refused.
    Returns:
        ``{"modules": [...], "attributes": [...], "functional": [...], "hooked": bool}`` naming what
        was swapped.
    Raises:
        ValueError: nothing to swap (the message names the model and the activations it has).
    """
    beta = check_beta(beta)
    what = type(model).__name__
    modules: list[str] = []
    attributes: list[str] = []
    replaced: dict[int, nn.Module] = {}
    for parent_name, module in list(model.named_modules()):
        for name, child in list(module._modules.items()):
            if child is not None and isinstance(child, RELU_MODULES):
                new = replaced.get(id(child))
                if new is None:
                    new = replaced[id(child)] = nn.Softplus(beta=beta)
                setattr(module, name, new)
                modules.append(f"{parent_name + '.' if parent_name else ''}{name} ({type(child).__name__})")
        for name, value in list(vars(module).items()):
            if not name.startswith("__") and _is_relu_function(value):
                setattr(module, name, _SoftplusFn(beta))
                attributes.append(f"{parent_name or '<root>'}.{name} ({_name(value)})")
    if example is None:
        try:
            example = example_input(model)
        except Exception:  # pragma: no cover - defensive
            example = None
    functional: list[str] = []
    trace = None
    if example is not None:
        try:
            trace = trace_activations(model, example)
        except Exception as exc:
            if not (modules or attributes):
                raise ValueError(
                    f"activation: softplus on {what}: cannot trace its forward on an input of shape "
                    f"{tuple(example.shape)} ({exc}); give an example input"
                ) from exc
    if trace is not None and trace.relu:
        functional = list(trace.relu)
        _install_mode_hooks(model, beta)
        left = trace_activations(model, example).relu
        if left:  # pragma: no cover - would be a bug in SoftplusMode
            raise RuntimeError(f"ReLU-type calls left after the Softplus swap on {what}: {left}")
    if not (modules or attributes or functional):
        seen = trace.describe() if trace is not None else "no ReLU-type module or attribute"
        raise ValueError(
            f"activation: softplus has no effect on {what}: it has no ReLU-type activation to swap "
            f"({seen}); use activation: relu (the model's own activations) with this backbone"
        )
    return {"modules": modules, "attributes": attributes, "functional": functional,
            "hooked": bool(functional)}


# --------------------------------------------------------------------------------------------
# Attack surrogate
# --------------------------------------------------------------------------------------------


def resolve_surrogate(model: nn.Module, surrogate_beta: float | str | None, example: Tensor) -> float | None:
    """The Softplus beta an attack should take gradients with on ``model``, or None.

    ``None``: no surrogate. ``"auto"``: :data:`DEFAULT_SURROGATE_BETA` when ``model`` has ReLU-type
    activations (fully or partly piecewise linear, where saliency gradients vanish), else None.
    A number: that beta; refused (ValueError naming the model) when the model has no ReLU-type
    activation, since the surrogate would change nothing.
    """
    if surrogate_beta is None:
        return None
    if isinstance(surrogate_beta, str):
        if surrogate_beta != "auto":
            raise ValueError(f"surrogate_beta={surrogate_beta!r} is not valid; use a positive number, 'auto' or None")
        return DEFAULT_SURROGATE_BETA if trace_activations(model, example).relu else None
    beta = check_beta(surrogate_beta, "surrogate_beta")
    trace = trace_activations(model, example)
    if not trace.relu:
        raise ValueError(
            f"surrogate_beta={surrogate_beta!r} has no effect on {type(model).__name__}: it has no "
            f"ReLU-type activation ({trace.describe()}); use surrogate_beta: auto or null"
        )
    return beta
