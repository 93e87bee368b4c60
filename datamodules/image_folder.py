"""Robust image-folder dataset and helpers shared by the file-based DataModules.

Layout of one split: ``<split_dir>/<class>/**/<image>`` (any depth below the class folder).
Items are ``(image, label)`` with ``image`` whatever the transform returns (a float (C, H, W)
tensor in [0, 1] for the project's transforms, which end at ``ToTensor()``) and ``label`` an int.

Every image mode Pillow reads is decoded to 8-bit RGB meaning the same brightness, or refused
(:func:`load_rgb`): 8-bit modes through Pillow (alpha dropped, not composited), 16-bit gray as
``v / 65535``, float gray (mode ``F``) as values that must lie in [0, 1]. Out-of-range values,
non-finite floats and unknown modes are bad images, like undecodable files.

Decoding errors (corrupt or truncated files) never surface as a bare PIL trace mid-epoch:

- ``bad_images="error"``: :class:`BadImageError` (a ``ValueError``) naming the file and
  suggesting ``bad_images: skip``.
- ``bad_images="skip"``: ``__getitem__`` returns ``None``, ``dataset.num_skipped`` counts the
  skipped reads (per process: with ``num_workers > 0`` the count lives in the worker processes) and
  a warning names each skipped file once per process. The DataModules' dataloaders use
  :class:`SkipNoneCollate`, which drops the ``None`` items from a batch; a batch whose items are all
  bad becomes an empty batch (``images.shape[0] == 0``) that training/eval steps should skip.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from .resumable import ResumableDataLoader, SeededRandomSampler
from .subsets import class_balanced_order, dataset_targets

log = logging.getLogger(__name__)

# Truncated files must raise on load() instead of being silently padded with grey (the PIL default,
# restated here in case anything else flipped it).
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif")

BadImagesPolicy = Literal["error", "skip"]


class BadImageError(ValueError):
    """An image file could not be decoded (corrupt, truncated or not an image).

    ``path`` is the file, ``reason`` the decoder's error in one line.
    """

    def __init__(self, message: str, path: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason

    def __reduce__(self):  # keep path/reason when re-raised from a DataLoader worker
        return type(self), (str(self), self.path, self.reason)


def check_bad_images(bad_images: str) -> None:
    if bad_images not in ("error", "skip"):
        raise ValueError(f"bad_images must be 'error' or 'skip', got {bad_images!r}")


def list_class_folders(split_dir: str) -> list[str]:
    """Sorted names of the (non-hidden) sub-folders of ``split_dir``."""
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"split folder not found: {split_dir}")
    return sorted(
        e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")
    )


def _list_images(folder: str) -> list[str]:
    paths = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS):
                paths.append(os.path.join(dirpath, name))
    return paths


def make_samples(split_dir: str, class_to_idx: Mapping[str, int]) -> list[tuple[str, int]]:
    """``(path, label)`` for every image of the listed classes in ``split_dir``.

    Folders of ``split_dir`` not in ``class_to_idx`` are ignored. A listed class without a folder,
    a class folder without images, or an empty split raise ``ValueError``.
    """
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"split folder not found: {split_dir}")
    missing = [c for c in class_to_idx if not os.path.isdir(os.path.join(split_dir, c))]
    if missing:
        raise ValueError(f"class folder(s) {missing} not found in {split_dir}")
    samples: list[tuple[str, int]] = []
    for cls, idx in sorted(class_to_idx.items(), key=lambda kv: kv[1]):
        paths = _list_images(os.path.join(split_dir, cls))
        if not paths:
            raise ValueError(
                f"class folder {os.path.join(split_dir, cls)} holds no images "
                f"(extensions {', '.join(IMG_EXTENSIONS)})"
            )
        samples.extend((p, idx) for p in paths)
    if not samples:
        raise ValueError(f"no images found in {split_dir}")
    return samples


# Modes Pillow's ``convert("RGB")`` maps to RGB with unchanged 8-bit values (gray replicated,
# palette looked up, CMYK/YCbCr converted, alpha dropped; ``RGBa`` is un-premultiplied first).
# Pillow itself reduces 16-bit-per-channel colour (48/64-bit PNG, 16-bit PPM) to these 8-bit modes.
_RGB_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr"})
# 16-bit gray: unsigned values in [0, 65535]; Pillow opens 16-bit PNG/TIFF as "I;16"/"I;16B" and
# 16-bit PGM as "I" (older Pillow also opened 16-bit PNG as "I").
_GRAY16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
SUPPORTED_MODES = tuple(sorted(_RGB_MODES | _GRAY16_MODES | {"I", "F"}))


class _Refused(Exception):
    """An image that decodes but whose values have no defined meaning (message = the reason)."""


def _gray_to_rgb(level: np.ndarray) -> Image.Image:
    """(H, W) uint8 gray levels -> RGB PIL image (the level replicated in the 3 channels)."""
    return Image.fromarray(level, "L").convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    """A decoded image of any supported mode as 8-bit RGB meaning the same brightness.

    - 8-bit modes (``_RGB_MODES``): Pillow's conversion; alpha is dropped (the colour channels
      are kept as stored, as torchvision's ``ImageFolder`` loader does), not composited.
    - 16-bit gray (``I;16*``, and ``I`` whose values must lie in [0, 65535]):
      ``round(v / 65535 * 255)`` (= ``round(v / 257)``, so ``257 * k`` gives ``k`` exactly).
    - float gray (``F``): values must be finite and in [0, 1]; ``round(v * 255)``.
    Out-of-range values and any other mode raise ``_Refused``: nothing is clipped or guessed.
    """
    mode = img.mode
    if mode in _RGB_MODES:
        return img.convert("RGB")
    if mode in _GRAY16_MODES or mode == "I":
        v = np.asarray(img).astype(np.int64)
        lo, hi = int(v.min()), int(v.max())
        if mode == "I" and (lo < 0 or hi > 65535):
            raise _Refused(
                f"32-bit integer image (mode I) with values in [{lo}, {hi}]: mode I is read as "
                f"16-bit gray and must lie in [0, 65535]"
            )
        return _gray_to_rgb(((v * 255 + 32767) // 65535).astype(np.uint8))
    if mode == "F":
        v = np.asarray(img, dtype=np.float64)
        finite = np.isfinite(v)
        if not finite.all():
            raise _Refused(f"float image (mode F) with {int((~finite).sum())} non-finite value(s) (NaN/inf)")
        lo, hi = float(v.min()), float(v.max())
        if lo < 0.0 or hi > 1.0:
            raise _Refused(
                f"float image (mode F) with values in [{lo:.6g}, {hi:.6g}]: float images must hold "
                f"values in [0, 1] (they are not clipped or rescaled)"
            )
        return _gray_to_rgb(np.rint(v * 255).astype(np.uint8))
    raise _Refused(f"image mode {mode!r} is not supported (supported: {', '.join(SUPPORTED_MODES)})")


def load_rgb(path: str) -> Image.Image:
    """Open and fully decode an image as 8-bit RGB (see ``_to_rgb`` for each mode).

    Any decoding failure, an unsupported mode, or values outside the mode's range (``F``: [0, 1],
    ``I``: [0, 65535]) raise ``BadImageError`` naming the file and the reason.
    """
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so truncated files fail here and not later
            return _to_rgb(img)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, zlib errors, ...
        reason = str(exc) if isinstance(exc, _Refused) else f"{type(exc).__name__}: {exc}"
        raise BadImageError(
            f"cannot decode image file {path} ({reason}). Remove or replace the file, or set "
            f"`bad_images: skip` on the DataModule to drop unreadable images.",
            path,
            reason,
        ) from None


class ImageSizeError(ValueError):
    """A decoded image does not have the size its split requires (its transform does not resize).

    ``path`` is the file, ``size`` and ``expected`` are ``(width, height)``.
    """

    def __init__(self, message: str, path: str = "", size=(), expected=()) -> None:
        super().__init__(message)
        self.path = path
        self.size = tuple(size)
        self.expected = tuple(expected)

    def __reduce__(self):  # keep the fields when re-raised from a DataLoader worker
        return type(self), (str(self), self.path, self.size, self.expected)


class RobustImageFolder(Dataset):
    """Dataset over explicit ``(path, label)`` samples; items are ``(transform(rgb_pil), label)``.

    ``classes[i]`` is the name of label ``i``. With ``bad_images="skip"`` an unreadable file gives
    ``None`` (see the module docstring). ``image_size = (width, height)`` is the size every decoded
    image must have, for a transform that does not resize (``None``: any size, the transform
    resizes); a file of another size raises :class:`ImageSizeError` naming it, under either policy
    (it is readable: the split, not the file, is wrong). The check costs nothing extra: the size is
    read from the image already decoded in ``__getitem__``.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        classes: Sequence[str],
        transform: Callable[[Image.Image], Any] | None = None,
        bad_images: BadImagesPolicy = "error",
        image_size: tuple[int, int] | None = None,
    ) -> None:
        check_bad_images(bad_images)
        if len(samples) == 0:
            raise ValueError("RobustImageFolder got an empty list of samples")
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        self.samples = list(samples)
        self.targets = [int(t) for _, t in self.samples]
        self.classes = list(classes)
        self.transform = transform
        self.bad_images = bad_images
        self.num_skipped = 0
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            img = load_rgb(path)
        except BadImageError as exc:
            if self.bad_images == "error":
                raise
            self.num_skipped += 1
            if path not in self._warned:
                self._warned.add(path)
                log.warning("skipping unreadable image %s (%s)", path, exc.reason)
            return None
        if self.image_size is not None and img.size != self.image_size:
            (w, h), (ew, eh) = img.size, self.image_size
            raise ImageSizeError(
                f"image {path} is {w}x{h} (width x height) but this split needs {ew}x{eh} images "
                f"(its transform does not resize). Resize the file to {ew}x{eh} or remove it.",
                path,
                img.size,
                self.image_size,
            )
        if self.transform is not None:
            img = self.transform(img)
        return img, label


class SkipNoneCollate:
    """Collate that drops ``None`` items; an all-``None`` batch gives empty tensors.

    The empty batch is ``(float tensor (0, *image_shape), long tensor (0,))``.
    """

    def __init__(self, image_shape: Sequence[int]) -> None:
        self.image_shape = tuple(int(s) for s in image_shape)

    def __call__(self, batch: list):
        items = [b for b in batch if b is not None]
        if not items:
            return torch.empty((0, *self.image_shape)), torch.empty(0, dtype=torch.long)
        return default_collate(items)


def stratified_split(
    targets: Sequence[int], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Seeded class-balanced split of ``range(len(targets))`` into (train, val) index lists.

    ``round(n * val_fraction)`` (at least 1 when ``val_fraction > 0``) indices go to val, shared
    between classes in proportion to their size (largest remainders, ties broken by the seed).
    Both lists are sorted (the DataModules' evaluation loaders read them in a class-balanced
    order, :func:`datamodules.subsets.class_balanced_order`).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    targets_np = np.asarray(targets, dtype=np.int64)
    n = len(targets_np)
    if val_fraction == 0.0 or n == 0:
        return list(range(n)), []
    n_val = max(1, int(round(n * val_fraction)))
    if n_val >= n:
        raise ValueError(f"val_fraction={val_fraction} leaves no training images out of {n}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(targets_np, return_counts=True)
    exact = counts * (n_val / n)
    quota = np.floor(exact).astype(np.int64)
    rest = n_val - int(quota.sum())
    if rest > 0:
        tiebreak = rng.permutation(len(classes))
        order = np.lexsort((tiebreak, -(exact - quota)))  # largest remainder first
        quota[order[:rest]] += 1
    val: list[int] = []
    for cls, q in zip(classes, quota):
        idx = np.flatnonzero(targets_np == cls)
        val.extend(rng.permutation(idx)[:q].tolist())
    val_set = set(val)
    train = [i for i in range(n) if i not in val_set]
    return train, sorted(val)


class DataLoaderMixin:
    """Standard dataloaders for a DataModule with ``train/val/test_dataset`` and ``hparams``."""

    train_dataset: Dataset | None
    val_dataset: Dataset | None
    test_dataset: Dataset | None

    def _collate_fn(self) -> Callable | None:
        return None

    def _loader(self, dataset: Dataset | None, shuffle: bool, name: str) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.{name} is not built: call setup() first")
        num_workers = int(self.hparams.num_workers)
        if not shuffle:  # evaluation: classes interleaved, so a few (limited) batches see every class
            targets = dataset_targets(dataset)
            if targets is not None and len(targets) > 1:
                seed = int(self.hparams.get("seed", 0) or 0)
                dataset = Subset(dataset, class_balanced_order(targets, seed, class_order="seeded"))
        # Shuffled (training) loaders resume exactly mid-epoch: see datamodules/resumable.py.
        cls, order = (ResumableDataLoader, {"sampler": SeededRandomSampler(dataset)}) if shuffle else (DataLoader, {})
        return cls(
            dataset,
            batch_size=int(self.hparams.batch_size),
            **order,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=self._collate_fn(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, True, "train_dataset")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, False, "val_dataset")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, False, "test_dataset")
