"""Attacks on the explanation ranking (DESIGN §5), batched, torchattacks-shaped:
``attack = ERAttack(model, eps=8/255, steps=50)`` then ``x_adv = attack(images, labels, ids)``.

- :mod:`.base`: the shared best-iterate machinery (APGD schedule from :mod:`.schedule`, flip
  undo, restarts, warm start, surrogate gradients, the legacy first-flip mode).
- :class:`ERAttack` (:mod:`.er`), :class:`MSEAttack` (:mod:`.mse`), :class:`UniformNoise`
  (:mod:`.noise`, the noise baseline) and the R2ET reference preset :func:`paper_attack`
  (:mod:`.paper`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from explanations.attacks.base import STEPS, RankingAttack
from explanations.attacks.er import ERAttack
from explanations.attacks.mse import MSEAttack
from explanations.attacks.noise import NOISE_STREAM, UniformNoise
from explanations.attacks.paper import PaperERAttack, paper_attack
from explanations.attacks.schedule import apgd_checkpoints
from explanations.pgd import project, uniform_in_ball

ATTACKS: dict[str, type[RankingAttack]] = {"er": ERAttack, "mse": MSEAttack}


def build_attack(name: str, model: nn.Module, **kwargs: Any) -> RankingAttack:
    """``ATTACKS[name](model, **kwargs)`` with a clear error for unknown names."""
    if name not in ATTACKS:
        raise ValueError(f"attack={name!r} is not known; valid: {sorted(ATTACKS)}")
    return ATTACKS[name](model, **kwargs)


__all__ = [
    "ATTACKS", "NOISE_STREAM", "STEPS", "ERAttack", "MSEAttack", "PaperERAttack", "RankingAttack",
    "UniformNoise", "apgd_checkpoints", "build_attack", "paper_attack", "project", "uniform_in_ball",
]
