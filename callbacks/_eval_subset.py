"""A fixed, seeded, class-balanced evaluation subset of a dataset, sharded across ranks.

The subset walks a seeded random permutation of the dataset's indices class by class in turns
(the first image of each class in permutation order, then the second of each, ...; the one
class-balanced order, :func:`datamodules.subsets.class_balanced_order`), so any ``num_samples``
covers the classes as evenly as the data allows; the same images every epoch and on every rank.
Labels are read without loading images (:func:`datamodules.subsets.dataset_labels`); a dataset
without them gets the first ``num_samples`` entries of the permutation (class-agnostic). Rank r of
w takes the positions r, r + w, r + 2w, ... of that list (a DistributedSampler-like split *without*
padding: no image is evaluated twice, so means over ranks equal the single-process mean; shard
sizes may differ by one). Items may be ``(x, y)`` or ``(x, y, mask)``; batches carry the dataset
indices (``ids``) so that per-sample randomness can be keyed by them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from datamodules.subsets import class_balanced_order, dataset_labels, seeded_permutation


def subset_indices(num_items: int, num_samples: int, seed: int) -> Tensor:
    """The first ``num_samples`` indices of a permutation of ``range(num_items)`` seeded by ``seed``."""
    _check_sizes(num_items, num_samples)
    return seeded_permutation(num_items, seed)[: min(num_samples, num_items)]


def balanced_subset_indices(labels: Tensor, num_samples: int, seed: int) -> Tensor:
    """``num_samples`` indices taking the classes in turns (ascending label) along
    :func:`~datamodules.subsets.seeded_permutation` of all indices: the evaluation subset's
    class-balanced order."""
    _check_sizes(labels.numel(), num_samples)
    order = class_balanced_order(labels, seed, class_order="sorted", draw="permutation", limit=num_samples)
    return torch.tensor(order, dtype=torch.long)


def _check_sizes(num_items: int, num_samples: int) -> None:
    if num_items < 1:
        raise ValueError("the evaluation dataset is empty")
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")


def shard_indices(indices: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s share of ``indices``: positions rank, rank + world_size, ..."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    return indices[rank::world_size]


@dataclass
class EvalBatch:
    """x (B, C, H, W); y (B,); mask (B, H, W) or None; ids (B,) dataset indices."""

    x: Tensor
    y: Tensor
    mask: Tensor | None
    ids: Tensor

    def select(self, keep: Tensor) -> "EvalBatch":
        """The items where ``keep`` (B,) bool is True."""
        return EvalBatch(self.x[keep], self.y[keep], None if self.mask is None else self.mask[keep], self.ids[keep])

    def to(self, device, dtype: torch.dtype | None = None) -> "EvalBatch":
        x = self.x.to(device=device, dtype=dtype) if dtype is not None else self.x.to(device)
        mask = None if self.mask is None else self.mask.to(device)
        return EvalBatch(x, self.y.to(device), mask, self.ids.to(device))


def item_has_mask(dataset: Dataset) -> bool:
    """Whether the dataset's items are ``(x, y, mask)`` (looked up on item 0, same on all ranks)."""
    has = getattr(dataset, "has_masks", None)
    if isinstance(has, bool):
        return has
    item = dataset[0]
    return isinstance(item, (tuple, list)) and len(item) >= 3


class EvalSubset:
    """Loads rank ``rank``'s shard of the evaluation subset once and serves it in batches."""

    def __init__(
        self, dataset: Dataset, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1,
        batch_size: int = 64, balanced: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.dataset = dataset
        labels = dataset_labels(dataset) if balanced else None
        self.balanced = labels is not None
        self.indices = (balanced_subset_indices(labels, num_samples, seed) if self.balanced
                        else subset_indices(len(dataset), num_samples, seed))
        self.shard = shard_indices(self.indices, rank, world_size)
        self.batch_size = batch_size
        self.has_mask = item_has_mask(dataset)
        self._batches: list[EvalBatch] | None = None

    def __len__(self) -> int:
        return int(self.shard.numel())

    def _load(self) -> list[EvalBatch]:
        batches = []
        for chunk in self.shard.split(self.batch_size):
            items, ids = [], []
            for i in chunk.tolist():  # data loading is per item; the evaluation is batched
                item = self.dataset[i]
                if item is None:  # a skipped (corrupt) image
                    continue
                items.append(tuple(item[:3]) if self.has_mask else tuple(item[:2]))
                ids.append(i)
            if not items:
                continue
            cols = default_collate(items)
            x, y = cols[0], torch.as_tensor(cols[1])
            mask = cols[2] if self.has_mask else None
            batches.append(EvalBatch(x, y.long(), mask, torch.tensor(ids, dtype=torch.long)))
        return batches

    def __iter__(self) -> Iterator[EvalBatch]:
        if self._batches is None:
            self._batches = self._load()
        return iter(self._batches)
