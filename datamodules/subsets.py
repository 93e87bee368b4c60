"""Index views of datasets, their labels read without decoding images, and the one class-balanced
order (plain torch and numpy; the DataModules, the evaluation callbacks and the study use it).

:func:`class_balanced_order` interleaves the classes round-robin: turn r takes the r-th index of
each class (in class order) while the class lasts, so every prefix of length m holds at least
floor(m / C) indices of each of the C classes while they last. Where each class's indices come
from, and the class order, are its parameters; each caller keeps its own (every stored subset
depends on them):

=============================================  ===============  ================================
caller                                         ``class_order``  ``draw``
=============================================  ===============  ================================
evaluation subsets (``callbacks/_eval_subset``)  ``sorted``       ``permutation``
evaluation loaders (``DataLoaderMixin``)         ``seeded``       ``per_class``
the study's subsets (``benchmarks/reproduce``)   ``sorted``       ``per_class``
=============================================  ===============  ================================

Labels: :func:`dataset_targets` reads the ``targets`` of the project's datasets through
:class:`TransformSubset` and ``Subset`` views (the loaders' and the study's reader);
:func:`dataset_labels` reads any map-style dataset's labels for the evaluation subset
(``TensorDataset``'s second tensor, a ``targets`` / ``labels`` / ``y`` attribute, through
``Subset`` and ``TransformSubset`` views, checked to be one integer per item). Both give None where there are none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

CLASS_ORDERS: tuple[str, ...] = ("sorted", "seeded")
DRAWS: tuple[str, ...] = ("per_class", "permutation")


class TransformSubset(Dataset):
    """``base[indices[i]]`` with ``transform`` applied to the image (base yields (PIL, label))."""

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Callable | None = None):
        self.base = base
        self.indices = list(int(i) for i in indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        img, label = self.base[self.indices[index]]
        if self.transform is not None:
            img = self.transform(img)
        return img, int(label)


def dataset_targets(dataset: Dataset) -> list[int] | None:
    """Labels of a dataset without decoding images (``targets`` of the project's datasets, through
    ``TransformSubset``/``Subset``), or None when the dataset does not expose them."""
    if isinstance(dataset, (TransformSubset, Subset)):
        base = dataset_targets(dataset.base if isinstance(dataset, TransformSubset) else dataset.dataset)
        return None if base is None else [base[i] for i in dataset.indices]
    targets = getattr(dataset, "targets", None)
    return None if targets is None else [int(t) for t in targets]


def dataset_labels(dataset: Dataset) -> Tensor | None:
    """The labels (N,) long of any map-style dataset without loading images, or None: a
    ``TensorDataset``'s second tensor or a ``targets`` / ``labels`` / ``y`` attribute, through
    ``Subset`` and ``TransformSubset`` views (CIFAR-10 from torchvision's files); None unless one
    integer per item."""
    if isinstance(dataset, (Subset, TransformSubset)):
        inner = dataset_labels(dataset.dataset if isinstance(dataset, Subset) else dataset.base)
        return None if inner is None else inner[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        labels = dataset.tensors[1]
    else:
        labels = next((getattr(dataset, a) for a in ("targets", "labels", "y") if hasattr(dataset, a)), None)
    if labels is None:
        return None
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.numel() != len(dataset) or labels.is_floating_point():
        return None
    return labels.long()


def seeded_permutation(n: int, seed: int) -> Tensor:
    """A permutation of ``range(n)`` (n,) long from a ``torch.Generator`` seeded by ``seed``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))


def class_balanced_order(
    targets: Sequence[int] | Tensor, seed: int = 0, *, class_order: str = "sorted", draw: str = "per_class",
    limit: int | None = None,
) -> list[int]:
    """Indices into ``targets`` (N labels), classes interleaved round-robin (module docstring).

    ``class_order``: ``sorted`` (ascending label) or ``seeded`` (a permutation of the classes,
    the first draw of the per-class generator). ``draw``: ``per_class`` (``numpy.random.default_rng(seed)``
    shuffles each class's indices in turn, in class order) or ``permutation`` (each class's
    indices in the order of :func:`seeded_permutation` (N, seed); ``class_order`` ``sorted``).
    ``limit``: keep the first ``limit`` indices (None: all N).

    Examples:
        >>> class_balanced_order([0, 0, 1, 1, 1], seed=3)  # class 0, class 1, class 0, ...
        [1, 2, 0, 4, 3]
        >>> class_balanced_order([0, 0, 1, 1, 1], seed=3, class_order="seeded")  # class 1 first
        [2, 1, 4, 0, 3]
        >>> class_balanced_order([0, 0, 1, 1, 1], seed=3, draw="permutation", limit=4)
        [1, 3, 0, 4]
    """
    if class_order not in CLASS_ORDERS:
        raise ValueError(f"class_order={class_order!r} is not known; valid: {CLASS_ORDERS}")
    if draw not in DRAWS:
        raise ValueError(f"draw={draw!r} is not known; valid: {DRAWS}")
    if draw == "permutation" and class_order != "sorted":
        raise ValueError(f"class_order={class_order!r} needs draw='per_class' (draw='permutation' takes the "
                         "classes in sorted order)")
    if limit is not None and limit < 0:
        raise ValueError(f"limit={limit} must be >= 0 (or None for every index)")
    labels = np.asarray(targets.tolist() if isinstance(targets, Tensor) else list(targets), dtype=np.int64)
    if labels.size == 0:
        return []
    if draw == "permutation":
        perm = seeded_permutation(labels.size, seed).numpy()
        queues = _class_queues(labels[perm], None, lambda group: perm[group])
    else:
        rng = np.random.default_rng(seed)
        order = rng.permutation(np.unique(labels)) if class_order == "seeded" else None
        queues = _class_queues(labels, order, rng.permutation)
    turn = np.concatenate([np.arange(len(q)) for q in queues])
    position = np.repeat(np.arange(len(queues)), [len(q) for q in queues])
    interleaved = np.concatenate(queues)[np.lexsort((position, turn))]  # by turn, then class position
    return [int(i) for i in (interleaved if limit is None else interleaved[:limit])]


def _class_queues(labels: np.ndarray, classes: np.ndarray | None, take: Callable[[np.ndarray], Any]) -> list[np.ndarray]:
    """``take(positions of class c in labels, ascending)`` for each class c in ``classes`` (None:
    sorted), called in class order."""
    by_class = np.argsort(labels, kind="stable")
    values, counts = np.unique(labels, return_counts=True)
    groups = dict(zip(values.tolist(), np.split(by_class, np.cumsum(counts)[:-1])))
    return [np.asarray(take(groups[int(c)])) for c in (values if classes is None else classes)]
