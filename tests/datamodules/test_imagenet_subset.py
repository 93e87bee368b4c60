import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import BadImageError, ImageNetSubsetDataModule, SkipNoneCollate
from datamodules.imagenet_subset import ResizeCenterCrop

WNIDS = ["n01440764", "n02102040", "n03000684"]  # sorted
VALUE = {w: 60 * (i + 1) for i, w in enumerate(WNIDS)}  # red channel encodes the folder


def _img(wnid, size=(40, 30), gray=False):
    if gray:
        return Image.fromarray(np.full(size[::-1], VALUE[wnid], np.uint8), mode="L")
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[..., 0] = VALUE[wnid]
    return Image.fromarray(arr)


@pytest.fixture
def inet_dir(tmp_path):
    root = tmp_path / "inet"
    for split, n in (("train", 4), ("val", 2)):
        for w in WNIDS:
            os.makedirs(root / split / w)
            for k in range(n):
                _img(w, gray=(k == 1)).save(root / split / w / f"{w}_{k}.JPEG", quality=95)
    return root


def _add_extra_class(root, splits):
    for split in splits:
        os.makedirs(root / split / "n09999999")
        _img(WNIDS[0]).save(root / split / "n09999999" / "x.JPEG")


def _write_list(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _dm(root, **kw):
    args = dict(data_dir=str(root), image_size=16, augment=False, batch_size=64)
    args.update(kw)
    dm = ImageNetSubsetDataModule(**args)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _folder_of(img):
    value = float(img[0].mean()) * 255
    return min(WNIDS, key=lambda w: abs(VALUE[w] - value))


def test_class_list_order_defines_labels(inet_dir, tmp_path):
    order = ["n03000684", "n01440764", "n02102040"]  # not sorted
    cl = _write_list(tmp_path / "classes.txt",
                     ["# subset", "", order[0], "  " + order[1] + "  # tench", "", order[2]])
    _add_extra_class(inet_dir, ["train"])  # a folder not in the list is ignored
    dm = _dm(inet_dir, class_list=cl)
    assert dm.class_names == order and dm.num_classes == 3
    assert (dm.image_size, dm.in_chans, dm.has_masks) == (16, 3, False)
    assert len(dm.train_dataset) == 12 and len(dm.val_dataset) == 6
    assert dm.test_dataset is dm.val_dataset  # no test/ folder
    for ds in (dm.train_dataset, dm.val_dataset):
        for i in range(len(ds)):
            img, label = ds[i]
            assert img.shape == (3, 16, 16) and 0.0 <= float(img.min()) <= float(img.max()) <= 1.0
            assert _folder_of(img) == order[label]
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (6, 3, 16, 16) and sorted(y.tolist()) == [0, 0, 1, 1, 2, 2]
    assert y.tolist() == _loader_labels(dm.val_dataloader())


def test_without_class_list_sorted_folders(inet_dir):
    _add_extra_class(inet_dir, ["train"])
    dm = ImageNetSubsetDataModule(data_dir=str(inet_dir), image_size=16, val_fraction=0.25)
    assert dm.class_names == WNIDS + ["n09999999"]  # available before setup
    _add_extra_class(inet_dir, ["val"])
    dm.setup("fit")
    assert len(dm.train_dataset) + len(dm.val_dataset) == 13 and len(dm.val_dataset) == 3
    assert len(dm.test_dataset) == 7  # the val/ folder
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (3, 16, 16)


def test_class_list_entry_without_folder(inet_dir, tmp_path):
    cl = _write_list(tmp_path / "c.txt", [WNIDS[0], "n04444444"])
    with pytest.raises(ValueError) as info:
        _dm(inet_dir, class_list=cl)
    assert "n04444444" in str(info.value) and str(inet_dir / "train") in str(info.value)


def test_class_list_duplicates(inet_dir, tmp_path):
    cl = _write_list(tmp_path / "c.txt", [WNIDS[0], WNIDS[1], WNIDS[0]])
    with pytest.raises(ValueError, match="duplicate"):
        _dm(inet_dir, class_list=cl)


def test_empty_class_folder(inet_dir):
    os.makedirs(inet_dir / "train" / "n00000000")
    with pytest.raises(ValueError, match="no images"):
        _dm(inet_dir)


def test_eval_resize_skips_images_already_at_size():
    t = ResizeCenterCrop(16, 18)
    same = Image.new("RGB", (16, 16))
    assert t(same) is same
    assert t(Image.new("RGB", (40, 30))).size == (16, 16)


def _corrupt(root, kind):
    path = root / "val" / WNIDS[1] / f"{WNIDS[1]}_0.JPEG"
    if kind == "truncated":
        _img(WNIDS[1], size=(64, 64)).save(path, quality=95)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(np.random.default_rng(0).bytes(300))
    return str(path)


@pytest.mark.parametrize("kind", ["truncated", "random"])
def test_bad_image_error(inet_dir, kind):
    bad = _corrupt(inet_dir, kind)
    dm = _dm(inet_dir)
    with pytest.raises(BadImageError) as info:
        next(iter(dm.val_dataloader()))
    assert bad in str(info.value) and "bad_images: skip" in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("kind", ["truncated", "random"])
def test_bad_image_skip(inet_dir, kind, caplog):
    bad = _corrupt(inet_dir, kind)
    dm = _dm(inet_dir, bad_images="skip")
    with caplog.at_level(logging.WARNING):
        x, y = next(iter(dm.val_dataloader()))
        next(iter(dm.val_dataloader()))  # second pass: counted again, warned once
    assert x.shape == (5, 3, 16, 16) and sorted(y.tolist()) == [0, 0, 1, 2, 2]
    assert y.tolist() == _loader_labels(dm.val_dataloader(), [bad])  # no label shift
    assert dm.val_dataset.num_skipped == 2
    assert sum(bad in r.getMessage() for r in caplog.records) == 1


def test_skip_counts_once_per_read(inet_dir):
    _corrupt(inet_dir, "random")
    dm = _dm(inet_dir, bad_images="skip")
    x, y = next(iter(dm.val_dataloader()))
    assert len(y) == 5 and dm.val_dataset.num_skipped == 1


def test_all_bad_batch_is_empty():
    x, y = SkipNoneCollate((3, 16, 16))([None, None])
    assert x.shape == (0, 3, 16, 16) and y.shape == (0,) and y.dtype == torch.int64


def test_missing_split_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        _dm(tmp_path / "absent")


def _loader_labels(loader, bad_paths=()):
    """Labels in the evaluation loader's (class-interleaved) order, without the unreadable files."""
    ds = loader.dataset
    return [ds.dataset.targets[i] for i in ds.indices if str(ds.dataset.samples[i][0]) not in {str(p) for p in bad_paths}]
