"""Built-in synthetic dataset with ground-truth saliency masks (no files, generated from a seed).

Each RGB image (3, S, S) in [0, 1] has a muted, smooth random colour field plus Gaussian pixel
noise as background, and one class glyph pasted at a random place. Class ``c`` has a fixed random
binary ``pattern_size x pattern_size`` glyph drawn in a saturated class colour (both derived from
``seed``); glyph "on" pixels are set exactly to the class colour and form the item's mask.
Items are ``(image float32 (3, S, S), label int64, mask bool (S, S))``.
"""

from __future__ import annotations

import colorsys

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .image_folder import DataLoaderMixin

_STREAM_PATTERNS, _STREAM_TRAIN, _STREAM_VAL, _STREAM_TEST = 0, 1, 2, 3


def derive_seed(seed: int, stream: int) -> int:
    """Independent 63-bit seed for ``stream`` derived from ``seed``."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, stream]).generate_state(2)
    return int((int(state[0]) << 32 | int(state[1])) & 0x7FFFFFFFFFFFFFFF)


def make_class_patterns(
    num_classes: int, pattern_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class glyphs (num_classes, p, p) bool and colours (num_classes, 3) float in [0, 1].

    Glyphs are random binary patterns with at least a quarter of their pixels on, distinct between
    classes where the pattern size allows it. Colours are fully saturated hues spread evenly around
    the colour wheel (random offset and order).
    """
    g = torch.Generator().manual_seed(derive_seed(seed, _STREAM_PATTERNS))
    p = pattern_size
    min_on = max(1, (p * p) // 4)
    glyphs: list[torch.Tensor] = []
    seen: set[bytes] = set()
    for _ in range(num_classes):
        for _attempt in range(100):
            glyph = torch.rand(p, p, generator=g) < 0.5
            key = glyph.numpy().tobytes()
            if int(glyph.sum()) >= min_on and key not in seen:
                break
        else:  # tiny patterns: distinct glyphs may not exist; colour still tells classes apart
            glyph = torch.ones(p, p, dtype=torch.bool)
        seen.add(glyph.numpy().tobytes())
        glyphs.append(glyph)
    offset = float(torch.rand((), generator=g))
    order = torch.randperm(num_classes, generator=g).tolist()
    colours = torch.tensor(
        [colorsys.hsv_to_rgb(((order[c] + offset) / num_classes) % 1.0, 1.0, 1.0)
         for c in range(num_classes)],
        dtype=torch.float32,
    )
    return torch.stack(glyphs), colours


class SyntheticPatternDataset(Dataset):
    """One generated split; items ``(image (3, S, S) float, label long, mask (S, S) bool)``.

    Tensors: ``images`` (N, 3, S, S), ``labels`` (N,), ``masks`` (N, S, S), ``positions`` (N, 2)
    (top-left row, col of the glyph). Labels are balanced (counts differ by at most one).
    """

    def __init__(
        self,
        size: int,
        glyphs: torch.Tensor,
        colours: torch.Tensor,
        image_size: int,
        noise_std: float,
        seed: int,
    ) -> None:
        num_classes, p, _ = glyphs.shape
        n, s = int(size), int(image_size)
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=g)]

        # background: low-frequency colour field, muted (low saturation, mid brightness) + noise
        grid = 4
        lum = torch.rand(n, 1, grid, grid, generator=g)
        chroma = torch.rand(n, 3, grid, grid, generator=g)
        field = 0.2 + 0.6 * (0.6 * lum + 0.4 * chroma)
        background = F.interpolate(field, size=(s, s), mode="bicubic", align_corners=False)
        background = background + noise_std * torch.randn(n, 3, s, s, generator=g)
        background = background.clamp_(0.0, 1.0)

        # glyph placement, vectorised over the split
        positions = torch.randint(0, s - p + 1, (n, 2), generator=g)
        ar = torch.arange(p)
        rows = (positions[:, 0, None] + ar)[:, :, None].expand(n, p, p)
        cols = (positions[:, 1, None] + ar)[:, None, :].expand(n, p, p)
        idx = torch.arange(n)[:, None, None].expand(n, p, p)
        masks = torch.zeros(n, s, s, dtype=torch.bool)
        masks[idx, rows, cols] = glyphs[labels]
        images = torch.where(masks[:, None], colours[labels][:, :, None, None], background)

        self.images = images.contiguous()
        self.labels = labels.long()
        self.masks = masks
        self.positions = positions

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index], self.masks[index]


class SyntheticDataModule(DataLoaderMixin, L.LightningDataModule):
    """Synthetic glyph-classification data with ground-truth masks (``has_masks`` is True).

    Train/val/test splits are generated at ``setup`` from seeds derived from ``seed`` (different per
    split, identical for the same ``seed``). Batches are ``(images (B, 3, S, S), labels (B,),
    masks (B, S, S) bool)``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        train_size: int = 2000,
        val_size: int = 500,
        test_size: int = 500,
        pattern_size: int = 8,
        noise_std: float = 0.1,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not 1 <= pattern_size <= image_size:
            raise ValueError(
                f"pattern_size must be in [1, image_size={image_size}], got {pattern_size}"
            )
        for name, value in (("train_size", train_size), ("val_size", val_size),
                            ("test_size", test_size), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.save_hyperparameters()
        self.train_dataset: SyntheticPatternDataset | None = None
        self.val_dataset: SyntheticPatternDataset | None = None
        self.test_dataset: SyntheticPatternDataset | None = None
        self.glyphs, self.colours = make_class_patterns(num_classes, pattern_size, seed)

    @property
    def num_classes(self) -> int:
        return int(self.hparams.num_classes)

    @property
    def image_size(self) -> int:
        return int(self.hparams.image_size)

    @property
    def in_chans(self) -> int:
        return 3

    @property
    def class_names(self) -> list[str]:
        return [f"pattern_{i}" for i in range(self.num_classes)]

    @property
    def has_masks(self) -> bool:
        return True

    def prepare_data(self) -> None:  # nothing to download
        pass

    def describe_split(self, split: str) -> str:
        """Where a split's images come from (stated in evaluation reports)."""
        hp = self.hparams
        size = {"train": hp.train_size, "val": hp.val_size, "test": hp.test_size}.get(split, "?")
        return (f"synthetic glyphs ({size} images generated from seed {hp.seed}, stream {split}; not real images, "
                "only models trained on this data mean anything on it)")

    def held_out(self, split: str) -> bool:
        """Val and test are generated from their own seeds, disjoint from the training images."""
        return split in ("val", "test")

    def _make(self, size: int, stream: int) -> SyntheticPatternDataset:
        hp = self.hparams
        return SyntheticPatternDataset(
            size, self.glyphs, self.colours, hp.image_size, hp.noise_std,
            derive_seed(hp.seed, stream),
        )

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self.train_dataset is None:
            self.train_dataset = self._make(hp.train_size, _STREAM_TRAIN)
        if self.val_dataset is None:
            self.val_dataset = self._make(hp.val_size, _STREAM_VAL)
        if self.test_dataset is None:
            self.test_dataset = self._make(hp.test_size, _STREAM_TEST)
