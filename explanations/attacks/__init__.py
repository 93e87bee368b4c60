"""Attacks on the explanation ranking (DESIGN §5), batched, torchattacks-shaped:
``attack = ERAttack(model, eps=8/255, steps=50)`` then ``x_adv = attack(images, labels, ids)``.

- :mod:`.base`: the shared best-iterate machinery (APGD schedule from :mod:`.schedule`, flip
  undo, restarts, warm start, surrogate gradients, the legacy first-flip mode).
- :mod:`.registry`: ``ATTACKS`` (name -> class, with each class's constructor ``options``),
  :func:`register_attack` (a class decorator) and :func:`build_attack`.
- registered: :class:`ERAttack` (``er``, :mod:`.er`), :class:`MSEAttack` (``mse``, :mod:`.mse`)
  and :class:`UniformNoise` (``noise``, :mod:`.noise`, the noise baseline: no steps, no
  surrogate); not registered: the R2ET reference preset :func:`paper_attack` (:mod:`.paper`),
  whose budget is its steps times its step size.

A new attack is one file with a class decorated ``@register_attack`` (and its import here): the
evaluation protocol takes it by name and the tests that iterate ``ATTACKS`` cover it.
"""

from __future__ import annotations

from explanations.attacks.base import STEPS, RankingAttack
from explanations.attacks.er import ERAttack
from explanations.attacks.mse import MSEAttack
from explanations.attacks.noise import NOISE_STREAM, UniformNoise
from explanations.attacks.paper import PaperERAttack, paper_attack
from explanations.attacks.registry import ATTACKS, attack_class, build_attack, check_attack_options, register_attack
from explanations.attacks.schedule import apgd_checkpoints
from explanations.pgd import project, uniform_in_ball

__all__ = [
    "ATTACKS", "NOISE_STREAM", "STEPS", "ERAttack", "MSEAttack", "PaperERAttack", "RankingAttack",
    "UniformNoise", "apgd_checkpoints", "attack_class", "build_attack", "check_attack_options", "paper_attack",
    "project", "register_attack", "uniform_in_ball",
]
