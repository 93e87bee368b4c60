"""Data for the study: the project's DataModules, cut to fixed class-balanced subsets.

All subsets use a *round-robin* class-balanced order (:func:`study_order`, the project's one
class-balanced order with the classes sorted): a seeded permutation inside each class, then class
0's first image, class 1's first, ..., class 0's second, ... . Any prefix whose length is a
multiple of the class count is therefore balanced, so the smaller evaluations (paper column,
step check, SmoothGrad, PSE) run on the first images of the main evaluation subset and stay
balanced. The split seeds are fixed whatever ``--seed`` is, so every run sees the same images.

Validation and test images both come from CIFAR-10's *test* split (:func:`split_test`): the
published weights were trained on the train split, so validation images drawn from it would be
memorised (the earlier study's val accuracy was 0.916 against 0.860 on test images).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from datamodules import CIFAR10DataModule
from datamodules.subsets import class_balanced_order, dataset_targets

from benchmarks.reproduce.presets import TaskConfig

SPLIT_SEED = 0


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


def build_datamodule(task: TaskConfig, data_dir: str, train_size: int | None):
    """The project's CIFAR-10 DataModule for ``task`` with its train split (all of CIFAR-10's
    train images: ``val_fraction`` 0) cut to ``train_size`` class-balanced images; ``setup()``
    already called. Its val and test splits are not used for training."""
    if task.dataset != "cifar10":
        raise ValueError(f"dataset={task.dataset!r} is not known; valid: cifar10")
    dm = CIFAR10DataModule(data_dir=data_dir, val_fraction=0.0, augment=task.augment, batch_size=task.batch_size,
                           num_workers=task.num_workers, seed=SPLIT_SEED)
    dm.setup("fit")
    dm.train_dataset = Subset(dm.train_dataset, study_order(labels_of(dm.train_dataset), train_size))
    return dm


def split_test(targets: list[int], val_size: int, seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """The test split cut in two disjoint class-balanced parts: the first ``val_size`` indices of
    the study's order (seeded by ``seed``) for validation, the rest for testing (in the same
    order, so every prefix of the test part whose length is a multiple of the class count is
    balanced too). ``val_size`` must leave test images and be a multiple of the class count."""
    classes = len(set(targets))
    if not 0 < val_size < len(targets) or val_size % classes:
        raise ValueError(f"val_size={val_size} must be a multiple of the {classes} classes between 0 and the "
                         f"{len(targets)} test images (exclusive)")
    order = study_order(targets, None, seed=seed)
    return order[:val_size], order[val_size:]


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

    CIFAR-10's test split, which the published weights and every training stage never see, is cut
    by :func:`split_test`: ``val_acc`` (a dataset, streamed) holds ``task.val_size`` images for
    validation; ``test_acc`` the first ``eval.test_acc_size`` (None: all) of the others for the
    test accuracy; ``test`` the first attack images of that test part as tensors (``eval.size``,
    the paper column and the extras take prefixes of it). ``split``: what the report states.
    """
    dm = CIFAR10DataModule(data_dir=data_dir, val_fraction=0.0, augment=False, batch_size=task.batch_size,
                           num_workers=0, seed=SPLIT_SEED)
    dm.setup("test")
    test_ds = dm.test_dataset
    targets = labels_of(test_ds)
    val_idx, test_idx = split_test(targets, task.val_size, task.split_seed)
    ev = task.eval
    n_acc = len(test_idx) if ev.test_acc_size is None else min(int(ev.test_acc_size), len(test_idx))
    n_attack = max(ev.size, ev.check_size, ev.paper_size, ev.explainer_size, ev.pse_size)
    if n_attack > len(test_idx):
        raise ValueError(f"the evaluation needs {n_attack} attack images but the test part has {len(test_idx)} "
                         f"(val_size={task.val_size} of {len(targets)} test images)")
    return {
        "val_acc": Subset(test_ds, val_idx),
        "test_acc": Subset(test_ds, test_idx[:n_acc]),
        "test": load_images(test_ds, test_idx[:n_attack]),
        "split": {"source": "CIFAR-10 test split", "images": len(targets), "seed": task.split_seed,
                  "val": len(val_idx), "test": len(test_idx), "test_acc": n_acc, "attack": n_attack,
                  "val_ids": [int(i) for i in val_idx], "test_ids": [int(i) for i in test_idx]},
    }
