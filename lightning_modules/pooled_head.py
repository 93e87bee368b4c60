"""The timm classifier interface shared by the CIFAR networks registered here (ResNet-9, CIFAR ResNets).

``forward = forward_head(forward_features(x))`` with the head global pool -> flatten -> dropout ->
Linear(num_features, num_classes), plus ``get_classifier`` / ``reset_classifier`` as timm models
have them. A subclass defines ``forward_features`` and calls :meth:`_init_head` in ``__init__``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

#: Options timm passes to every model that have no meaning for these networks.
TIMM_IGNORED_KWARGS = ("drop_path_rate", "drop_block_rate", "img_size", "device", "dtype")


class PooledLinearClassifier(nn.Module):
    """Base of a conv net with a global-pool + Linear head (timm's classifier interface)."""

    #: the ``global_pool`` values the subclass supports (first = default)
    global_pools: tuple[str, ...] = ("avg", "max")

    @classmethod
    def _check_kwargs(cls, kwargs: dict[str, Any]) -> None:
        """Drop :data:`TIMM_IGNORED_KWARGS`; any other leftover keyword is a TypeError naming it."""
        for ignored in TIMM_IGNORED_KWARGS:
            kwargs.pop(ignored, None)
        if kwargs:
            raise TypeError(f"{cls.__name__} got unexpected keyword arguments: {sorted(kwargs)}")

    @classmethod
    def _make_pool(cls, global_pool: str) -> nn.Module:
        if global_pool not in cls.global_pools:
            valid = " or ".join(repr(p) for p in cls.global_pools)
            raise ValueError(f"{cls.__name__} global_pool must be {valid}, got {global_pool!r}")
        return nn.AdaptiveMaxPool2d(1) if global_pool == "max" else nn.AdaptiveAvgPool2d(1)

    def _init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float) -> None:
        self.num_classes, self.drop_rate = num_classes, drop_rate
        self.num_features = self.head_hidden_size = num_features
        self.global_pool = self._make_pool(global_pool)
        self.flatten = nn.Flatten(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh Linear(num_features, num_classes) head (Identity if 0); optionally another pool."""
        self.num_classes = num_classes
        if global_pool is not None and global_pool != "":
            self.global_pool = self._make_pool(global_pool)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, num_features, h, w) -> logits (B, num_classes), or pooled features if ``pre_logits``."""
        x = self.head_drop(self.flatten(self.global_pool(x)))
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
