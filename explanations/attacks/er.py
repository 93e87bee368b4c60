"""ERAttack: push the clean top-k block down and the next block up (DESIGN §5).

J(x') = -block_gap(s(x'), pi0, k): with the clean order pi0 frozen, ``boundary`` is
``sum_{r<=k} s_pi0(r)(x') - sum_{k<r<=2k} s_pi0(r)(x')`` (``all``: mean over the top-k minus the
mean over the rest; ``minmax``: the m lowest top-k scores minus the m highest others), the gap
R2ET's regularizer widens (:func:`explanations.regularizers.block_gap`, one implementation).
"""

from __future__ import annotations

from torch import Tensor

from explanations.attacks.base import RankingAttack
from explanations.attacks.registry import register_attack
from explanations.regularizers import block_gap
from explanations.saliency import ranking


@register_attack
class ERAttack(RankingAttack):
    """Explanation-ranking attack: minimise the frozen top-k gap (best iterate, APGD schedule).

    Args: see :class:`RankingAttack`.

    Returns:
        ``attack(images, labels, ids=None, x_init=None)``: attacked images (B, C, H, W).

    Examples:
        >>> attack = ERAttack(model, eps=8 / 255, steps=50, k=100, restarts=2)
        >>> x_adv = attack(images, labels, ids)
        >>> old = ERAttack(model, eps=8 / 255, steps=50, k=100, legacy=True)  # first-flip attack
    """

    name = "er"

    def _reference(self, s_clean: Tensor, k: int) -> Tensor:
        return ranking(s_clean)

    def _ascent_objective(self, s: Tensor, reference: Tensor, k: int) -> Tensor:
        return -block_gap(s, reference, k, self.pair_set, self.minmax_m)
