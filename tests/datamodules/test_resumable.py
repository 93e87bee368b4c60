"""ResumableDataLoader / SeededRandomSampler: the state Lightning checkpoints resumes the epoch exactly."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DistributedSampler, TensorDataset

from datamodules import SyntheticDataModule
from datamodules.resumable import ResumableDataLoader, SeededRandomSampler


def _loader(n=20, batch_size=3, seed=7, **kw):
    ds = TensorDataset(torch.arange(n))
    return ResumableDataLoader(ds, batch_size=batch_size, sampler=SeededRandomSampler(ds, seed=seed), **kw)


def _ids(batches):
    return [b[0].tolist() for b in batches]


def test_order_depends_only_on_seed_and_epoch():
    a, b = _loader(), _loader()
    assert _ids(a) == _ids(b)
    torch.rand(100)  # the global RNG does not matter
    assert _ids(a) == _ids(_loader())
    first = _ids(a)
    a.sampler.set_epoch(1)
    assert _ids(a) != first and sorted(sum(_ids(a), [])) == list(range(20))
    assert _ids(_loader(seed=8)) != first


@pytest.mark.parametrize("num_workers", [0, 1])
def test_mid_epoch_state_resumes_the_same_batches(num_workers):
    original = _loader(num_workers=num_workers)
    original.sampler.set_epoch(2)
    it = iter(original)
    seen = [next(it) for _ in range(3)]
    state = original.state_dict()
    assert (state["epoch"], state["batches"], state["seed"]) == (2, 3, 7)
    expected_rest = _ids(it)

    resumed = _loader(seed=123, num_workers=num_workers)  # a new process would draw another seed
    resumed.load_state_dict(state)
    rest = _ids(resumed)
    assert rest == expected_rest and len(seen) + len(rest) == len(original)
    assert resumed.state_dict()["batches"] == len(original)
    assert len(_ids(resumed)) == len(original)  # the skip applies once


def test_rng_state_is_restored_right_before_the_next_batch():
    loader = _loader()
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    expected = torch.rand(3)
    torch.manual_seed(999)
    resumed = _loader()
    resumed.load_state_dict(state)
    next(iter(resumed))
    assert torch.equal(torch.rand(3), expected)
    no_rng = _loader(restore_rng=False)
    torch.manual_seed(999)
    no_rng.load_state_dict(state)
    next(iter(no_rng))
    assert not torch.equal(torch.rand(3), expected)


def test_state_saved_at_epoch_end_does_not_skip_the_next_epoch():
    loader = _loader()
    _ids(loader)
    state = loader.state_dict()
    resumed = _loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # Lightning moves on to the next epoch
    assert len(_ids(resumed)) == len(loader)
    resumed.load_state_dict(state)  # even in the same epoch: nothing left to skip, full pass
    resumed.sampler.set_epoch(0)
    assert len(_ids(resumed)) == len(loader)


def test_lightning_distributed_sampler_swap_keeps_the_loader_resumable():
    """Under DDP Lightning re-creates the loader with its DistributedSampler (shuffle=True)."""
    loader = _loader(n=24, batch_size=2)
    ds = loader.dataset
    swapped = _update_dataloader(loader, DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=3))
    assert isinstance(swapped, ResumableDataLoader) and isinstance(swapped.sampler, DistributedSampler)
    swapped.sampler.set_epoch(1)
    it = iter(swapped)
    next(it), next(it)
    state = swapped.state_dict()
    rest = _ids(it)
    again = _update_dataloader(_loader(n=24, batch_size=2), DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=3))
    again.load_state_dict(state)
    assert _ids(again) == rest


def test_datamodules_use_it_for_training_only():
    dm = SyntheticDataModule(num_classes=3, image_size=8, pattern_size=2, train_size=12, val_size=6, test_size=6,
                             batch_size=4)
    dm.setup("fit")
    train = dm.train_dataloader()
    assert isinstance(train, ResumableDataLoader) and isinstance(train.sampler, SeededRandomSampler)
    assert not isinstance(dm.val_dataloader(), ResumableDataLoader)
    labels = torch.cat([b[1] for b in train])
    assert sorted(labels.tolist()) == sorted(dm.train_dataset.labels.tolist())
