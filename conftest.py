"""Fixtures for every test and doctest: torch thread counts, and the inputs of the docstring examples.

- ``one_thread``: the test runs on one torch thread (tiny tensors on a shared CPU are much faster
  single-threaded); ``threads``: ``with threads(n): ...`` for fixtures of any scope (e.g. a
  module-scoped trained model). Tests set thread counts only through these.
- Doctests (``pytest --doctest-modules``, on in pyproject's addopts) run on one thread, with
  ``torch``, ``nn``, ``F`` and a small example in their namespace: ``model`` (an untrained conv
  net with ReLU, 3 classes), ``images`` (4, 3, 16, 16) in [0, 1], ``labels`` (4,) and ``ids`` (4,).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from _pytest.doctest import DoctestItem
from torch import nn


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block on ``n`` torch threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def threads():
    """``threads(n)``: a context manager running its block on n torch threads (restored after)."""
    return torch_threads


@pytest.fixture
def one_thread():
    """One torch thread for the test, the previous count restored after it."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def _doctest_inputs(doctest_namespace):
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    doctest_namespace.update(
        torch=torch, nn=nn, F=F, model=model.eval(), images=torch.rand(4, 3, 16, 16, generator=gen),
        labels=torch.tensor([0, 1, 2, 0]), ids=torch.arange(4),
    )


@pytest.fixture(autouse=True)
def _doctests_on_one_thread(request):
    """Doctests get the example inputs and one thread; other tests are untouched."""
    if not isinstance(request.node, DoctestItem):
        yield
        return
    request.getfixturevalue("_doctest_inputs")
    with torch_threads(1):
        yield
