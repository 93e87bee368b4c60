"""The one class-balanced order (datamodules/subsets.py) and the label readers.

The pinned index lists were recorded from the three separate implementations the order replaced
(the evaluation subsets, the evaluation loaders' interleaving, the study's subsets): each caller
must keep selecting the same images, since every stored number depends on them.
"""

import pytest
import torch
from lightning.fabric.utilities.data import AttributeDict
from torch.utils.data import Dataset, Subset, TensorDataset

from benchmarks.reproduce.data import labels_of, study_order
from callbacks._eval_subset import EvalSubset
from datamodules.image_folder import DataLoaderMixin
from datamodules.subsets import TransformSubset, class_balanced_order, dataset_labels, dataset_targets

LABELS = {
    "non_contiguous": [2, 5, 9, 5, 2, 2, 9, 9, 9, 5, 2, 5, 9],
    "unequal": [0, 2, 0, 1, 2, 2, 0, 0, 0, 0, 0, 2, 2, 1, 2, 0, 0, 2, 1, 0],
    "negative": [-1, 3, 4, 4, -1, 3, 3, 3, -1, 4, 4],
    "ten": [(7 * i + i // 5) % 10 for i in range(57)],
}
# (labels, seed, num_samples) -> EvalSubset(...).indices
EVAL_SUBSETS = {
    ("non_contiguous", 0, 9): [4, 3, 2, 0, 11, 8, 5, 9, 12],
    ("unequal", 5, 7): [0, 3, 11, 9, 18, 14, 10],
    ("negative", 1, 11): [0, 7, 10, 4, 6, 2, 8, 1, 3, 5, 9],
    ("ten", 3, 23): [25, 28, 24, 13, 9, 41, 44, 26, 22, 18, 32, 3, 49, 6, 27, 48, 37, 51, 4, 36, 7, 53, 10],
}
# (labels, datamodule seed) -> the evaluation loader's order
LOADER_ORDERS = {
    ("non_contiguous", 0): [7, 4, 1, 12, 5, 9, 8, 0, 11, 6, 10, 3, 2],
    ("unequal", 7): [10, 12, 18, 16, 5, 3, 0, 1, 13, 15, 11, 8, 17, 2, 4, 9, 14, 7, 19, 6],
    ("negative", 1): [8, 1, 9, 0, 5, 3, 4, 7, 10, 6, 2],
    ("ten", 2): [49, 25, 26, 12, 18, 16, 13, 20, 54, 46, 17, 0, 33, 37, 36, 23, 56, 45, 15, 3, 42, 32, 51, 30, 11,
                 48, 6, 9, 4, 21, 35, 39, 8, 19, 43, 41, 31, 27, 47, 28, 24, 50, 1, 44, 38, 2, 40, 53, 10, 14, 55,
                 52, 29, 7, 5, 34, 22],
}
# (labels, seed, n) -> the study's subset
STUDY_ORDERS = {
    ("non_contiguous", 0, None): [5, 11, 12, 0, 9, 6, 4, 3, 7, 10, 1, 2, 8],
    ("unequal", 1, 5): [16, 18, 4, 8, 13],
    ("negative", 4, 8): [0, 6, 3, 4, 7, 10, 8, 1],
    ("ten", 1, 20): [39, 28, 17, 38, 27, 23, 55, 26, 15, 43, 0, 46, 10, 6, 9, 48, 44, 1, 29, 36],
}


class Targets(Dataset):
    """A dataset exposing ``targets`` (like the project's image datasets)."""

    def __init__(self, targets):
        self.targets = list(targets)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.zeros(1), self.targets[i]


class Loaders(DataLoaderMixin):
    def __init__(self, dataset, seed):
        self.hparams = AttributeDict(num_workers=0, batch_size=4, seed=seed)
        self.val_dataset = dataset


@pytest.mark.parametrize("case", sorted(EVAL_SUBSETS))
def test_evaluation_subsets_keep_their_images(case):
    name, seed, n = case
    data = TensorDataset(torch.zeros(len(LABELS[name]), 1), torch.tensor(LABELS[name]))
    assert EvalSubset(data, n, seed=seed).indices.tolist() == EVAL_SUBSETS[case]


@pytest.mark.parametrize("case", sorted(LOADER_ORDERS))
def test_evaluation_loaders_keep_their_interleaving(case):
    name, seed = case
    labels = LABELS[name]
    loader = Loaders(TransformSubset(Targets(labels), range(len(labels))), seed).val_dataloader()
    assert list(loader.dataset.indices) == LOADER_ORDERS[case]


@pytest.mark.parametrize("case", sorted(STUDY_ORDERS, key=str))
def test_study_subsets_keep_their_images(case):
    name, seed, n = case
    assert study_order(LABELS[name], n, seed=seed) == STUDY_ORDERS[case]


@pytest.mark.parametrize("draw, class_order", [("per_class", "sorted"), ("per_class", "seeded"), ("permutation", "sorted")])
def test_every_prefix_is_class_balanced(draw, class_order):
    labels = LABELS["unequal"]  # classes of 10, 3 and 7
    order = class_balanced_order(labels, 4, draw=draw, class_order=class_order)
    assert sorted(order) == list(range(len(labels)))
    for m in range(1, len(order) + 1):
        counts = [sum(labels[i] == c for i in order[:m]) for c in (0, 1, 2)]
        # a class with items left is at most one turn behind the others
        assert all(n >= max(counts) - 1 for n, total in zip(counts, (10, 3, 7)) if n < total), (m, counts)
    assert class_balanced_order(labels, 4, draw=draw, class_order=class_order, limit=6) == order[:6]
    assert class_balanced_order([], 4, draw=draw, class_order=class_order) == []


def test_order_settings_are_checked():
    with pytest.raises(ValueError, match=r"class_order='random' is not known; valid: \('sorted', 'seeded'\)"):
        class_balanced_order([0, 1], class_order="random")
    with pytest.raises(ValueError, match=r"draw='global' is not known; valid: \('per_class', 'permutation'\)"):
        class_balanced_order([0, 1], draw="global")
    with pytest.raises(ValueError, match="class_order='seeded' needs draw='per_class'"):
        class_balanced_order([0, 1], class_order="seeded", draw="permutation")
    with pytest.raises(ValueError, match="limit=-1 must be >= 0"):
        class_balanced_order([0, 1], limit=-1)


def test_labels_are_read_without_decoding_images():
    labels = LABELS["negative"]
    view = Subset(TransformSubset(Targets(labels), [3, 0, 8]), [2, 0])
    assert dataset_targets(view) == [labels[8], labels[3]] == labels_of(view)
    assert dataset_targets(TensorDataset(torch.zeros(2, 1), torch.tensor([0, 1]))) is None
    with pytest.raises(TypeError, match="cannot read the labels of TensorDataset without decoding it"):
        labels_of(TensorDataset(torch.zeros(2, 1), torch.tensor([0, 1])))
    # the evaluation subsets' reader: any map-style dataset, one integer label per item
    tensors = TensorDataset(torch.zeros(4, 1), torch.tensor([3, 1, 2, 0]))
    assert dataset_labels(Subset(tensors, [2, 3])).tolist() == [2, 0]
    assert dataset_labels(TensorDataset(torch.zeros(2, 1), torch.tensor([0.0, 1.0]))) is None
    assert dataset_labels([(torch.zeros(1), 0)]) is None
