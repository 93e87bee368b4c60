"""Exact mid-epoch resume for training dataloaders.

Lightning restores the loop position of a run resumed with ``--ckpt_path`` (epoch, batch index,
optimizer, schedulers), but a plain ``DataLoader`` with ``shuffle=True`` restarts its epoch from
the beginning of a *new* random permutation drawn from the global RNG, so a run killed mid-epoch
and resumed trains on different batches than an uninterrupted one (Lightning warns "your
dataloader is not resumable"). Two pieces make the resume exact:

- :class:`SeededRandomSampler`: a ``DistributedSampler`` whose *global* order depends only on
  ``(seed, epoch)`` (``set_epoch`` is called by Lightning at every epoch start); rank ``r`` of
  ``W`` takes every ``W``-th index of it, so the global batch of a step (``batch_size x W``
  samples) is the same for every world size with the same global batch. Being a
  ``DistributedSampler``, Lightning keeps it under DDP (its own sampler's order depends on ``W``).
- :class:`ResumableDataLoader`: a ``DataLoader`` with ``state_dict`` / ``load_state_dict``
  (Lightning saves them in the checkpoint, ``loops.fit_loop.state_dict.combined_loader``). The
  state is the sampler seed, the epoch, the number of batches already yielded in that epoch, the
  position in the global order in samples (batches x batch_size x world size) and the global RNG
  states (torch, CUDA, numpy, python) at save time. A resume on another world size with the same
  global batch continues the order exactly; with another global batch it restarts at the last
  batch boundary before the saved position and warns (samples of the interrupted batch repeat). After ``load_state_dict`` the
  next pass of the same epoch skips the consumed batches *by index* (no image is loaded for
  them) and, just before yielding its first batch, restores the RNG states, so random
  augmentations (with ``num_workers=0``) and random objectives continue as in the uninterrupted
  run. Worker seeds come from a generator seeded by ``(seed, epoch)``, not from the global RNG.

Limits (documented in the README): with ``num_workers > 0`` the batch order is exact, but random
augmentations inside workers follow the workers' own seeds and are not replayed exactly after a
mid-epoch resume. Iterable datasets are not skipped (nothing to index).
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

STATE_VERSION = 1


def mix_seed(seed: int, *streams: int) -> int:
    """A 63-bit seed derived from ``seed`` and integer ``streams`` (e.g. the epoch)."""
    words = [int(seed) & 0xFFFFFFFFFFFFFFFF, *(int(s) & 0xFFFFFFFFFFFFFFFF for s in streams)]
    state = np.random.SeedSequence(words).generate_state(2)
    return int((int(state[0]) << 32 | int(state[1])) & 0x7FFFFFFFFFFFFFFF)


def draw_seed() -> int:
    """A sampler seed fixed by ``seed_everything``: derived from its seed (``PL_GLOBAL_SEED``)
    where set, so it does not depend on how much of the global RNG the launch consumed (which
    differs between world sizes); else drawn from the global torch RNG."""
    global_seed = os.environ.get("PL_GLOBAL_SEED")
    if global_seed is not None:
        return mix_seed(int(global_seed), 0x5EED)
    return int(torch.empty((), dtype=torch.int64).random_().item()) & 0x7FFFFFFFFFFFFFFF


def world_layout() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class SeededRandomSampler(DistributedSampler):
    """Random order of ``range(N)`` that depends only on (seed, epoch), shared out over the ranks.

    Global order: ``perm = randperm(N)`` from a generator seeded by ``mix_seed(seed, epoch)``,
    padded with its own head to ``N_pad = ceil(N / W) * W`` for ``W`` ranks; rank ``r`` takes
    ``perm[r::W]`` (``N_pad / W`` indices). With a per-rank batch ``b`` the global batch of step
    ``s`` is the set ``perm[s*b*W : (s+1)*b*W]`` for every ``W``: any world size with the same
    global batch ``b * W`` trains on the same batches (the padding only touches the last one
    when ``W`` does not divide ``N``). It is a ``DistributedSampler`` so that Lightning keeps it
    under DDP instead of swapping in its own (whose order depends on the world size).

    ``seed=None`` takes the seed from :func:`draw_seed` at construction (so ``seed_everything``
    fixes it, the same for every world size); under DDP rank 0's seed is broadcast at the first
    pass (ranks of a torchrun job may be seeded differently); a resumed run gets it back from the
    checkpoint. ``num_replicas`` / ``rank`` default to the process group at iteration time.
    """

    def __init__(self, data_source: Sized, seed: int | None = None,
                 num_replicas: int | None = None, rank: int | None = None) -> None:
        # DistributedSampler.__init__ needs a process group; the layout is resolved per pass.
        self.dataset = self.data_source = data_source
        self.seed = draw_seed() if seed is None else int(seed)
        self._seed_shared = seed is not None
        self.epoch = 0
        self.shuffle, self.drop_last = True, False
        self._num_replicas, self._rank = num_replicas, rank

    @property
    def num_replicas(self) -> int:
        return world_layout()[1] if self._num_replicas is None else int(self._num_replicas)

    @property
    def rank(self) -> int:
        return world_layout()[0] if self._rank is None else int(self._rank)

    @property
    def num_samples(self) -> int:
        return -(-len(self.data_source) // self.num_replicas)

    @property
    def total_size(self) -> int:
        return self.num_samples * self.num_replicas

    def set_seed(self, seed: int) -> None:
        """Seed shared by every rank (e.g. from a checkpoint): no broadcast needed."""
        self.seed, self._seed_shared = int(seed), True

    def _share_seed(self) -> None:
        if not self._seed_shared and self._num_replicas is None and world_layout()[1] > 1:
            box = [self.seed]
            dist.broadcast_object_list(box, src=0)
            self.seed = int(box[0])
        self._seed_shared = True

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        self._share_seed()
        g = torch.Generator()
        g.manual_seed(mix_seed(self.seed, self.epoch))
        perm = torch.randperm(len(self.data_source), generator=g)
        pad = self.total_size - perm.numel()
        if pad:
            perm = torch.cat([perm, perm.repeat(-(-pad // max(perm.numel(), 1)))[:pad]])
        return iter(perm[self.rank::self.num_replicas].tolist())


def collect_rng_states() -> dict[str, Any]:
    """Global RNG states in a form ``torch.load(weights_only=True)`` accepts (tensors, ints)."""
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss), "name": str(np_name)},
        "python": {"version": int(version), "state": torch.tensor(mt_state, dtype=torch.int64),
                   "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`collect_rng_states` (missing entries are left alone)."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "numpy" in states:
        n = states["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "python" in states:
        p = states["python"]
        random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class ResumableDataLoader(DataLoader):
    """``DataLoader`` that Lightning can checkpoint and resume mid-epoch (module docstring).

    Takes the ``DataLoader`` arguments; ``restore_rng=False`` leaves the global RNG alone on
    resume. Use it with a :class:`SeededRandomSampler` (or a sequential sampler): the sampler
    must give the same order for the same epoch in the resumed process.
    """

    def __init__(self, *args: Any, restore_rng: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.restore_rng = restore_rng
        if self.generator is None:
            self.generator = torch.Generator()
        self._yielded = 0  # batches handed out in the current pass
        self._epoch_of_pass: int | None = None
        self._resume: dict[str, Any] | None = None

    # ------------------------------------------------------------------ helpers
    def _samplers(self) -> list[Any]:
        found = {}
        for s in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if s is not None:
                found[id(s)] = s
        return list(found.values())

    def _epoch(self) -> int:
        for s in self._samplers():
            if hasattr(s, "epoch"):
                return int(s.epoch)
        return 0

    def _seed(self) -> int | None:
        for s in self._samplers():
            if hasattr(s, "seed"):
                return int(s.seed)
        return None

    def _world(self) -> int:
        for s in self._samplers():
            if hasattr(s, "num_replicas"):
                return int(s.num_replicas)
        return 1

    def _global_batch(self) -> int | None:
        return None if self.batch_size is None else int(self.batch_size) * self._world()

    # ------------------------------------------------------------------ Lightning's _Stateful
    def state_dict(self) -> dict[str, Any]:
        global_batch = self._global_batch()
        return {
            "version": STATE_VERSION,
            "seed": self._seed(),
            "epoch": self._epoch() if self._epoch_of_pass is None else self._epoch_of_pass,
            "batches": int(self._yielded),
            "epoch_done": self._epoch_of_pass is not None and int(self._yielded) >= len(self),
            # the position in the global order, in samples: what a resume on another world size needs
            "samples": None if global_batch is None else int(self._yielded) * global_batch,
            "batch_size": None if self.batch_size is None else int(self.batch_size),
            "world_size": self._world(),
            "rng": collect_rng_states(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state or state.get("version") != STATE_VERSION:
            return
        seed = state.get("seed")
        for s in self._samplers():
            if seed is not None and hasattr(s, "seed"):
                if hasattr(s, "set_seed"):
                    s.set_seed(int(seed))
                else:
                    s.seed = int(seed)
            if hasattr(s, "set_epoch"):
                s.set_epoch(int(state["epoch"]))
        self._resume = dict(state)

    def _batches_to_skip(self, resume: dict[str, Any]) -> int:
        """Batches of this pass already trained on, from the saved global-sample position.

        Same global batch (``batch_size x world size``) as the saved run: ``samples / global
        batch`` (exact, whatever the world size). Another global batch: the pass restarts at the
        last batch boundary at or before the saved position (a warning names the samples seen
        again); the steps then group other samples than the interrupted run did.
        """
        samples, global_batch = resume.get("samples"), self._global_batch()
        if resume.get("epoch_done"):
            return 0  # saved at the end of the epoch: this pass is a new epoch's
        saved_b, saved_w = resume.get("batch_size"), resume.get("world_size")
        if samples is None or global_batch is None or saved_b is None or saved_w is None:
            return int(resume["batches"])
        samples = int(samples)
        skip = samples // global_batch
        here = f"batch_size {self.batch_size} x {self._world()} processes = {global_batch}"
        saved = f"batch_size {saved_b} x {saved_w} processes = {int(saved_b) * int(saved_w)}"
        if int(saved_b) * int(saved_w) != global_batch:
            repeated = samples - skip * global_batch
            rank_zero_warn(
                f"ResumableDataLoader: resuming with global batch {here} but the checkpoint was written with "
                f"{saved}; the epoch continues at global sample {skip * global_batch} of the same order"
                + (f" ({repeated} samples of the interrupted batch are trained on again)" if repeated else "")
                + ", but later steps group other samples than an uninterrupted run (keep the global batch "
                "for an exact resume)"
            )
        elif int(saved_w) != self._world():
            rank_zero_info(
                f"ResumableDataLoader: checkpoint from {saved}, resumed with {here}: same global batch, "
                f"the data order continues exactly at global sample {samples}"
            )
        return skip

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Any]:  # a generator: nothing runs before the first next()
        epoch = self._epoch()
        self._epoch_of_pass = epoch
        resume, self._resume = self._resume, None
        skip = 0
        if resume is not None and int(resume["epoch"]) == epoch and not isinstance(self.dataset, IterableDataset):
            skip = self._batches_to_skip(resume)
            if skip >= len(self):
                skip = 0  # saved at the end of the epoch: this pass is a new epoch's
        seed = self._seed()
        if seed is not None:
            self.generator.manual_seed(mix_seed(seed, epoch, 1))  # worker base seeds
        if skip:
            remaining = list(itertools.islice(iter(self.batch_sampler), skip, None))
            inner = iter(DataLoader(
                self.dataset, batch_sampler=remaining, num_workers=self.num_workers,
                collate_fn=self.collate_fn, pin_memory=self.pin_memory, timeout=self.timeout,
                worker_init_fn=self.worker_init_fn, multiprocessing_context=self.multiprocessing_context,
                generator=self.generator, prefetch_factor=self.prefetch_factor if self.num_workers else None,
            ))
        else:
            inner = super().__iter__()
        self._yielded = skip
        if skip and self.restore_rng and resume.get("rng"):
            # the global RNG as it was when the checkpoint was saved, right before the next batch
            restore_rng_states(resume["rng"])
        for batch in inner:
            self._yielded += 1
            yield batch
