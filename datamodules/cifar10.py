"""CIFAR-10 DataModule: torchvision's official files or an image-folder layout.

Layouts under ``data_dir`` (detected automatically, official first):

(a) torchvision's files ``<data_dir>/cifar-10-batches-py/`` (downloaded by ``prepare_data`` when
    ``download: true``);
(b) image folders ``<data_dir>/train/<class>/*`` and ``<data_dir>/test/<class>/*`` with the 10
    CIFAR-10 class names as folder names (sorted order = official label ids).

Items are ``(image float (3, 32, 32) in [0, 1], label int)``. Nothing is resized: a folder-layout
file that is not 32x32 raises ``ImageSizeError`` naming it when it is read. Val is a seeded class-balanced
``val_fraction`` of train (with ``val_fraction: 0`` the test split also serves as val). Train
augmentation (``augment``): RandomCrop(32, padding=4) + RandomHorizontalFlip.
"""

from __future__ import annotations

import os
from typing import Literal

import lightning as L
import torchvision
from torchvision import transforms as T

from .image_folder import (
    DataLoaderMixin,
    RobustImageFolder,
    SkipNoneCollate,
    check_bad_images,
    list_class_folders,
    make_samples,
    stratified_split,
)
from .subsets import TransformSubset

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
_OFFICIAL_DIR = "cifar-10-batches-py"


class CIFAR10DataModule(DataLoaderMixin, L.LightningDataModule):
    """CIFAR-10 (official torchvision files or ``train/<class>``, ``test/<class>`` folders)."""

    def __init__(
        self,
        data_dir: str = "data/cifar10",
        download: bool = False,
        val_fraction: float = 0.1,
        augment: bool = True,
        bad_images: Literal["error", "skip"] = "error",
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_bad_images(bad_images)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.train_dataset = None
        self.val_dataset = None
        self.test_dataset = None
        self.layout: str | None = None

    # --- contract properties -------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return 10

    @property
    def image_size(self) -> int:
        return 32

    @property
    def in_chans(self) -> int:
        return 3

    @property
    def class_names(self) -> list[str]:
        return list(CIFAR10_CLASSES)

    @property
    def has_masks(self) -> bool:
        return False

    # --- layout --------------------------------------------------------------------------------
    def detect_layout(self) -> str | None:
        """``"official"``, ``"folder"`` or ``None`` when neither layout is present."""
        root = self.hparams.data_dir
        if os.path.isdir(os.path.join(root, _OFFICIAL_DIR)):
            return "official"
        if os.path.isdir(os.path.join(root, "train")) or os.path.isdir(os.path.join(root, "test")):
            return "folder"
        return None

    def _missing_data_error(self) -> FileNotFoundError:
        root = self.hparams.data_dir
        return FileNotFoundError(
            f"CIFAR-10 data not found in data_dir={root!r} ({os.path.abspath(root)}). Put the images "
            f"in an image-folder layout {root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg "
            f"(classes: {', '.join(CIFAR10_CLASSES)}), or torchvision's files in "
            f"{root}/{_OFFICIAL_DIR}/, or set `download: true` where the network is reachable."
        )

    def prepare_data(self) -> None:
        if self.detect_layout() is None and self.hparams.download:
            for train in (True, False):
                torchvision.datasets.CIFAR10(self.hparams.data_dir, train=train, download=True)

    # --- datasets ------------------------------------------------------------------------------
    def _transforms(self):
        eval_tf = T.ToTensor()
        if self.hparams.augment:
            train_tf = T.Compose(
                [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()]
            )
        else:
            train_tf = eval_tf
        return train_tf, eval_tf

    def _folder_samples(self, split: str) -> list[tuple[str, int]]:
        split_dir = os.path.join(self.hparams.data_dir, split)
        if not os.path.isdir(split_dir):
            raise FileNotFoundError(
                f"CIFAR-10 image-folder layout incomplete: {split_dir} not found (expected "
                f"{self.hparams.data_dir}/train/<class>/* and {self.hparams.data_dir}/test/<class>/*)"
            )
        found = list_class_folders(split_dir)
        missing = sorted(set(CIFAR10_CLASSES) - set(found))
        extra = sorted(set(found) - set(CIFAR10_CLASSES))
        if missing or extra:
            raise ValueError(
                f"class folders in {split_dir} do not match the 10 CIFAR-10 classes: "
                f"missing {missing}, unexpected {extra}"
            )
        return make_samples(split_dir, {c: i for i, c in enumerate(CIFAR10_CLASSES)})

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        hp = self.hparams
        layout = self.detect_layout()
        if layout is None:
            raise self._missing_data_error()
        train_tf, eval_tf = self._transforms()
        if layout == "official":
            train_base = torchvision.datasets.CIFAR10(hp.data_dir, train=True, download=False)
            test_base = torchvision.datasets.CIFAR10(hp.data_dir, train=False, download=False)
            train_idx, val_idx = stratified_split(train_base.targets, hp.val_fraction, hp.seed)
            train_ds = TransformSubset(train_base, train_idx, train_tf)
            val_ds = TransformSubset(train_base, val_idx, eval_tf) if val_idx else None
            test_ds = TransformSubset(test_base, range(len(test_base)), eval_tf)
        else:
            train_samples = self._folder_samples("train")
            test_samples = self._folder_samples("test")
            targets = [t for _, t in train_samples]
            train_idx, val_idx = stratified_split(targets, hp.val_fraction, hp.seed)
            # The transforms do not resize: every file must already be 32x32 (checked per item).
            size = (32, 32)
            train_ds = RobustImageFolder(
                [train_samples[i] for i in train_idx], CIFAR10_CLASSES, train_tf, hp.bad_images, size
            )
            val_ds = (
                RobustImageFolder(
                    [train_samples[i] for i in val_idx], CIFAR10_CLASSES, eval_tf, hp.bad_images, size
                )
                if val_idx
                else None
            )
            test_ds = RobustImageFolder(test_samples, CIFAR10_CLASSES, eval_tf, hp.bad_images, size)
        self.layout = layout
        self.test_dataset = test_ds
        self.val_dataset = val_ds if val_ds is not None else test_ds
        self.train_dataset = train_ds

    def describe_split(self, split: str) -> str:
        """Where a split's images come from (stated in evaluation reports; ``held_out`` below)."""
        hp = self.hparams
        files = "torchvision's files" if getattr(self, "layout", None) == "official" else "image folders"
        if split == "train":
            return f"CIFAR-10 train split ({files}) minus the validation images: training data"
        if split == "val" and hp.val_fraction > 0:
            return (f"{hp.val_fraction:g} of the CIFAR-10 train split ({files}; seeded, class-balanced, seed "
                    f"{hp.seed}): images a model trained on CIFAR-10's train split (e.g. published weights) has seen")
        return f"the CIFAR-10 test split ({files}): held out from CIFAR-10 training"

    def held_out(self, split: str) -> bool:
        """Whether a split is CIFAR-10's test split, which no model trained on CIFAR-10's train split saw."""
        return split == "test" or (split == "val" and self.hparams.val_fraction == 0)

    def _collate_fn(self):
        return SkipNoneCollate((3, 32, 32))
