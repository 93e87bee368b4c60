import os

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import CIFAR10_CLASSES, CIFAR10DataModule


def _write_cifar_folder(root, per_class=3):
    """10 classes x per_class 32x32 PNGs per split; pixel value encodes (label, index)."""
    for split in ("train", "test"):
        for label, cls in enumerate(CIFAR10_CLASSES):
            os.makedirs(root / split / cls)
            for k in range(per_class):
                arr = np.zeros((32, 32, 3), np.uint8)
                arr[..., 0] = 20 * label
                arr[..., 1] = 10 * k + (100 if split == "test" else 0)
                Image.fromarray(arr).save(root / split / cls / f"{k:04d}.png")
    return root


@pytest.fixture
def cifar_dir(tmp_path):
    return _write_cifar_folder(tmp_path / "cifar")


def _dm(root, **kw):
    args = dict(data_dir=str(root), val_fraction=0.2, augment=False, batch_size=8, seed=0)
    args.update(kw)
    dm = CIFAR10DataModule(**args)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _label_from_pixel(img):
    return int(round(float(img[0, 0, 0]) * 255 / 20))


def test_folder_layout_labels_and_sizes(cifar_dir):
    dm = _dm(cifar_dir)
    assert dm.layout == "folder"
    assert (dm.num_classes, dm.image_size, dm.in_chans, dm.has_masks) == (10, 32, 3, False)
    assert dm.class_names == CIFAR10_CLASSES
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (24, 6, 30)
    for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        for i in range(len(ds)):
            img, label = ds[i]
            assert img.shape == (3, 32, 32) and img.dtype == torch.float32
            assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
            assert _label_from_pixel(img) == label
    # val is class-balanced: 6 images from 6 different classes, disjoint from train
    val_paths = {p for p, _ in dm.val_dataset.samples}
    assert len({t for _, t in dm.val_dataset.samples}) == 6
    assert not val_paths & {p for p, _ in dm.train_dataset.samples}
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (8, 3, 32, 32) and y.dtype == torch.int64
    assert len(set(y.tolist())) == 8  # evaluation order interleaves the classes (seeded, not shuffled per epoch)
    assert torch.equal(next(iter(dm.test_dataloader()))[1], y)


def test_split_is_seeded(cifar_dir):
    def val_paths(seed):
        return [p for p, _ in _dm(cifar_dir, seed=seed).val_dataset.samples]

    assert val_paths(0) == val_paths(0)
    assert val_paths(0) != val_paths(1)


def test_augment_keeps_shape_and_range(cifar_dir):
    dm = _dm(cifar_dir, augment=True)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_missing_data_dir_message(tmp_path):
    missing = tmp_path / "nowhere"
    dm = CIFAR10DataModule(data_dir=str(missing))
    dm.prepare_data()  # download is False: does nothing
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("fit")
    msg = str(info.value)
    assert str(missing) in msg
    assert "train/<class>/" in msg and "test/<class>/" in msg
    assert "download: true" in msg


def test_wrong_class_folders(tmp_path):
    root = _write_cifar_folder(tmp_path / "c", per_class=1)
    os.rename(root / "train" / "cat", root / "train" / "kitten")
    with pytest.raises(ValueError) as info:
        _dm(root, val_fraction=0.0)
    assert "cat" in str(info.value) and "kitten" in str(info.value)


def test_val_fraction_zero_uses_test(cifar_dir):
    dm = _dm(cifar_dir, val_fraction=0.0)
    assert len(dm.train_dataset) == 30 and dm.val_dataset is dm.test_dataset
