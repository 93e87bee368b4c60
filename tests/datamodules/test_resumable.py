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


# ---------------------------------------------------------------- world sizes (ranks simulated in one process)
def _ranks(world, batch_size, n=48, seed=5, epoch=1):
    ds = TensorDataset(torch.arange(n))
    loaders = [ResumableDataLoader(ds, batch_size=batch_size,
                                   sampler=SeededRandomSampler(ds, seed=seed, num_replicas=world, rank=r))
               for r in range(world)]
    for loader in loaders:
        loader.sampler.set_epoch(epoch)
    return loaders


def _global_steps(loaders, iters=None):
    """Per step, the sorted union of the ranks' batches (what DDP averages over)."""
    iters = iters or [iter(loader) for loader in loaders]
    return [sorted(sum((b[0].tolist() for b in step), [])) for step in zip(*iters)]


@pytest.mark.parametrize("n", [48, 45])
def test_global_batches_do_not_depend_on_the_world_size(n):
    steps = {w: _global_steps(_ranks(w, 8 // w, n=n)) for w in (1, 2, 4)}
    full = -(-n // 8)
    assert all(len(s) == full for s in steps.values())
    for w in (2, 4):  # every full global batch is the same set; only a padded last one may differ
        assert steps[w][: n // 8] == steps[1][: n // 8]
    assert set(sum(steps[4], [])) == set(range(n))
    assert _global_steps(_ranks(2, 4, n=n, epoch=2)) != steps[2]  # another epoch, another order


@pytest.mark.parametrize(("saved", "resumed"), [(4, 1), (4, 2), (1, 4), (2, 4)])
def test_resume_on_another_world_size_with_the_same_global_batch_is_exact(saved, resumed, recwarn):
    writers = _ranks(saved, 8 // saved)
    iters = [iter(loader) for loader in writers]
    for it in iters:  # 2 of the 6 global steps
        next(it), next(it)
    state = writers[0].state_dict()  # Lightning saves rank 0's state
    assert (state["batches"], state["samples"], state["world_size"]) == (2, 16, saved)
    expected = _global_steps(writers, iters)
    readers = _ranks(resumed, 8 // resumed, seed=999, epoch=0)  # a new process: other seed, epoch 0
    for loader in readers:
        loader.load_state_dict(state)
    assert _global_steps(readers) == expected and len(expected) == 4
    assert not [w for w in recwarn if "ResumableDataLoader" in str(w.message)]


def test_resume_with_another_global_batch_restarts_at_the_batch_boundary_and_warns():
    writers = _ranks(2, 4)  # global batch 8
    iters = [iter(loader) for loader in writers]
    for it in iters:
        for _ in range(3):  # 24 global samples consumed
            next(it)
    state = writers[0].state_dict()
    readers = _ranks(1, 10)  # global batch 10: boundary at 20, samples 20..23 come again
    readers[0].load_state_dict(state)
    with pytest.warns(UserWarning, match=r"global batch batch_size 10 x 1 processes = 10 .* batch_size 4 x 2 "
                                         r"processes = 8.*global sample 20.*\(4 samples of the interrupted batch"):
        rest = _global_steps(readers)
    perm = [b[0].item() for b in _ranks(1, 1)[0]]  # the epoch's global order
    assert sorted(sum(rest, [])) == sorted(perm[20:]) and len(rest) == 3


def test_state_saved_at_epoch_end_with_another_global_batch_starts_a_full_epoch():
    writers = _ranks(2, 4)
    _global_steps(writers)  # whole epoch
    state = writers[0].state_dict()
    assert state["epoch_done"]
    readers = _ranks(1, 6)
    readers[0].load_state_dict(state)
    assert len(_global_steps(readers)) == 8


def test_lightning_keeps_the_seeded_sampler_under_ddp():
    """It is a DistributedSampler, so Lightning's data connector does not replace it."""
    from lightning.pytorch.trainer.connectors.data_connector import _DataConnector

    loader = _loader()

    class _Connector:
        use_distributed_sampler, is_distributed = True, True

    trainer = type("T", (), {"_accelerator_connector": _Connector()})()
    assert not _DataConnector(trainer)._requires_distributed_sampler(loader)
