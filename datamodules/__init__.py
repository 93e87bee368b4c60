"""LightningDataModules: the built-in synthetic dataset, CIFAR-10 and ImageNet subsets.

Every DataModule exposes, after ``setup()``, ``train_dataset``, ``val_dataset`` and
``test_dataset``, and the properties ``num_classes``, ``image_size``, ``in_chans``,
``class_names`` and ``has_masks``. Images are float (C, H, W) tensors in [0, 1] (no
normalisation: the model normalises). Items are ``(image, label)``, or
``(image, label, mask)`` for the synthetic data (``has_masks``).
"""

from .cifar10 import CIFAR10_CLASSES, CIFAR10DataModule
from .image_folder import (
    BadImageError,
    ImageSizeError,
    RobustImageFolder,
    SkipNoneCollate,
)
from .imagenet_subset import ImageNetSubsetDataModule, read_class_list
from .synthetic import SyntheticDataModule, SyntheticPatternDataset

__all__ = [
    "BadImageError",
    "CIFAR10DataModule",
    "CIFAR10_CLASSES",
    "ImageNetSubsetDataModule",
    "ImageSizeError",
    "RobustImageFolder",
    "SkipNoneCollate",
    "SyntheticDataModule",
    "SyntheticPatternDataset",
    "read_class_list",
]
