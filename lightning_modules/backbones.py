"""Backbone builder: any timm model (or the CIFAR ResNet-9 registered here) behind a
normalization layer, optionally with ReLU-type activations swapped for Softplus.

Conventions (DESIGN §3): the returned model takes images in [0, 1] of shape (B, C, H, W) and
returns logits of shape (B, num_classes); mean/std normalization is its first layer. Fused
scaled-dot-product attention is switched off so that double backprop works.

Importing this module registers ``resnet9`` (and, from ``cifar_resnet``, the CIFAR ResNets
``resnet20/32/44/56/110``) in timm's model registry, so ``timm.create_model("resnet9",
num_classes=10)`` works afterwards.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from explanations.activations import check_beta, example_input, swap_activations
from lightning_modules import cifar_resnet  # noqa: F401  (registers resnet20/32/44/56/110)
from lightning_modules.checkpoints import load_backbone_weights
from lightning_modules.pooled_head import PooledLinearClassifier

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "Normalize",
    "NormalizedClassifier",
    "ResNet9",
    "SelectOutput",
    "build_backbone",
    "check_backbone_output",
    "check_pending_output",
    "disable_fused_attention",
    "load_backbone_weights",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

ACTIVATIONS = ("relu", "softplus")

# --------------------------------------------------------------------------------------------
# Normalization wrapper
# --------------------------------------------------------------------------------------------


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel. Buffers ``mean`` and ``std`` have shape (1, C, 1, 1).

    Input (B, C, H, W) in pixel space [0, 1]; output of the same shape.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(tuple(float(m) for m in mean), dtype=torch.float32)
        std_t = torch.as_tensor(tuple(float(s) for s in std), dtype=torch.float32)
        if mean_t.ndim != 1 or mean_t.shape != std_t.shape or mean_t.numel() == 0:
            raise ValueError(
                f"mean and std must be non-empty sequences of equal length, got mean={tuple(mean)} "
                f"and std={tuple(std)}"
            )
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be positive, got std={tuple(std)}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean = tuple(round(v, 4) for v in self.mean.flatten().tolist())
        std = tuple(round(v, 4) for v in self.std.flatten().tolist())
        return f"mean={mean}, std={std}"


class NormalizedClassifier(nn.Module):
    """``backbone(normalize(x))``: images (B, C, H, W) in [0, 1] -> logits (B, num_classes).

    Submodules: ``normalize`` (:class:`Normalize`) and ``backbone`` (the timm model or
    ``nn.Module``; a :class:`SelectOutput` holding it when ``output_key`` is set).
    """

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))

    @property
    def num_classes(self) -> int:
        """Number of output logits of the backbone."""
        return int(getattr(self.backbone, "num_classes", -1))

    @property
    def pretrained_cfg(self) -> dict:
        """The backbone's timm ``pretrained_cfg`` (empty dict if it has none)."""
        return dict(getattr(self.backbone, "pretrained_cfg", {}) or {})


# --------------------------------------------------------------------------------------------
# Backbones whose forward returns a tuple, a dict or an output object
# --------------------------------------------------------------------------------------------


def select_output(out: Any, key: int | str) -> Any:
    """The logits inside a backbone's output: ``out[key]`` for a tuple/list (``key`` an index; a
    digit string counts as one) or a mapping (Hugging Face style ``{"logits": ...}``), else
    ``out.<key>`` (an object such as a Hugging Face ``ModelOutput``). A Tensor is returned as is."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        return out[key]
    if isinstance(out, (tuple, list)) and (isinstance(key, int) or key.lstrip("-").isdigit()):
        return out[int(key)]
    return getattr(out, key)


class SelectOutput(nn.Module):
    """``select_output(backbone(x), output_key)``: images (B, C, H, W) -> logits (B, num_classes)
    for a backbone that returns a tuple, a dict or an object holding them (``model.output_key``).

    The backbone is the submodule ``backbone`` (state-dict keys gain a ``backbone.`` prefix);
    other attributes (``num_classes``, ``pretrained_cfg``, ``get_classifier``, ...) are read from
    it. A Tensor output (e.g. a model that returns auxiliary outputs in training mode only) is
    passed through.
    """

    def __init__(self, backbone: nn.Module, output_key: int | str) -> None:
        super().__init__()
        self.backbone = backbone
        self.output_key = output_key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return select_output(self.backbone(x), self.output_key)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "backbone":
                raise
            return getattr(self.backbone, name)

    def extra_repr(self) -> str:
        return f"output_key={self.output_key!r}"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor {tuple(value.shape)}"
    return type(value).__name__


def describe_output(out: Any, limit: int = 6) -> str:
    """What a forward returned, for messages: type with the keys / length / attributes and shapes."""
    kind = type(out).__name__
    a = "an" if kind[:1].lower() in "aeiou" else "a"
    if isinstance(out, torch.Tensor):
        return f"a Tensor of shape {tuple(out.shape)}"
    if isinstance(out, Mapping):
        items = [f"{k!r}: {_describe(v)}" for k, v in list(out.items())[:limit]]
        more = ", ..." if len(out) > limit else ""
        return f"{a} {kind} with keys {{{', '.join(items)}{more}}}"
    if isinstance(out, (tuple, list)):
        fields = getattr(out, "_fields", None)
        names = [f"{f!r}" for f in fields] if fields else [f"[{i}]" for i in range(len(out))]
        items = [f"{n}: {_describe(v)}" for n, v in list(zip(names, out))[:limit]]
        more = ", ..." if len(out) > limit else ""
        return f"{a} {kind} of {len(out)} ({', '.join(items)}{more})"
    attrs = {k: v for k, v in vars(out).items() if not k.startswith("_")} if hasattr(out, "__dict__") else {}
    if attrs:
        items = [f"{k}: {_describe(v)}" for k, v in list(attrs.items())[:limit]]
        more = ", ..." if len(attrs) > limit else ""
        return f"{a} {kind} with attributes ({', '.join(items)}{more})"
    return f"{a} {kind}"


def _suggest_key(out: Any, num_classes: int) -> int | str | None:
    """The key of the first (1, num_classes) tensor in a tuple/dict/object output ("logits" first),
    else None."""
    if isinstance(out, Mapping):
        items = list(out.items())
    elif isinstance(out, (tuple, list)):
        items = list(enumerate(out))
    else:
        items = [(k, v) for k, v in vars(out).items() if not k.startswith("_")] if hasattr(out, "__dict__") else []
    items.sort(key=lambda kv: kv[0] != "logits")
    for key, value in items:
        if isinstance(value, torch.Tensor) and value.ndim == 2 and (num_classes == 0 or value.shape[-1] == num_classes):
            return key
    return None


class BackboneProbeError(RuntimeError):
    """The probe forward itself failed (e.g. the example input does not fit the model)."""


def check_backbone_output(
    model: nn.Module, example: torch.Tensor, num_classes: int, name: str, output_key: int | str | None = None
) -> None:
    """Refuse a backbone whose output is not logits (B, num_classes), naming what it returned.

    One forward of ``example`` (one image, (1, C, H, W)) in eval mode under ``torch.no_grad``;
    every module's training flag is restored (BatchNorm running statistics are not updated in
    eval mode). ``model`` is the built classifier (with its :class:`SelectOutput` when
    ``output_key`` is set). Raises ValueError with the fix (``model.output_key`` for a tuple,
    dict or output object; ``num_classes`` for another number of logits), or
    :class:`BackboneProbeError` when the forward raises.
    """
    inner = model.backbone if isinstance(model, NormalizedClassifier) else model
    raw_module = inner.backbone if isinstance(inner, SelectOutput) else inner
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            x = model.normalize(example) if isinstance(model, NormalizedClassifier) else example
            raw = raw_module(x)
    except Exception as exc:
        raise BackboneProbeError(
            f"backbone {name!r}: its forward failed on an example input of shape {tuple(example.shape)} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
        ) from exc
    finally:
        for m, flag in modes:
            m.training = flag
    returned = describe_output(raw)
    want = f"(B, {num_classes})" if num_classes else "(B, num_features)"
    if output_key is not None:
        if isinstance(raw, torch.Tensor):
            warnings.warn(
                f"backbone {name!r} returns {returned} in eval mode, so output_key={output_key!r} does not "
                "apply there (it applies where the backbone returns a tuple, dict or output object, e.g. "
                "in training mode); remove output_key if it never does",
                UserWarning,
                stacklevel=3,
            )
        try:
            out = select_output(raw, output_key)
        except (KeyError, IndexError, AttributeError, TypeError) as exc:
            suggestion = _suggest_key(raw, num_classes)
            hint = f"; use output_key: {suggestion}" if suggestion is not None else ""
            raise ValueError(
                f"backbone {name!r} returns {returned}; output_key={output_key!r} selects nothing in it "
                f"({type(exc).__name__}: {exc}){hint}"
            ) from None
        source = f"its output[{output_key!r}]"
    else:
        out, source = raw, "it"
    if not isinstance(out, torch.Tensor):
        if output_key is None:
            suggestion = _suggest_key(raw, num_classes)
            fix = (f"set model.output_key: {suggestion} (RobustClassifier(output_key={suggestion!r})) to take the "
                   "logits from it" if suggestion is not None else "make its forward return the logits tensor")
            raise ValueError(
                f"backbone {name!r} returns {returned}, not a logits tensor {want}; {fix}"
            )
        raise ValueError(
            f"backbone {name!r} returns {returned}; output_key={output_key!r} selects {describe_output(out)}, "
            f"not a logits tensor {want}"
        )
    if out.ndim != 2 or out.shape[0] != example.shape[0]:
        binary = (" (one value per image: for two classes return two logits and set num_classes: 2)"
                  if out.ndim == 1 else "")
        raise ValueError(
            f"backbone {name!r}: {source} has shape {tuple(out.shape)} for an input of shape "
            f"{tuple(example.shape)}; RobustClassifier needs logits of shape {want}{binary}"
        )
    if num_classes and out.shape[1] != num_classes:
        raise ValueError(
            f"backbone {name!r}: {source} has {out.shape[1]} logits per image (shape {tuple(out.shape)}) but "
            f"num_classes={num_classes}; build it with {num_classes} outputs or set num_classes: {out.shape[1]}"
        )


# --------------------------------------------------------------------------------------------
# CIFAR ResNet-9 (DAWNBench / Myrtle), registered in timm
# --------------------------------------------------------------------------------------------


class ConvBnAct(nn.Sequential):
    """conv3x3 (no bias) -> BatchNorm2d -> ReLU. (B, in_chs, H, W) -> (B, out_chs, H, W)."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)


class Residual(nn.Module):
    """``x + block(x)``; shapes preserved."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResNet9(PooledLinearClassifier):
    """The DAWNBench/Myrtle CIFAR ResNet-9 used by the public R2ET code.

    prep conv(w); layer1 conv(2w)+pool, res1 2x conv(2w); layer2 conv(4w)+pool;
    layer3 conv(8w)+pool, res2 2x conv(8w); adaptive global pool; Linear(8w, num_classes).
    w = ``width`` (64 in the reference network; smaller widths give fast CPU models).
    Input (B, in_chans, H, W) with H, W >= 8 (32 for CIFAR); output (B, num_classes).
    """

    global_pools = ("max", "avg")

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "max",
        drop_rate: float = 0.0,
        width: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"ResNet9 width={width!r} must be a positive integer (64 is the reference)")
        self._check_kwargs(kwargs)
        self.in_chans = in_chans
        w = width

        self.prep = ConvBnAct(in_chans, w)
        self.layer1 = nn.Sequential(ConvBnAct(w, 2 * w), nn.MaxPool2d(2))
        self.res1 = Residual(nn.Sequential(ConvBnAct(2 * w, 2 * w), ConvBnAct(2 * w, 2 * w)))
        self.layer2 = nn.Sequential(ConvBnAct(2 * w, 4 * w), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(ConvBnAct(4 * w, 8 * w), nn.MaxPool2d(2))
        self.res2 = Residual(nn.Sequential(ConvBnAct(8 * w, 8 * w), ConvBnAct(8 * w, 8 * w)))
        self._init_head(8 * w, num_classes, global_pool, drop_rate)
        self.feature_info = [
            dict(num_chs=w, reduction=1, module="prep"),
            dict(num_chs=2 * w, reduction=2, module="res1"),
            dict(num_chs=4 * w, reduction=4, module="layer2"),
            dict(num_chs=8 * w, reduction=8, module="res2"),
        ]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> feature map (B, 8w, H/8, W/8)."""
        x = self.prep(x)
        x = self.res1(self.layer1(x))
        x = self.layer2(x)
        return self.res2(self.layer3(x))


default_cfgs = generate_default_cfgs(
    {
        "resnet9": {
            "url": "",
            "num_classes": 10,
            "input_size": (3, 32, 32),
            "pool_size": (4, 4),
            "crop_pct": 1.0,
            "interpolation": "bilinear",
            "mean": CIFAR10_MEAN,
            "std": CIFAR10_STD,
            "first_conv": "prep.conv",
            "classifier": "fc",
        }
    }
)


@register_model
def resnet9(pretrained: bool = False, **kwargs: Any) -> ResNet9:
    """CIFAR ResNet-9 (DAWNBench/Myrtle). No hub weights exist; ``pretrained=True`` raises."""
    if pretrained:
        raise ValueError(
            "No hub weights exist for 'resnet9'; build it with pretrained=False and pass "
            "weights_file=<local file> to build_backbone to load your own weights."
        )
    return build_model_with_cfg(ResNet9, "resnet9", pretrained=False, **kwargs)


# --------------------------------------------------------------------------------------------
# Fused attention
# --------------------------------------------------------------------------------------------


def disable_fused_attention(model: nn.Module | None = None) -> nn.Module | None:
    """Turn timm's fused scaled-dot-product attention off (double backprop needs the math path).

    Calls ``timm.layers.set_fused_attn(False)`` (affects models built afterwards) and, if
    ``model`` is given, sets ``fused_attn = False`` on each of its modules that has that
    attribute. Returns ``model``.
    """
    set_fused_attn = getattr(timm.layers, "set_fused_attn", None)
    if set_fused_attn is None:  # pragma: no cover - very old timm
        from timm.layers.config import set_fused_attn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        set_fused_attn(False)
    if model is not None:
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
    return model


# --------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone name must be a non-empty string, got {name!r}")
    source, model_id = timm.models.parse_model_name(name)
    if source is not None:  # hf-hub:/local-dir: names are resolved by timm itself
        return
    if timm.models.is_model(model_id):
        return
    arch = timm.models.split_model_name_tag(model_id)[0]
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    if "." in name and not timm.models.is_model(arch):  # a Python class path given as a plain string
        module_hint = (
            f" If {name!r} is your own nn.Module class, give it as a class path: "
            f"--model.backbone.class_path {name} (its arguments as --model.backbone.init_args.<name> "
            f"<value>), or in YAML backbone: {{class_path: {name}, init_args: {{...}}}}; a plain "
            "string is read as a timm model name."
        )
    else:
        module_hint = (" Your own nn.Module is given as --model.backbone.class_path <package.module.Class> "
                       "(YAML backbone: {class_path: ..., init_args: {...}}).")
    raise ValueError(
        f"Unknown backbone name {name!r}: not a timm model name and not 'resnet9' "
        f"(the CIFAR ResNet-9 registered by lightning_modules).{hint} "
        f"See timm.list_models() for all names.{module_hint}"
    )


def _apply_cifar_stem(model: nn.Module, name: str) -> None:
    conv1 = getattr(model, "conv1", None)
    if not isinstance(conv1, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ValueError(
            f"cifar_stem=True supports ResNet-family models with a conv1 (nn.Conv2d) / maxpool "
            f"stem; {name!r} has none (deep-stem variants like resnet18d are not supported)."
        )
    model.conv1 = nn.Conv2d(
        conv1.in_channels,
        conv1.out_channels,
        kernel_size=3,
        stride=1,
        padding=1,
        bias=conv1.bias is not None,
    )
    model.maxpool = nn.Identity()
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):  # the stem is for 32 px inputs (example inputs, probes)
        model.pretrained_cfg = {**cfg, "input_size": (cfg["input_size"][0], 32, 32)}


def _resolve_stats(
    value: Sequence[float] | None, default: Sequence[float] | None, in_chans: int, what: str
) -> tuple[float, ...]:
    if value is not None:
        try:
            values = tuple(float(v) for v in value)
        except TypeError:
            raise ValueError(f"{what} must be a sequence of {in_chans} floats, got {value!r}") from None
        if len(values) != in_chans:
            raise ValueError(
                f"{what}={tuple(value)!r} has {len(values)} entries; it must have in_chans={in_chans}"
            )
        if what == "std" and not all(v > 0 for v in values):
            raise ValueError(f"std must be positive, got std={tuple(value)!r}")
        return values
    default = tuple(float(v) for v in (default or (CIFAR10_MEAN if what == "mean" else CIFAR10_STD)))
    if len(default) == in_chans:
        return default
    # e.g. in_chans=1 with ImageNet stats: use the channel average for every channel
    avg = sum(default) / len(default)
    return (avg,) * in_chans


def _check_module_backbone(model: nn.Module, num_classes: int, in_chans: int, pretrained: bool,
                           timm_kwargs: Mapping[str, Any]) -> str:
    """Refuse settings a user ``nn.Module`` cannot honour; returns its name for messages."""
    name = f"{type(model).__module__}.{type(model).__qualname__}"
    if pretrained:
        raise ValueError(
            f"pretrained=True needs a timm model name; backbone {name} is an nn.Module: load its "
            "weights with weights_file=<local state dict> instead"
        )
    if timm_kwargs:
        raise ValueError(
            f"backbone_kwargs {sorted(timm_kwargs)} are timm.create_model arguments and cannot apply "
            f"to the nn.Module backbone {name}; pass them to its constructor (init_args)"
        )
    head = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else None
    if not isinstance(head, nn.Linear):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    if head is not None and head.out_features != num_classes:
        raise ValueError(
            f"num_classes={num_classes} but the nn.Module backbone {name} ends in a Linear with "
            f"{head.out_features} outputs; build it with {num_classes} outputs or set num_classes"
        )
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if convs and convs[0].in_channels != in_chans:
        raise ValueError(
            f"in_chans={in_chans} but the first Conv2d of the nn.Module backbone {name} takes "
            f"{convs[0].in_channels} channels"
        )
    return name


def build_backbone(
    name: str | nn.Module,
    num_classes: int = 10,
    in_chans: int = 3,
    pretrained: bool = False,
    weights_file: str | None = None,
    activation: str = "relu",
    softplus_beta: float = 0.5,
    cifar_stem: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    output_key: int | str | None = None,
    **timm_kwargs: Any,
) -> NormalizedClassifier:
    """Build ``timm.create_model(name, ...)`` (or take the ``nn.Module`` ``name``) wrapped as a
    :class:`NormalizedClassifier`.

    The result maps images (B, in_chans, H, W) in [0, 1] to logits (B, num_classes).
    ``name``: any timm model name (``"resnet9"``, the CIFAR ``"resnet20"``, ...) or an
    ``nn.Module`` mapping normalised images (B, in_chans, H, W) to logits (B, num_classes), used
    as is (modified in place by ``activation="softplus"`` and ``weights_file``).
    ``pretrained``: timm hub weights (timm names only); ``weights_file``: local state dict
    loaded after building (a classifier of another size is re-initialised).
    ``activation="softplus"`` swaps ReLU-type activations for ``Softplus(softplus_beta)``.
    ``cifar_stem`` replaces a ResNet's 7x7/stride-2 conv1 + maxpool by a 3x3/stride-1 conv (fresh
    weights). ``mean``/``std`` (length ``in_chans``) default to the model's ``pretrained_cfg``;
    for an ``nn.Module`` without one, to mean 0 / std 1 (no normalization). Fused attention is
    disabled so double backprop works.
    ``output_key``: for a backbone whose forward returns a tuple (an index, ``0``), a dict or an
    object such as a Hugging Face ``ModelOutput`` (a key or attribute, ``"logits"``): the model
    is wrapped in :class:`SelectOutput`. One forward of a one-image example input
    (:func:`check_backbone_output`) refuses an output that is not logits (B, num_classes).
    """
    module_backbone = isinstance(name, nn.Module)
    if not module_backbone:
        _check_name(name)
    act = activation.lower() if isinstance(activation, str) else activation
    if act not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    beta = check_beta(softplus_beta)
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative int, got {num_classes!r}")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be a positive int, got {in_chans!r}")
    for what, value in (("mean", mean), ("std", std)):
        if value is not None:
            _resolve_stats(value, None, in_chans, what)
    if output_key is not None and (isinstance(output_key, bool) or not isinstance(output_key, (int, str))
                                   or output_key == ""):
        raise ValueError(
            f"output_key={output_key!r} is not valid: give an index (0) for a tuple output, a key or "
            "attribute name ('logits') for a dict or output object, or null for a logits tensor"
        )
    if module_backbone:
        model = name
        name = _check_module_backbone(model, num_classes, in_chans, pretrained, timm_kwargs)
        return _finish_backbone(model, name, num_classes, in_chans, weights_file, act, beta, cifar_stem,
                                mean, std, output_key, identity_stats=True)
    if pretrained and weights_file is not None:
        warnings.warn(
            "Both pretrained=True and weights_file given: the weights_file overrides hub weights.",
            UserWarning,
            stacklevel=2,
        )

    disable_fused_attention()
    try:
        model = timm.create_model(
            name, pretrained=bool(pretrained), num_classes=num_classes, in_chans=in_chans, **timm_kwargs
        )
    except (TypeError, ValueError):
        raise
    except Exception as exc:
        if not pretrained:
            raise
        raise RuntimeError(
            f"Hub weights for {name!r} could not be downloaded ({type(exc).__name__}: {exc}). "
            f"If this machine is offline, pass weights_file=<local file> (a state dict saved "
            f"from {name!r}) with pretrained=False instead."
        ) from exc

    return _finish_backbone(model, name, num_classes, in_chans, weights_file, act, beta, cifar_stem, mean, std,
                            output_key)


def _finish_backbone(
    model: nn.Module, name: str, num_classes: int, in_chans: int, weights_file: str | None, act: str,
    beta: float, cifar_stem: bool, mean: Sequence[float] | None, std: Sequence[float] | None,
    output_key: int | str | None, identity_stats: bool = False,
) -> NormalizedClassifier:
    """Stem, weights, activation swap, normalization, output selection and the output check for a
    built (timm or user) model."""
    if cifar_stem:
        _apply_cifar_stem(model, name)
    if weights_file is not None:
        load_backbone_weights(model, weights_file, name=name)
    example = example_input(model, in_chans)
    if act == "softplus":  # modules, function attributes and F.relu calls; refuses a no-op swap
        try:
            swap_activations(model, beta, example=example)
        except ValueError as exc:
            raise ValueError(f"backbone {name!r}: {exc}") from None
    disable_fused_attention(model)

    cfg = getattr(model, "pretrained_cfg", None) or {}
    if identity_stats and not (cfg.get("mean") and cfg.get("std")):
        cfg = {"mean": (0.0,) * in_chans, "std": (1.0,) * in_chans}
    mean_t = _resolve_stats(mean, cfg.get("mean"), in_chans, "mean")
    std_t = _resolve_stats(std, cfg.get("std"), in_chans, "std")
    file_stats = getattr(model, "_file_normalization", None)
    if file_stats is not None:
        del model._file_normalization
        f_mean, f_std, f_path = file_stats
        if len(f_mean) == len(mean_t) and (
            any(abs(a - b) > 1e-6 for a, b in zip(f_mean, mean_t))
            or any(abs(a - b) > 1e-6 for a, b in zip(f_std, std_t))
        ):
            warnings.warn(
                f"{f_path} was trained with normalization mean={f_mean}, std={f_std} but the "
                f"model is built with mean={mean_t}, std={std_t}; pass mean/std explicitly.",
                UserWarning,
                stacklevel=2,
            )
    classifier = NormalizedClassifier(model if output_key is None else SelectOutput(model, output_key), mean_t, std_t)
    try:
        check_backbone_output(classifier, example, num_classes, name, output_key)
    except BackboneProbeError as exc:
        warnings.warn(
            f"{exc}: its output (logits (B, num_classes) expected) is not checked here; RobustClassifier "
            "checks it on an input of the data's image size before training",
            UserWarning,
            stacklevel=3,
        )
        classifier._pending_output_check = (name, output_key, num_classes, in_chans)
    return classifier


def check_pending_output(model: nn.Module, image_size: int | None) -> None:
    """The output check :func:`build_backbone` could not run on its example input, run on one
    (1, C, image_size, image_size) input of the data's size; a no-op when it ran at build."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    pending = model.__dict__.get("_pending_output_check")
    if pending is None or image_size is None:
        return
    name, output_key, num_classes, in_chans = pending
    param = next(model.parameters(), None)
    example = torch.rand(1, in_chans, int(image_size), int(image_size), generator=torch.Generator().manual_seed(0))
    example = example.to(param.device) if param is not None else example
    try:
        check_backbone_output(model, example, num_classes, name, output_key)
    except BackboneProbeError as exc:
        raise ValueError(f"{exc}: the model cannot process the data's {image_size}x{image_size} images") from exc
    del model._pending_output_check
