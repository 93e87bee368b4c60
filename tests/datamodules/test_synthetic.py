import time

import pytest
import torch

from datamodules import SyntheticDataModule


def _dm(**kw):
    args = dict(num_classes=5, image_size=24, train_size=100, val_size=40, test_size=40,
                pattern_size=6, batch_size=16, seed=3)
    args.update(kw)
    dm = SyntheticDataModule(**args)
    dm.setup("fit")
    return dm


def test_contract_properties_and_shapes():
    dm = _dm()
    assert (dm.num_classes, dm.image_size, dm.in_chans, dm.has_masks) == (5, 24, 3, True)
    assert len(dm.class_names) == 5
    assert [len(d) for d in (dm.train_dataset, dm.val_dataset, dm.test_dataset)] == [100, 40, 40]
    img, label, mask = dm.train_dataset[0]
    assert img.shape == (3, 24, 24) and img.dtype == torch.float32
    assert label.dtype == torch.int64 and 0 <= int(label) < 5
    assert mask.shape == (24, 24) and mask.dtype == torch.bool
    for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        assert ds.images.min() >= 0.0 and ds.images.max() <= 1.0


def test_determinism_and_split_independence():
    a, b = _dm(), _dm()
    for split in ("train_dataset", "val_dataset", "test_dataset"):
        da, db = getattr(a, split), getattr(b, split)
        assert torch.equal(da.images, db.images)
        assert torch.equal(da.labels, db.labels) and torch.equal(da.masks, db.masks)
    assert not torch.equal(a.val_dataset.images, a.test_dataset.images)
    assert not torch.equal(a.train_dataset.images[:40], a.val_dataset.images)
    c = _dm(seed=4)
    assert not torch.equal(a.train_dataset.images, c.train_dataset.images)
    # setup is idempotent
    before = a.train_dataset
    a.setup("test")
    assert a.train_dataset is before


def test_masks_are_the_class_glyph_in_its_colour():
    dm = _dm()
    ds = dm.train_dataset
    p = dm.hparams.pattern_size
    for i in range(len(ds)):
        img, label, mask = ds[i]
        r, c = ds.positions[i].tolist()
        glyph = dm.glyphs[label]
        assert torch.equal(mask[r:r + p, c:c + p], glyph)
        assert int(mask.sum()) == int(glyph.sum()) > 0
        pix = img[:, mask]  # (3, n_on)
        assert torch.equal(pix, dm.colours[label][:, None].expand_as(pix))
    # distinct classes have distinct (glyph, colour) patterns
    assert len({tuple(c.tolist()) for c in dm.colours}) == dm.num_classes


def test_label_balance():
    ds = _dm(train_size=103).train_dataset
    counts = torch.bincount(ds.labels, minlength=5)
    assert int(counts.max() - counts.min()) <= 1 and int(counts.sum()) == 103


def test_dataloader_batches():
    dm = _dm()
    x, y, m = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 24, 24) and y.shape == (16,) and m.shape == (16, 24, 24)
    assert m.dtype == torch.bool
    xv, yv, _ = next(iter(dm.val_dataloader()))
    assert torch.equal(xv, dm.val_dataset.images[:16])  # eval loaders are not shuffled
    assert len(dm.test_dataloader()) == 3


def test_default_size_generates_fast():
    dm = SyntheticDataModule()
    t0 = time.perf_counter()
    dm.setup()
    assert time.perf_counter() - t0 < 1.0
    assert dm.train_dataset.images.shape == (2000, 3, 32, 32)


def test_invalid_args():
    with pytest.raises(ValueError, match="pattern_size"):
        SyntheticDataModule(image_size=8, pattern_size=9)
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticDataModule(num_classes=1)
