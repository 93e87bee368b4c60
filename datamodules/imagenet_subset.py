"""ImageNet-subset DataModule (Imagenette, ImageNet-100, ...) over an ImageFolder root.

Layout: ``<data_dir>/train/<wnid>/*`` and ``<data_dir>/val/<wnid>/*``, optionally
``<data_dir>/test/<wnid>/*``. Splits: train = ``train/`` (minus a seeded class-balanced
``val_fraction`` when > 0); val = that carved-out part when ``val_fraction > 0``, else ``val/``;
test = ``test/`` if present, else ``val/``.

Classes: with ``class_list`` (a file of WordNet ids, one per line; blank lines and ``#`` comments
ignored) only those classes are used and class index ``i`` is the ``i``-th listed id (file order,
not sorted). Without it: all folders of ``train/`` in sorted order.

Items are ``(image float (3, S, S) in [0, 1], label int)``, ``S = image_size``; images are
decoded to RGB (some ImageNet files are grayscale or CMYK; see ``image_folder.load_rgb``) and every
transform resizes to ``S x S``, so a split may mix image sizes.
"""

from __future__ import annotations

import os
from typing import Literal

import lightning as L
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from .image_folder import (
    DataLoaderMixin,
    RobustImageFolder,
    SkipNoneCollate,
    check_bad_images,
    list_class_folders,
    make_samples,
    stratified_split,
)


def read_class_list(path: str) -> list[str]:
    """WordNet ids from ``path`` in file order (blank lines, ``#`` comments ignored; no dups)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class_list file not found: {path}")
    names: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            name = line.split("#", 1)[0].strip()
            if not name:
                continue
            if name in names:
                raise ValueError(
                    f"class_list {path}: duplicate entry {name!r} on line {lineno} "
                    f"(first listed as class {names.index(name)})"
                )
            names.append(name)
    if not names:
        raise ValueError(f"class_list {path} lists no classes")
    return names


class ResizeCenterCrop:
    """Resize the short side to ``resize`` then center-crop ``size``; images already
    ``size x size`` pass through unchanged."""

    def __init__(self, size: int, resize: int) -> None:
        self.size = int(size)
        self.resize = int(resize)

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.size == (self.size, self.size):
            return img
        img = TF.resize(img, self.resize, interpolation=T.InterpolationMode.BILINEAR)
        return TF.center_crop(img, [self.size, self.size])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, resize={self.resize})"


class ImageNetSubsetDataModule(DataLoaderMixin, L.LightningDataModule):
    """ImageNet subset from an ImageFolder root (see the module docstring for layout/classes)."""

    def __init__(
        self,
        data_dir: str,
        class_list: str | None = None,
        image_size: int = 224,
        val_fraction: float = 0.0,
        augment: bool = True,
        bad_images: Literal["error", "skip"] = "error",
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_bad_images(bad_images)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.train_dataset = None
        self.val_dataset = None
        self.test_dataset = None
        self._classes: list[str] | None = None

    # --- contract properties -------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        """WordNet ids in label order (read from class_list or the train/ folders, cached)."""
        if self._classes is None:
            self._classes = self._resolve_classes()
        return list(self._classes)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return int(self.hparams.image_size)

    @property
    def in_chans(self) -> int:
        return 3

    @property
    def has_masks(self) -> bool:
        return False

    # --- helpers -------------------------------------------------------------------------------
    def _split_dir(self, split: str) -> str:
        return os.path.join(self.hparams.data_dir, split)

    def _require_dir(self, split: str) -> str:
        d = self._split_dir(split)
        if not os.path.isdir(d):
            root = self.hparams.data_dir
            raise FileNotFoundError(
                f"ImageNet subset split folder {d} not found. Expected an ImageFolder root "
                f"{root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG (optionally {root}/test/)."
            )
        return d

    def _resolve_classes(self) -> list[str]:
        train_dir = self._require_dir("train")
        if self.hparams.class_list:
            return read_class_list(self.hparams.class_list)
        classes = list_class_folders(train_dir)
        if not classes:
            raise ValueError(f"no class folders found in {train_dir}")
        return classes

    def _samples(self, split: str, classes: list[str]) -> list[tuple[str, int]]:
        split_dir = self._require_dir(split)
        missing = [c for c in classes if not os.path.isdir(os.path.join(split_dir, c))]
        if missing:
            src = (
                f"class_list {self.hparams.class_list}" if self.hparams.class_list
                else f"{self._split_dir('train')}"
            )
            raise ValueError(
                f"class(es) {missing} from {src} have no folder in {split_dir} "
                f"(data_dir={self.hparams.data_dir!r}, split {split!r})"
            )
        return make_samples(split_dir, {c: i for i, c in enumerate(classes)})

    def _transforms(self):
        s = self.image_size
        eval_tf = T.Compose([ResizeCenterCrop(s, int(s * 256 / 224)), T.ToTensor()])
        if self.hparams.augment:
            train_tf = T.Compose(
                [T.RandomResizedCrop(s), T.RandomHorizontalFlip(), T.ToTensor()]
            )
        else:
            train_tf = T.Compose([ResizeCenterCrop(s, s), T.ToTensor()])
        return train_tf, eval_tf

    def prepare_data(self) -> None:  # nothing to download
        pass

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        hp = self.hparams
        classes = self.class_names
        train_tf, eval_tf = self._transforms()
        bad = hp.bad_images
        has_test = os.path.isdir(self._split_dir("test"))

        train_samples = self._samples("train", classes)
        if hp.val_fraction > 0:
            train_idx, val_idx = stratified_split(
                [t for _, t in train_samples], hp.val_fraction, hp.seed
            )
            val_ds = RobustImageFolder([train_samples[i] for i in val_idx], classes, eval_tf, bad)
            train_samples = [train_samples[i] for i in train_idx]
            test_split = "test" if has_test else "val"
            test_ds = RobustImageFolder(self._samples(test_split, classes), classes, eval_tf, bad)
        else:
            val_ds = RobustImageFolder(self._samples("val", classes), classes, eval_tf, bad)
            test_ds = (
                RobustImageFolder(self._samples("test", classes), classes, eval_tf, bad)
                if has_test
                else val_ds
            )
        self.train_dataset = RobustImageFolder(train_samples, classes, train_tf, bad)
        self.val_dataset = val_ds
        self.test_dataset = test_ds

    def describe_split(self, split: str) -> str:
        """Where a split's images come from (stated in evaluation reports)."""
        hp = self.hparams
        root = hp.data_dir
        if split == "train":
            return f"{root}/train minus the validation images: training data"
        if split == "val" and hp.val_fraction > 0:
            return (f"{hp.val_fraction:g} of {root}/train (seeded, class-balanced, seed {hp.seed}): images a model "
                    "pretrained on this dataset's train split (e.g. ImageNet weights) has seen")
        folder = "test" if split == "test" and os.path.isdir(self._split_dir("test")) else "val"
        return (f"{root}/{folder}: held out from this dataset's train split (a model pretrained on all of ImageNet "
                "may still have seen them: check where the subset drew its images)")

    def held_out(self, split: str) -> bool:
        """Whether a split comes from its own folder (val/ or test/), not from train/."""
        return split == "test" or (split == "val" and self.hparams.val_fraction == 0)

    def _collate_fn(self):
        return SkipNoneCollate((3, self.image_size, self.image_size))
