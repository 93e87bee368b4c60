"""CIFAR ResNets of He et al. 2016 (Section 4.2), registered in timm: resnet20/32/44/56/110.

Depth 6n + 2: a 3x3 conv (16 channels) + BN + ReLU, three stages of n basic blocks with 16, 32 and
64 channels (stride 2 at the start of stages 2 and 3), global average pooling and a linear head.
Shortcuts are option A: identity, or, where the shape changes, stride-2 subsampling with the new
channels zero-padded (no parameters). Activations are ``F.relu`` calls, as in the original code.

The layout and parameter names follow the public ``akamaster/pytorch_resnet_cifar10`` code
(``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``), except that the head is ``fc``
(timm's convention) instead of ``linear``; :func:`checkpoint_filter_fn` maps its published files
(``{'state_dict': {'module.conv1.weight': ...}, 'best_prec1': ...}``). Those weights expect inputs
normalised with ImageNet statistics, which the default cfg records.

Importing this module registers the models, so ``timm.create_model("resnet20")`` works;
``pretrained=True`` downloads the published weights (URL in the model's ``pretrained_cfg``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch  # noqa: F401  (the doctest examples use it)
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from lightning_modules.pooled_head import PooledLinearClassifier

__all__ = ["CifarResNet", "BasicBlock", "ShortcutA", "checkpoint_filter_fn", "CIFAR_RESNET_DEPTHS"]

#: depth -> published file of akamaster/pytorch_resnet_cifar10 (pretrained_models/).
_PUBLISHED = {
    20: "resnet20-12fca82f.th",
    32: "resnet32-d509ac18.th",
    44: "resnet44-014dd654.th",
    56: "resnet56-4bfd9763.th",
    110: "resnet110-1d1ed7c2.th",
}
CIFAR_RESNET_DEPTHS: tuple[int, ...] = tuple(_PUBLISHED)
_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ShortcutA(nn.Module):
    """Option-A shortcut: (B, C, H, W) -> (B, C + 2p, ceil(H/2), ceil(W/2)), x[:, :, ::2, ::2]
    with p zero channels on each side (p = ``pad``)."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); conv 3x3, the first with ``stride``."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        if stride != 1 or in_chs != out_chs:
            if out_chs - in_chs != 2 * (out_chs // 4) or stride != 2:
                raise ValueError(f"option-A shortcut needs stride 2 and {in_chs} -> 2x channels, got "
                                 f"{in_chs} -> {out_chs} at stride {stride}")
            self.shortcut: nn.Module = ShortcutA(out_chs // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(PooledLinearClassifier):
    """CIFAR ResNet of depth 6n + 2 (He et al. 2016, option-A shortcuts).

    Args:
        depth: 20, 32, 44, 56, 110, ... (any 6n + 2).
        num_classes: logits (0: no head, ``forward`` returns pooled features).
        in_chans: input channels; width: channels of the first stage (16 in the paper).
        drop_rate: dropout before the head.
    Input (B, in_chans, H, W) (32 x 32 for CIFAR); output (B, num_classes).

    Examples:
        >>> import timm, lightning_modules.cifar_resnet
        >>> timm.create_model("resnet20")(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    global_pools = ("avg",)

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_chans: int = 3,
        width: int = 16,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self._check_kwargs(kwargs)
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CifarResNet depth={depth!r} must be 6n + 2 (20, 32, 44, 56, 110)")
        if not isinstance(width, int) or width < 4 or width % 4:
            raise ValueError(f"CifarResNet width={width!r} must be a positive multiple of 4 (16 in the paper)")
        self._make_pool(global_pool)  # refuses any pool but 'avg' before building
        n = (depth - 2) // 6
        self.depth, self.in_chans = depth, in_chans
        self.conv1 = nn.Conv2d(in_chans, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        chs = width
        for i, (out_chs, stride) in enumerate(((width, 1), (2 * width, 2), (4 * width, 2)), start=1):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(chs, out_chs, stride if j == 0 else 1))
                chs = out_chs
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        self._init_head(4 * width, num_classes, global_pool, drop_rate)
        self.feature_info = [
            dict(num_chs=width, reduction=1, module="layer1"),
            dict(num_chs=2 * width, reduction=2, module="layer2"),
            dict(num_chs=4 * width, reduction=4, module="layer3"),
        ]
        for m in self.modules():  # the original code's init
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> the map the head reads (B, 4 width, H/4, W/4)."""
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module | None = None) -> dict[str, Tensor]:
    """Map an akamaster/pytorch_resnet_cifar10 file to this model's keys (timm's filter hook).

    Unwraps ``{'state_dict': ..., 'best_prec1': ...}``, strips the DataParallel ``module.``
    prefix and renames the head ``linear.*`` -> ``fc.*``. Keys already in this model's format
    pass unchanged, so the function is idempotent.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            continue
        if key.startswith("module."):
            key = key[len("module."):]
        if key.startswith("linear."):
            key = "fc." + key[len("linear."):]
        out[key] = value
    return out


#: the loaders (``load_backbone_weights``) call ``model.checkpoint_filter_fn(state_dict, model)``
CifarResNet.checkpoint_filter_fn = staticmethod(checkpoint_filter_fn)  # type: ignore[attr-defined]


def _cfg(depth: int) -> dict[str, Any]:
    return {
        "url": _URL + _PUBLISHED[depth],
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        "license": "bsd-2-clause",
        "paper_ids": "arXiv:1512.03385",
        "origin_url": "https://github.com/akamaster/pytorch_resnet_cifar10",
    }


default_cfgs = generate_default_cfgs({f"resnet{d}.akamaster_cifar10": _cfg(d) for d in CIFAR_RESNET_DEPTHS})


def _create(depth: int, pretrained: bool, **kwargs: Any) -> CifarResNet:
    return build_model_with_cfg(
        CifarResNet, f"resnet{depth}", pretrained=pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        depth=depth, **kwargs,
    )


@register_model
def resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-20 (0.27 M parameters; published weights: 91.78% on CIFAR-10)."""
    return _create(20, pretrained, **kwargs)


@register_model
def resnet32(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-32 (0.46 M parameters)."""
    return _create(32, pretrained, **kwargs)


@register_model
def resnet44(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-44 (0.66 M parameters)."""
    return _create(44, pretrained, **kwargs)


@register_model
def resnet56(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-56 (0.85 M parameters)."""
    return _create(56, pretrained, **kwargs)


@register_model
def resnet110(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-110 (1.7 M parameters)."""
    return _create(110, pretrained, **kwargs)
