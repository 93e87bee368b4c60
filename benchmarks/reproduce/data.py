"""Data for the study: the project's DataModules, cut to fixed class-balanced subsets.

All subsets use a *round-robin* class-balanced order (:func:`study_order`, the project's one
class-balanced order with the classes sorted): a seeded permutation inside each class, then class
0's first image, class 1's first, ..., class 0's second, ... . Any prefix whose length is a
multiple of the class count is therefore balanced, so the smaller evaluations (step curve,
SmoothGrad, PSE) run on the first images of the main evaluation subset and stay balanced.
The split seed is fixed (0) whatever ``--seed`` is, so every run sees the same images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from datamodules import CIFAR10DataModule, ImageNetSubsetDataModule
from datamodules.subsets import class_balanced_order, dataset_targets

from benchmarks.reproduce.presets import TaskConfig

SPLIT_SEED = 0
REPO = Path(__file__).resolve().parents[2]
IMAGENETTE_CLASSES = REPO / "configs" / "data" / "imagenette_classes.txt"


def labels_of(ds: Dataset) -> list[int]:
    """Labels of one of the project's datasets without decoding images
    (:func:`datamodules.subsets.dataset_targets`); a dataset without them is an error."""
    targets = dataset_targets(ds)
    if targets is None:
        raise TypeError(f"cannot read the labels of {type(ds).__name__} without decoding it")
    return targets


def study_order(targets: list[int], n: int | None, seed: int = SPLIT_SEED) -> list[int]:
    """The first ``n`` (None: all) indices in the study's class-balanced order: classes sorted,
    each shuffled by its own draw (:func:`datamodules.subsets.class_balanced_order`)."""
    return class_balanced_order(targets, seed, class_order="sorted", draw="per_class", limit=None if n is None else int(n))


def build_datamodule(task: TaskConfig, data_dir: str, train_size: int | None, seed_batch: int = SPLIT_SEED):
    """The project's DataModule for ``task`` with its train split cut to ``train_size`` images
    (balanced) and its val split cut to ``task.val_size`` images; ``setup()`` already called."""
    common = dict(
        val_fraction=task.val_fraction, augment=task.augment, batch_size=task.batch_size,
        num_workers=task.num_workers, seed=SPLIT_SEED,
    )
    if task.dataset == "cifar10":
        dm = CIFAR10DataModule(data_dir=data_dir, **common)
    elif task.dataset == "imagenette":
        dm = ImageNetSubsetDataModule(
            data_dir=data_dir, class_list=str(IMAGENETTE_CLASSES), image_size=task.image_size, **common
        )
    else:
        raise ValueError(f"dataset={task.dataset!r} is not known; valid: cifar10, imagenette")
    dm.setup("fit")
    dm.train_dataset = Subset(dm.train_dataset, study_order(labels_of(dm.train_dataset), train_size))
    dm.val_dataset = Subset(dm.val_dataset, study_order(labels_of(dm.val_dataset), task.val_size))
    return dm


@dataclass
class ImageSet:
    """Images x (N, C, H, W) in [0, 1], labels y (N,), ids (N,) (indices into the split)."""

    x: Tensor
    y: Tensor
    ids: Tensor

    def head(self, n: int) -> "ImageSet":
        return ImageSet(self.x[:n], self.y[:n], self.ids[:n])

    def __len__(self) -> int:
        return int(self.y.numel())


def load_images(ds: Dataset, indices: list[int], batch_size: int = 256) -> ImageSet:
    """Decode ``ds[i]`` for the given indices into tensors (eval transforms of the split)."""
    indices = [int(i) for i in indices]
    sub = Subset(ds, indices)
    xs, ys = [], []
    for x, y in DataLoader(sub, batch_size=batch_size, shuffle=False, num_workers=0):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    return ImageSet(torch.cat(xs), torch.cat(ys).long(), torch.tensor(indices, dtype=torch.long))


def eval_sets(task: TaskConfig, data_dir: str) -> dict:
    """The fixed evaluation data (same images for every model and every ``--seed``).

    ``val_acc`` / ``test_acc``: datasets (streamed) for the clean accuracy on ``val_size`` val and
    ``test_acc_size`` test images; ``val_attack``: the first ``sweep_eval_size`` of those val images
    as tensors (the sweep's P@k); ``test``: the attack subset of the test split as tensors.
    """
    dm = build_datamodule(task, data_dir, train_size=1)
    val_ds = dm.val_dataset  # a balanced Subset of val_size images
    test_targets = labels_of(dm.test_dataset)
    ev = task.eval
    n_attack = max(ev.size, ev.check_size, ev.paper_size, ev.explainer_size, ev.pse_size)
    attack_idx = study_order(test_targets, n_attack, seed=ev.seed)
    acc_idx = study_order(test_targets, ev.test_acc_size, seed=ev.seed + 1)
    n_sweep = min(task.sweep_eval_size, len(val_ds.indices))
    return {
        "val_acc": val_ds,
        "val_attack": load_images(val_ds.dataset, list(val_ds.indices)[:n_sweep]) if n_sweep else None,
        "test": load_images(dm.test_dataset, attack_idx),
        "test_acc": Subset(dm.test_dataset, acc_idx),
    }
