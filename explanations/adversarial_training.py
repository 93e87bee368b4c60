"""AT: explanation adversarial training (DESIGN §4), registered as objective ``at``.

``L = CE(f(x_adv), y) + clean_weight * CE(f(x), y)`` where x_adv comes from a few batched
ERAttack steps on the current model (``explanations.attacks``). The training attack is the cheap
fixed-budget one: ``ERAttack(..., legacy=True, surrogate_beta=None)``, i.e. ``steps`` fixed
steps of ``step_size`` (default 2.5 eps / steps), one start, a sample stops at its first
prediction flip, no best-iterate scoring (no P@k passes) and no surrogate; its cost is exactly
``steps`` graph-carrying passes (the evaluation uses the stronger best-iterate attack). The attack runs in eval mode (the
model's mode is restored, BatchNorm statistics are not moved) and never writes parameter
gradients; the CE terms then run in the caller's mode (train mode in ``training_step``). With
``clean_weight > 0`` clean and attacked images go through one forward pass together
(BatchNorm sees both).

The logits returned for accuracy are the clean ones: from the joint forward pass when
``clean_weight > 0``, else the attack's clean pass (eval mode, no extra forward). Logged terms:
``ce`` (clean CE), ``ce_adv``, ``loss`` and ``attack_flipped`` (share of samples whose attack was
stopped by a prediction flip).

Config (``model.objective_kwargs``): ``eps`` (8/255), ``steps`` (3), ``step_size`` (2.5 eps /
steps), ``clean_weight`` (0.0), ``random_start`` (False; the noise is drawn from the global RNG,
so each batch gets new noise, reproducible under ``seed_everything``), ``step`` (``sign``/``l2``),
``method`` (``gradient``), ``attack_k`` / ``attack_pair_set`` (default: the shared ``k`` and
``pair_set``). Shared keys used: ``k``, ``pair_set``, ``minmax_m``, ``target``, ``pool``; any other
key is ignored.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explanations.attacks import ERAttack
from explanations.objectives import SHARED_SETTINGS, Objective, ObjectiveOutput, register_objective
from explanations.regularizers import check_pair_set
from explanations.saliency import check_target


class AdversarialTraining(Objective):
    """CE on ERAttack-perturbed inputs, optionally plus CE on the clean inputs."""

    name = "at"
    # the attack differentiates through the input gradient: torch.compile cannot run it
    double_backprop = True

    def __init__(
        self,
        eps: float = 8 / 255,
        steps: int = 3,
        step_size: float | None = None,
        clean_weight: float = 0.0,
        k: int | float = 0.1,
        pair_set: str = "boundary",
        minmax_m: int | None = None,
        target: str = "loss",
        pool: int | None = None,
        random_start: bool = False,
        step: str = "sign",
        method: str = "gradient",
    ) -> None:
        check_target(target)
        check_pair_set(pair_set)
        if not isinstance(clean_weight, (int, float)) or clean_weight < 0:
            raise ValueError(f"clean_weight={clean_weight!r} must be a non-negative number")
        self.clean_weight = float(clean_weight)
        self.attack_config = dict(
            eps=eps, steps=steps, step_size=step_size, k=k, pair_set=pair_set, minmax_m=minmax_m,
            target=target, pool=pool, random_start=random_start, step=step, method=method, seed=None,
            legacy=True, surrogate_beta=None,
        )
        try:  # validate the settings now, not mid-epoch (explanations.validation)
            ERAttack(nn.Identity(), **self.attack_config)
        except ValueError as exc:
            raise ValueError(f"objective 'at' (its training attack): {exc}") from None

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        attack = ERAttack(model, **self.attack_config)
        x_adv = attack(x, y)
        terms: dict[str, Tensor] = {}
        if self.clean_weight > 0:
            logits_all = model(torch.cat([x_adv, x.detach()]))
            logits_adv, logits = logits_all.split(x.shape[0])
            ce_adv = F.cross_entropy(logits_adv, y)
            ce = F.cross_entropy(logits, y)
            loss = ce_adv + self.clean_weight * ce
            logits = logits.detach()
        else:
            ce_adv = F.cross_entropy(model(x_adv), y)
            loss = ce_adv
            logits = attack.clean_logits
            ce = F.cross_entropy(logits, y)
        terms.update(
            ce=ce.detach(), ce_adv=ce_adv.detach(), loss=loss.detach(),
            attack_flipped=attack.flipped.float().mean(),
        )
        return ObjectiveOutput(loss, logits, terms)


_ARGS = ("eps", "steps", "step_size", "clean_weight", "k", "pair_set", "minmax_m", "target", "pool",
         "random_start", "step", "method")


@register_objective(
    "at",
    options=(*(a for a in _ARGS if a not in SHARED_SETTINGS), "attack_k", "attack_pair_set"),
    uses_k=True, k_option="attack_k", double_backprop=AdversarialTraining.double_backprop,
)
def build_adversarial_training(**config: Any) -> AdversarialTraining:
    """Factory of the objective ``at``: picks the keys it knows, ignores the rest.

    ``attack_k`` / ``attack_pair_set`` override the shared ``k`` / ``pair_set`` for the attack.
    """
    kwargs = {name: config[name] for name in _ARGS if name in config}
    if "attack_k" in config:
        kwargs["k"] = config["attack_k"]
    if "attack_pair_set" in config:
        kwargs["pair_set"] = config["attack_pair_set"]
    return AdversarialTraining(**kwargs)
