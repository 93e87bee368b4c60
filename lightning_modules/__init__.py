"""Lightning side of the project: the timm backbone builder and the LightningModule(s).

Importing this package registers the CIFAR ``resnet9`` in timm's model registry.
"""

from lightning_modules.backbones import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    Normalize,
    NormalizedClassifier,
    ResNet9,
    build_backbone,
    disable_fused_attention,
    find_relu_activations,
    load_backbone_weights,
    replace_activations,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "Normalize",
    "NormalizedClassifier",
    "ResNet9",
    "build_backbone",
    "disable_fused_attention",
    "find_relu_activations",
    "load_backbone_weights",
    "replace_activations",
]

from lightning_modules.classifier import RobustClassifier  # noqa: E402

__all__ += ["RobustClassifier"]
