"""Class activation maps (CAM, Grad-CAM) and the share of perturbation energy inside them (DESIGN §6).

For a layer with feature maps f (B, C, h, w) and classes c (B, m) per sample (e.g. the true and the
target class, m = 2):

- CAM (Zhou et al. 2016), for a network whose head is global pooling + a linear layer W (K, C)
  applied to f:  M_c = sum_k W[c, k] f_k  (h x w). Needs f to be the head's input feature map.
- Grad-CAM (Selvaraju et al. 2017), any layer:  alpha_k = mean_{ij} d Z_c / d f_k[i, j],
  M_c = sum_k alpha_k f_k; the displayed map is ReLU(M_c). With global *average* pooling and a
  linear head at the last feature map, Grad-CAM = ReLU(CAM) / (h w).

Maps are bilinearly upsampled to the input size H x W (align_corners=False). The CAM *region* of a
class is the top ``q`` fraction of the H*W pixels of its map (``q = 0.2``: the top 20%), ranked on
the map before ReLU (same order as the ReLU map on its positive part, a meaningful order
elsewhere), ties broken by index. The perturbation energy of a pixel is
e(i, j) = sum_c delta_c(i, j)^2; the share inside a region is sum_{region} e / sum e.

The layer is a dotted module name (``"backbone.layer4"``; names are also tried under ``backbone.``)
or a module. :func:`default_cam_layer` traces one forward pass and picks the module whose output
is the map the classifier head reads: the input of the last global pooling / spatial reduction /
``flatten(1)`` of a (B, C, h, w) tensor (``layer4`` for timm ResNets, ``res2`` for the CIFAR
ResNet-9, ``layer3`` for the CIFAR ResNet-20 -- not its last Conv2d, which precedes BN, the
residual add and the ReLU). A map computed by a function call after the last submodule, or token
outputs (ViT), have no such layer: an error says so. CAM refuses any other layer, naming both.

Everything is batched; models run in eval mode (modes restored) and gradients are taken with
``torch.autograd.grad(..., inputs=)``, so parameter ``.grad`` is untouched.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from explanations.activations import example_input
from explanations.explainers import eval_mode
from explanations.validation import check_images

CAM_METHODS: tuple[str, ...] = ("gradcam", "cam")


def check_cam_method(method: str) -> None:
    """Raise a clear error for an unknown CAM method."""
    if method not in CAM_METHODS:
        raise ValueError(f"cam_method={method!r} is not known; valid: {CAM_METHODS}")


def _base_and_prefix(model: nn.Module) -> tuple[nn.Module, str]:
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module):
        return backbone, "backbone."
    return model, ""


_REDUCTIONS = frozenset({"mean", "amax", "max", "sum", "logsumexp", "nanmean"})


class _HeadInputMode(TorchFunctionMode):
    """Records the last call that reads a (B, C, h, w) map into the head: a global pooling or
    spatial reduction to B * C values, or a ``flatten(1)`` to (B, C h w)."""

    def __init__(self) -> None:
        super().__init__()
        self.read: tuple[Tensor, str] | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        x = args[0] if args else None
        if isinstance(x, Tensor) and x.dim() == 4 and isinstance(out, (Tensor, tuple)):
            o = out[0] if isinstance(out, tuple) else out
            name = getattr(func, "__name__", "")
            if isinstance(o, Tensor) and o.dim() >= 1 and o.shape[0] == x.shape[0]:
                batch, chans = x.shape[:2]
                pooled = o.numel() == batch * chans and ("pool" in name or name in _REDUCTIONS)
                flat = name == "flatten" and o.dim() == 2 and o.numel() == x.numel()
                # a flatten / norm of an already pooled (B, C, 1, 1) map does not replace the pooling
                after_pool = self.read is not None and x.shape[2] * x.shape[3] == 1
                if (pooled or flat) and not after_pool:
                    self.read = (x, f"{name} {tuple(x.shape)} -> {tuple(o.shape)}")
        return out


@dataclass
class HeadInput:
    """The map the classifier head reads: ``names`` of the modules that output it (a timm
    ``feature_info`` stage first, then outermost first), its ``shape`` (1, C, h, w) and the ``op`` that reads it (``"adaptive_avg_pool2d
    (1, 64, 8, 8) -> (1, 64, 1, 1)"``)."""

    names: list[str]
    shape: tuple[int, ...]
    op: str


def trace_head_input(model: nn.Module, example: Tensor) -> HeadInput:
    """Trace ``model(example[:1])`` (eval mode, no grad, modes restored) and find the feature map
    the head reads: the input of the last global pooling / spatial reduction / flatten(1) of a
    (B, C, h, w) tensor, and the submodules whose output it is.

    Raises:
        ValueError: no such read (e.g. a ViT's tokens), or the map is computed by a function call
            after the last submodule (e.g. ``F.relu`` in ``forward``): no layer holds it.
    """
    outputs: list[tuple[str, Tensor]] = []

    def hook(name: str):
        def record(_module, _inputs, output):
            if isinstance(output, Tensor) and output.dim() == 4:
                outputs.append((name, output))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    mode = _HeadInputMode()
    try:
        with eval_mode(model), torch.no_grad(), mode:
            model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
    what = type(getattr(model, "backbone", model)).__name__
    if mode.read is None:
        raise ValueError(
            f"no CAM layer found for {what}: its forward reads no (B, C, h, w) feature map through a "
            "global pooling or flatten (a transformer's tokens are not a map); pass cam_layer "
            "explicitly (a layer with a (B, C, h, w) output)"
        )
    tensor, op = mode.read
    names = [n for n, out in outputs if out is tensor]
    if not names:
        producers = [f"{n} {tuple(out.shape)}" for n, out in outputs][-3:]
        raise ValueError(
            f"no CAM layer found for {what}: the map its head reads ({op}) is computed by a function "
            f"call after its last submodule (the last map outputs: {producers}); compute it in a "
            "submodule (e.g. nn.ReLU instead of F.relu) or pass cam_layer explicitly"
        )
    # a timm feature_info stage name first (``stages.3`` rather than ``stages``), else outermost
    base, prefix = _base_and_prefix(model)
    info = getattr(base, "feature_info", None)
    stages = {prefix + str(d.get("module")) for d in info if isinstance(d, dict)} if isinstance(info, (list, tuple)) else set()
    names.sort(key=lambda n: (n not in stages, n.count(".")))
    return HeadInput(names, tuple(tensor.shape), op)


_HEAD_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, HeadInput]]" = weakref.WeakKeyDictionary()


def head_input(model: nn.Module, example: Tensor | None = None) -> HeadInput:
    """:func:`trace_head_input`, cached per model and input shape (C, H, W). Without ``example``
    a (1, C, H, W) input from :func:`explanations.activations.example_input` is traced."""
    if example is None:
        example = example_input(model)
        if example is None:
            raise ValueError(f"no CAM layer found for {type(model).__name__}: give an example input")
    key = tuple(example.shape[1:])
    cache = _HEAD_CACHE.setdefault(model, {})
    if key not in cache:
        cache[key] = trace_head_input(model, example)
    return cache[key]


def default_cam_layer(model: nn.Module, example: Tensor | None = None) -> str:
    """Name of the default CAM / Grad-CAM / unit layer: the (outermost) module whose output is the
    feature map the classifier head reads, found by tracing (:func:`trace_head_input`)."""
    return head_input(model, example).names[0]


def resolve_layer(
    model: nn.Module, layer: str | nn.Module | None = None, example: Tensor | None = None
) -> tuple[str, nn.Module]:
    """(name, module) for a layer given by name (also tried under ``backbone.``), module or None
    (:func:`default_cam_layer`, traced on ``example`` when given)."""
    if layer is None:
        layer = default_cam_layer(model, example)
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name, module
        raise ValueError(f"layer {type(layer).__name__} is not a submodule of the model")
    candidates = [layer]
    if isinstance(getattr(model, "backbone", None), nn.Module) and not layer.startswith("backbone."):
        candidates.append("backbone." + layer)
    for name in candidates:
        with contextlib.suppress(AttributeError):
            return name, model.get_submodule(name)
    names = [n for n, _ in model.named_modules() if n][-8:]
    raise ValueError(f"layer={layer!r} is not a submodule of the model; e.g. one of {names}")


@contextlib.contextmanager
def capture_output(module: nn.Module, as_leaf: bool = False) -> Iterator[dict[str, Tensor]]:
    """Record ``module``'s forward output in ``store["out"]`` while the context is open.

    With ``as_leaf`` the output is replaced by a leaf that requires grad (``store["out"]``) and
    the network continues from a clone of it, so d(anything downstream) / d(features) can be
    taken with ``torch.autograd.grad(..., inputs=[store["out"]])`` whatever the parameters'
    ``requires_grad`` (and without backpropagating below the layer).
    """
    store: dict[str, Tensor] = {}

    def hook(_module: nn.Module, _inputs, output):
        if not isinstance(output, Tensor):
            raise TypeError(f"hooked layer must return a tensor, got {type(output).__name__}")
        if as_leaf:
            leaf = output.detach().requires_grad_(True)
            store["out"] = leaf
            return leaf.clone()
        store["out"] = output
        return None

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def _check_maps(features: Tensor, layer_name: str) -> None:
    if features.dim() != 4:
        raise ValueError(
            f"CAM layer {layer_name!r} outputs shape {tuple(features.shape)}, not a (B, C, h, w) "
            "feature map; choose another layer (cam_layer)"
        )


def _as_classes(classes: Tensor) -> Tensor:
    return classes[:, None] if classes.dim() == 1 else classes


def grad_cam(model: nn.Module, x: Tensor, classes: Tensor, layer: str | nn.Module | None = None) -> Tensor:
    """Grad-CAM maps before ReLU, at the layer's resolution: (B, m, h, w) for classes (B,) or (B, m).

    x: images (B, C, H, W) float in [0, 1] (checked); the model runs in eval mode (restored)."""
    check_images(x)
    classes = _as_classes(classes).to(x.device)
    name, module = resolve_layer(model, layer, x)
    with eval_mode(model), torch.enable_grad(), capture_output(module, as_leaf=True) as store:
        logits = model(x.detach())
        features = store["out"]
        _check_maps(features, name)
        maps = []
        for j in range(classes.shape[1]):  # loop over the m classes per sample, not over samples
            score = logits.gather(1, classes[:, j : j + 1]).sum()
            (grad,) = torch.autograd.grad(score, inputs=[features], retain_graph=j + 1 < classes.shape[1])
            alpha = grad.mean(dim=(2, 3))
            maps.append(torch.einsum("bk,bkhw->bhw", alpha, features.detach()))
    return torch.stack(maps, dim=1)


def find_linear_head(model: nn.Module) -> nn.Linear:
    """The classifier layer: ``get_classifier()`` of the (backbone) model, else the last nn.Linear."""
    base, _ = _base_and_prefix(model)
    head = base.get_classifier() if hasattr(base, "get_classifier") else None
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("CAM needs a linear classifier head; use cam_method='gradcam'")
    return linears[-1]


def class_activation_map(
    model: nn.Module,
    x: Tensor,
    classes: Tensor,
    layer: str | nn.Module | None = None,
    head: nn.Linear | None = None,
) -> Tensor:
    """CAM maps (no ReLU) at the layer's resolution: (B, m, h, w) for classes (B,) or (B, m).

    The layer must be the feature map the (global pool + linear) head reads. x: images
    (B, C, H, W) float in [0, 1] (checked); the model runs in eval mode (restored).
    """
    check_images(x)
    classes = _as_classes(classes).to(x.device)
    name, module = resolve_layer(model, layer, x)
    read = head_input(model, x)
    if name not in read.names:
        raise ValueError(
            f"CAM: layer {name!r} is not the feature map the head reads: that is {read.names[0]!r} "
            f"{read.shape} (read by {read.op}); use cam_layer={read.names[0]!r} or null, or "
            "cam_method='gradcam' for another layer"
        )
    head = find_linear_head(model) if head is None else head
    with eval_mode(model), torch.no_grad(), capture_output(module) as store:
        model(x)
        features = store["out"]
    _check_maps(features, name)
    if features.shape[1] != head.in_features:
        raise ValueError(
            f"CAM: layer {name!r} has {features.shape[1]} channels but the linear head reads "
            f"{head.in_features}; CAM needs the head's input feature map (or use cam_method='gradcam')"
        )
    weights = head.weight.detach()[classes]  # (B, m, C)
    return torch.einsum("bmk,bkhw->bmhw", weights, features)


def activation_maps(
    model: nn.Module,
    x: Tensor,
    classes: Tensor,
    layer: str | nn.Module | None = None,
    method: str = "gradcam",
) -> Tensor:
    """CAM / Grad-CAM maps before ReLU, upsampled to the input size: (B, m, H, W)."""
    check_cam_method(method)
    maps = grad_cam(model, x, classes, layer) if method == "gradcam" else class_activation_map(model, x, classes, layer)
    return upsample(maps, x.shape[-2:])


def upsample(maps: Tensor, size) -> Tensor:
    """Bilinear upsampling (align_corners=False) of (B, m, h, w) maps to (B, m, *size)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def top_region(maps: Tensor, quantile: float) -> Tensor:
    """The top ``quantile`` fraction of each map's pixels: (B, m, H, W) -> bool (B, m, H, W).

    k = max(1, round(quantile * H * W)) pixels per map, ties broken by index (stable sort).
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"cam_quantile={quantile} must be in (0, 1] (0.2 = top 20% of pixels)")
    flat = maps.flatten(2)
    n = flat.shape[-1]
    k = max(1, min(n, int(round(quantile * n))))
    order = torch.sort(flat, dim=-1, descending=True, stable=True).indices[..., :k]
    region = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, order, True)
    return region.view_as(maps)


def perturbation_energy(delta: Tensor) -> Tensor:
    """e = sum_c delta_c^2 per pixel: (B, C, H, W) -> (B, H, W)."""
    return delta.pow(2).sum(dim=1)


def energy_share_in_region(delta: Tensor, region: Tensor) -> Tensor:
    """sum_{region} e / sum e per sample and map: delta (B, C, H, W), region (B, m, H, W) -> (B, m).

    NaN for a zero perturbation.
    """
    energy = perturbation_energy(delta)[:, None]
    inside = (energy * region).flatten(2).sum(-1)
    total = energy.flatten(2).sum(-1)
    return torch.where(total > 0, inside / total.clamp_min(1e-30), torch.full_like(inside, float("nan")))


def energy_by_category(
    delta: Tensor, pixel_categories: Tensor, region: Tensor, num_categories: int
) -> tuple[Tensor, Tensor]:
    """Perturbation energy per pixel category, overall and inside each region.

    delta (B, C, H, W); pixel_categories (B, H, W) long in [0, num_categories); region (B, m, H, W).
    Returns total (B, num_categories) and inside (B, m, num_categories); inside / total is the
    share of that category's energy inside the region.
    """
    energy = perturbation_energy(delta).flatten(1)  # (B, n)
    cats = pixel_categories.flatten(1).long()
    batch, m = region.shape[:2]
    total = energy.new_zeros(batch, num_categories).scatter_add_(1, cats, energy)
    masked = energy[:, None] * region.flatten(2)  # (B, m, n)
    inside = energy.new_zeros(batch, m, num_categories).scatter_add_(
        2, cats[:, None].expand(-1, m, -1), masked
    )
    return total, inside
