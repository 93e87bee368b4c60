"""Exact mid-epoch resume for training dataloaders.

Lightning restores the loop position of a run resumed with ``--ckpt_path`` (epoch, batch index,
optimizer, schedulers), but a plain ``DataLoader`` with ``shuffle=True`` restarts its epoch from
the beginning of a *new* random permutation drawn from the global RNG, so a run killed mid-epoch
and resumed trains on different batches than an uninterrupted one (Lightning warns "your
dataloader is not resumable"). Two pieces make the resume exact:

- :class:`SeededRandomSampler`: a ``RandomSampler`` whose permutation depends only on
  ``(seed, epoch)`` (``set_epoch`` is called by Lightning at every epoch start). It subclasses
  ``RandomSampler`` so that under DDP Lightning still swaps it for its ``DistributedSampler``
  (itself a function of (seed, epoch)) exactly as it does for ``shuffle=True``.
- :class:`ResumableDataLoader`: a ``DataLoader`` with ``state_dict`` / ``load_state_dict``
  (Lightning saves them in the checkpoint, ``loops.fit_loop.state_dict.combined_loader``). The
  state is the sampler seed, the epoch, the number of batches already yielded in that epoch and
  the global RNG states (torch, CUDA, numpy, python) at save time. After ``load_state_dict`` the
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
import random
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler

STATE_VERSION = 1


def mix_seed(seed: int, *streams: int) -> int:
    """A 63-bit seed derived from ``seed`` and integer ``streams`` (e.g. the epoch)."""
    words = [int(seed) & 0xFFFFFFFFFFFFFFFF, *(int(s) & 0xFFFFFFFFFFFFFFFF for s in streams)]
    state = np.random.SeedSequence(words).generate_state(2)
    return int((int(state[0]) << 32 | int(state[1])) & 0x7FFFFFFFFFFFFFFF)


def draw_seed() -> int:
    """A seed drawn from the global torch RNG (so ``seed_everything`` fixes it)."""
    return int(torch.empty((), dtype=torch.int64).random_().item()) & 0x7FFFFFFFFFFFFFFF


class SeededRandomSampler(RandomSampler):
    """Random permutation of ``range(len(data_source))`` that depends only on (seed, epoch).

    ``seed=None`` draws the seed once from the global torch RNG at construction (so
    ``seed_everything`` makes it reproducible); a resumed run gets it back from the checkpoint.
    """

    def __init__(self, data_source: Sized, seed: int | None = None) -> None:
        super().__init__(data_source)
        self.seed = draw_seed() if seed is None else int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(mix_seed(self.seed, self.epoch))
        yield from torch.randperm(len(self.data_source), generator=g).tolist()


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

    # ------------------------------------------------------------------ Lightning's _Stateful
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "seed": self._seed(),
            "epoch": self._epoch() if self._epoch_of_pass is None else self._epoch_of_pass,
            "batches": int(self._yielded),
            "rng": collect_rng_states(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state or state.get("version") != STATE_VERSION:
            return
        seed = state.get("seed")
        for s in self._samplers():
            if seed is not None and hasattr(s, "seed"):
                s.seed = int(seed)
            if hasattr(s, "set_epoch"):
                s.set_epoch(int(state["epoch"]))
        self._resume = dict(state)

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Any]:  # a generator: nothing runs before the first next()
        epoch = self._epoch()
        self._epoch_of_pass = epoch
        resume, self._resume = self._resume, None
        skip = 0
        if resume is not None and int(resume["epoch"]) == epoch and not isinstance(self.dataset, IterableDataset):
            skip = int(resume["batches"])
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
