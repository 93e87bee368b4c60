"""Lightning side of the project: the timm backbone builder and the LightningModule(s).

Importing this package registers the CIFAR ``resnet9`` in timm's model registry.
"""

from lightning_modules.backbones import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    Normalize,
    NormalizedClassifier,
    ResNet9,
    SelectOutput,
    build_backbone,
    check_backbone_output,
    check_pending_output,
    disable_fused_attention,
    load_backbone_weights,
)

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

from lightning_modules.classifier import RobustClassifier  # noqa: E402

__all__ += ["RobustClassifier"]
