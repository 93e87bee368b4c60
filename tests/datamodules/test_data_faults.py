"""Data faults: bad files, missing/extra/hidden folders, empty splits, class lists that do not match.

Every case ends in a clear error naming the file/folder/class, or (``bad_images: skip``) in a
counted skip; labels never shift (the red channel of every image encodes its true class).
"""

from __future__ import annotations

import logging
import os

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import CIFAR10_CLASSES, BadImageError, CIFAR10DataModule, ImageNetSubsetDataModule

WNIDS = ["n01440764", "n02102040", "n03000684", "n03028079"]  # sorted
RED = {w: 50 * (i + 1) for i, w in enumerate(WNIDS)}


def _image(wnid: str, mode: str = "RGB", size=(20, 20)) -> Image.Image:
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[..., 0] = RED[wnid]
    img = Image.fromarray(arr)
    if mode == "CMYK":
        return img.convert("CMYK")
    if mode == "RGBA":
        return img.convert("RGBA")
    if mode == "P":
        return img.convert("P")
    return img


def _class_of(img: torch.Tensor) -> str:
    value = float(img[0].mean()) * 255
    return min(WNIDS, key=lambda w: abs(RED[w] - value))


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "inet"
    for split, n in (("train", 3), ("val", 2)):
        for w in WNIDS:
            (root / split / w).mkdir(parents=True)
            for k in range(n):
                _image(w).save(root / split / w / f"{k}.png")
    return root


def _dm(root, **kw):
    args = dict(data_dir=str(root), image_size=8, augment=False, batch_size=64)
    args.update(kw)
    dm = ImageNetSubsetDataModule(**args)
    dm.setup("fit")
    return dm


def _labels_match(ds) -> None:
    for i in range(len(ds)):
        item = ds[i]
        if item is None:
            continue
        img, label = item
        assert _class_of(img) == ds.classes[label], (ds.samples[i], label)


# ------------------------------------------------------------------------------ bad files
def _zero_byte(path):
    path.write_bytes(b"")


def _truncated_png(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _html_page(path):
    path.write_bytes(b"<!DOCTYPE html><html><body>403 Forbidden</body></html>")


def _broken_symlink(path):
    path.unlink()
    os.symlink(path.parent / "does-not-exist.png", path)


def _truncated_jpeg(path):
    jpeg = path.with_suffix(".jpg")
    path.unlink()
    _image(WNIDS[1], size=(64, 64)).save(jpeg, quality=95)
    data = jpeg.read_bytes()
    jpeg.write_bytes(data[: len(data) * 2 // 3])
    return jpeg


BAD_FILES = {"zero_byte": _zero_byte, "truncated_png": _truncated_png, "truncated_jpeg": _truncated_jpeg,
             "html_as_image": _html_page, "broken_symlink": _broken_symlink}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_error_names_it_and_skip_counts_it_without_label_shift(root, kind, caplog):
    path = root / "val" / WNIDS[1] / "0.png"
    path = BAD_FILES[kind](path) or path
    with pytest.raises(BadImageError) as info:
        next(iter(_dm(root).val_dataloader()))
    assert str(path) in str(info.value) and "bad_images: skip" in str(info.value)

    dm = _dm(root, bad_images="skip")
    with caplog.at_level(logging.WARNING):
        x, y = next(iter(dm.val_dataloader()))
    assert dm.val_dataset.num_skipped == 1 and x.shape[0] == 7 == len(y)
    assert sorted(y.tolist()) == [0, 0, 1, 2, 2, 3, 3]  # class 1 lost one image
    assert y.tolist() == _loader_labels(dm.val_dataloader(), [path])  # no label shift
    assert [_class_of(img) for img in x] == [WNIDS[i] for i in y.tolist()]
    assert any(str(path) in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("mode", ["CMYK", "RGBA", "P", "L16"])
def test_unusual_image_modes_decode_to_rgb(root, mode):
    path = root / "train" / WNIDS[2] / "0.png"
    if mode == "L16":
        arr = np.full((20, 20), RED[WNIDS[2]] * 257, np.uint16)
        Image.fromarray(arr).save(path)
    elif mode == "CMYK":
        path.unlink()
        path = path.with_suffix(".jpg")
        _image(WNIDS[2], "CMYK").save(path, quality=100)
    else:
        _image(WNIDS[2], mode).save(path)
    dm = _dm(root)
    ds = dm.train_dataset
    i = [p for p, _ in ds.samples].index(str(path))
    img, label = ds[i]
    assert img.shape == (3, 8, 8) and 0 <= float(img.min()) <= float(img.max()) <= 1
    assert label == 2


def test_training_stops_on_bad_image_or_skips_and_counts(root, one_thread):
    """Through a Trainer: ``error`` stops the fit naming the file; ``skip`` trains and counts."""
    from lightning_modules.classifier import RobustClassifier

    bad = root / "train" / WNIDS[0] / "1.png"
    _html_page(bad)
    for policy in ("error", "skip"):
            L.seed_everything(0, verbose=False)
            dm = ImageNetSubsetDataModule(data_dir=str(root), image_size=8, augment=False, batch_size=4,
                                          bad_images=policy)
            model = RobustClassifier(backbone="resnet9", backbone_kwargs={"width": 4}, num_classes=4,
                                     objective="vanilla")
            trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                                inference_mode=False)
            if policy == "error":
                with pytest.raises(BadImageError, match=str(bad)):
                    trainer.fit(model, dm)
            else:
                trainer.fit(model, dm)
                assert dm.train_dataset.num_skipped == 1 and trainer.global_step == 3


# ------------------------------------------------------------------------------ folders and class lists
def test_hidden_folders_and_stray_files_do_not_shift_labels(root):
    for split in ("train", "val"):
        (root / split / ".ipynb_checkpoints").mkdir()  # sorts before every wnid
        _image(WNIDS[3]).save(root / split / ".ipynb_checkpoints" / "x.png")
        (root / split / "README.txt").write_text("not a class")
        (root / split / WNIDS[0] / "notes.txt").write_text("not an image")
        _image(WNIDS[3]).save(root / split / WNIDS[0] / ".hidden.png")
    dm = _dm(root)
    assert dm.class_names == WNIDS
    assert len(dm.train_dataset) == 12 and len(dm.val_dataset) == 8
    _labels_match(dm.train_dataset)
    _labels_match(dm.val_dataset)


def test_class_list_subset_indices_follow_the_list_in_every_split(root, tmp_path):
    order = [WNIDS[3], WNIDS[0], WNIDS[2]]  # a subset, not sorted
    (tmp_path / "c.txt").write_text("\n".join(order) + "\n")
    for val_fraction in (0.0, 0.25):
        dm = _dm(root, class_list=str(tmp_path / "c.txt"), val_fraction=val_fraction)
        assert dm.class_names == order and dm.num_classes == 3
        for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
            assert ds.classes == order
            assert set(ds.targets) <= {0, 1, 2}
            _labels_match(ds)
        assert sorted(set(dm.train_dataset.targets)) == [0, 1, 2]
        x, y = next(iter(dm.train_dataloader()))
        assert [_class_of(img) for img in x] == [order[i] for i in y.tolist()]  # shuffled, still aligned


def test_class_list_not_matching_folders(root, tmp_path):
    (tmp_path / "typo.txt").write_text(f"{WNIDS[0]}\nn0144O764\n")  # letter O instead of zero
    with pytest.raises(ValueError, match=r"n0144O764.*have no folder in .*train"):
        _dm(root, class_list=str(tmp_path / "typo.txt"))
    (tmp_path / "empty.txt").write_text("# nothing here\n\n")
    with pytest.raises(ValueError, match="lists no classes"):
        _dm(root, class_list=str(tmp_path / "empty.txt"))
    with pytest.raises(FileNotFoundError, match="class_list file not found"):
        _dm(root, class_list=str(tmp_path / "absent.txt"))


def test_class_folder_missing_in_val_or_test(root):
    os.rename(root / "val" / WNIDS[2], root / f"moved-{WNIDS[2]}")
    with pytest.raises(ValueError, match=rf"{WNIDS[2]}.*no folder in .*val"):
        _dm(root)
    os.rename(root / f"moved-{WNIDS[2]}", root / "val" / WNIDS[2])
    for w in WNIDS[:-1]:  # test/ lacks the last class
        (root / "test" / w).mkdir(parents=True)
        _image(w).save(root / "test" / w / "0.png")
    with pytest.raises(ValueError, match=rf"{WNIDS[-1]}.*no folder in .*test"):
        _dm(root)


def test_empty_splits(root, tmp_path):
    for w in WNIDS:  # val/ keeps its class folders but they are empty
        for f in (root / "val" / w).iterdir():
            f.unlink()
    with pytest.raises(ValueError, match="holds no images"):
        _dm(root)
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    with pytest.raises(ValueError, match="no class folders found"):
        _dm(empty)


def test_cifar_folder_layout_missing_class_in_test(tmp_path):
    root = tmp_path / "cifar"
    for split in ("train", "test"):
        for label, cls in enumerate(CIFAR10_CLASSES):
            if split == "test" and cls == "cat":
                continue
            (root / split / cls).mkdir(parents=True)
            Image.fromarray(np.full((32, 32, 3), 20 * label, np.uint8)).save(root / split / cls / "0.png")
    dm = CIFAR10DataModule(data_dir=str(root), val_fraction=0.0, augment=False)
    with pytest.raises(ValueError, match=r"test.*missing \['cat'\]"):
        dm.setup("fit")


def _loader_labels(loader, bad_paths=()):
    """Labels in the evaluation loader's (class-interleaved) order, without the unreadable files."""
    ds = loader.dataset
    return [ds.dataset.targets[i] for i in ds.indices if str(ds.dataset.samples[i][0]) not in {str(p) for p in bad_paths}]
