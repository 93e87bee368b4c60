"""explanations/streams.py is the one table of random streams: each draw reads its documented stream,
and the values stay those every stored number was drawn with."""

import pytest
import torch
from torch import nn

from explanations.attacks import UniformNoise
from explanations.explainers import seeded_uniform
from explanations.pgd import uniform_in_ball
from explanations.pse import pse_target_uniform
from explanations.streams import (
    L2_RADIUS_OFFSET,
    NOISE_STREAM,
    PSE_TARGET_STREAM,
    THICKNESS_STREAM,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_stream_ids_are_the_stored_ones():
    assert (NOISE_STREAM, PSE_TARGET_STREAM, THICKNESS_STREAM, L2_RADIUS_OFFSET) == (500, 611, 1000, 1_000_003)


def test_draws_read_their_streams():
    ids = torch.tensor([7, 2, 30])
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    noise = UniformNoise(model, eps=4 / 255, seed=5, k=4, keep_prediction=False)(x, torch.tensor([0, 1, 0]), ids)
    torch.testing.assert_close(noise, uniform_in_ball(x, 4 / 255, ids, 5, stream=NOISE_STREAM))
    torch.testing.assert_close(pse_target_uniform(ids, 5), seeded_uniform(ids, (), 5, PSE_TARGET_STREAM, torch.float64))
    # the thickness end points: tests/explanations/test_ranking_metrics.py's definition loop
