"""MSEAttack: move the saliency map as far as possible (Ghorbani et al. 2019), prediction kept.

J(x') = ||s(x') - s(x)||_2^2 (the ascent direction of the l2 distance). Its gradient vanishes at
x' = x, so the attack starts from a random point of the ball by default (``random_start=True``;
with ``False`` restart 0 starts from a tiny 1e-3 eps uniform perturbation). Like every ranking
attack it returns, per sample, the iterate with the lowest P@k on the real model (ties: the
larger J), so moving the map a lot without changing the top-k does not count as success.
"""

from __future__ import annotations

from torch import Tensor

from explanations.attacks.base import RankingAttack
from explanations.attacks.registry import register_attack
from explanations.pgd import uniform_in_ball


@register_attack
class MSEAttack(RankingAttack):
    """Maximise ||s(x') - s(x)||_2 with the best-iterate machinery of :class:`RankingAttack`.

    Args: see :class:`RankingAttack` (``random_start`` defaults to True).

    Examples:
        >>> x_adv = MSEAttack(model, eps=8 / 255, steps=50, k=100)(images, labels, ids)
    """

    name = "mse"
    default_random_start = True

    def _reference(self, s_clean: Tensor, k: int) -> Tensor:
        return s_clean

    def _ascent_objective(self, s: Tensor, reference: Tensor, k: int) -> Tensor:
        return (s - reference).pow(2).sum(1)

    def _start(self, x0: Tensor, ids: Tensor | None, restart: int) -> Tensor:
        if self.random_start or restart > 0:
            return uniform_in_ball(x0, self.eps, ids, self.seed, stream=restart)
        return uniform_in_ball(x0, 1e-3 * self.eps, ids, self.seed)
