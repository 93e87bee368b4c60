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
steps; its l_inf length under ``step: sign``, its l2 length under ``step: l2``, pixel units),
``clean_weight`` (0.0), ``random_start`` (False; the noise is drawn from the global RNG,
so each batch gets new noise, reproducible under ``seed_everything``), ``step`` (``sign``/``l2``),
``method`` (``gradient``), ``attack_k`` / ``attack_pair_set`` (default: the shared ``k`` and
``pair_set``), ``units`` (``pixel``). Shared keys used: ``k``, ``pair_set``, ``minmax_m``,
``target``, ``pool``; any other key is ignored.

``units: normalized`` trains against the R2ET reference code's attack (``batch_retrain.retrain``,
mode ``at``: ``PGD_m(..., 1, ..., epsilon=1)``): ``steps`` l2 steps of length ``step_size`` in
the model's normalised input space z = (x - mean) / std (the model's ``normalize`` layer), the
box ``steps * step_size`` normalised units (the reference's), capped at 1 pixel (1 / max(std)
normalised units: a longer step can reach the cap only on a pixel it moves by more than the
whole [0, 1] range), no [0, 1] clipping (:class:`explanations.attacks.PaperERAttack` with
``first_flip``); the reference strength is one step of length 1 (one std, e.g. 0.226 in pixels
for the ImageNet statistics). ``eps`` must be left unset (the box is the reference's), ``step``
``l2``, ``random_start`` false and the pair set ``boundary``; a model without a ``normalize``
layer is refused when the classifier is built (:meth:`AdversarialTraining.check_model`). As in the rest of this module, a sample whose step
flips the prediction trains on its clean image (the reference keeps the flipped image; the share
is logged as ``attack_flipped``).

Logged perturbation sizes (per batch, mean over the samples, pixel units): ``attack_l2`` and
``attack_linf`` of x_adv - x.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explanations.attacks import ERAttack, PaperERAttack
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
        eps: float | None = None,
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
        units: str = "pixel",
    ) -> None:
        check_target(target)
        check_pair_set(pair_set)
        if not isinstance(clean_weight, (int, float)) or clean_weight < 0:
            raise ValueError(f"clean_weight={clean_weight!r} must be a non-negative number")
        if units not in UNITS:
            raise ValueError(f"objective 'at': units={units!r} is not known; valid: {UNITS}")
        self.clean_weight, self.units = float(clean_weight), units
        common = dict(steps=steps, step_size=step_size, k=k, minmax_m=minmax_m, target=target, pool=pool,
                      method=method, seed=None, surrogate_beta=None)
        if units == "pixel":
            self.attack_config = dict(common, eps=8 / 255 if eps is None else eps, pair_set=pair_set,
                                      random_start=random_start, step=step, legacy=True)
        else:
            bad = {name: value for name, value, ok in (
                ("eps", eps, eps is None), ("step", step, step == "l2"), ("random_start", random_start, not random_start),
                ("pair_set", pair_set, pair_set == "boundary"), ("step_size", step_size, step_size is not None),
            ) if not ok}
            if bad:
                raise ValueError(
                    f"objective 'at' with units='normalized' (the reference attack: l2 steps of step_size normalised "
                    f"units, box steps * step_size) does not take {bad}; leave eps unset, use step: l2, "
                    "random_start: false, pair_set boundary and give step_size")
            self.attack_config = dict(common, first_flip=True)
        try:  # validate the settings now, not mid-epoch (explanations.validation)
            self._build(nn.Identity(), mean=(0.0,), std=(1e-6,))
        except ValueError as exc:
            raise ValueError(f"objective 'at' (its training attack): {exc}") from None

    def _build(self, model: nn.Module, mean=None, std=None) -> ERAttack:
        if self.units == "pixel":
            return ERAttack(model, **self.attack_config)
        if mean is None:
            norm = _normalize_layer(model)
            mean, std = norm.mean.flatten().tolist(), norm.std.flatten().tolist()
        cfg = self.attack_config
        box = min(cfg["steps"] * cfg["step_size"], 1.0 / max(std))  # the reference's box, at most 1 pixel wide
        return PaperERAttack(model, mean=mean, std=std, box=box, **cfg)

    def attack_for(self, model: nn.Module) -> ERAttack:
        """The training attack of ``model`` (what :meth:`__call__` runs on each batch)."""
        return self._build(model)

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model the training attack cannot run on, before training: ``units:
        normalized`` needs a ``normalize`` layer (mean, std)."""
        try:
            self._build(model)
        except ValueError as exc:
            raise ValueError(f"objective 'at' (its training attack): {exc}") from None

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
        attack = self._build(model)
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
        delta = (x_adv - x).detach().flatten(1)
        terms.update(
            ce=ce.detach(), ce_adv=ce_adv.detach(), loss=loss.detach(),
            attack_flipped=attack.flipped.float().mean(),
            attack_l2=delta.norm(dim=1).mean(), attack_linf=delta.abs().amax(dim=1).mean(),
        )
        return ObjectiveOutput(loss, logits, terms)


#: AT's attack units: pixel (the image in [0, 1]) or the model's normalised input space.
UNITS: tuple[str, ...] = ("pixel", "normalized")


def _normalize_layer(model: nn.Module) -> nn.Module:
    """The model's ``normalize`` layer (mean, std), or a ValueError naming the model."""
    norm = getattr(model, "normalize", None)
    if norm is None or not hasattr(norm, "mean") or not hasattr(norm, "std"):
        raise ValueError(f"units='normalized' needs a model with a `normalize` layer (mean, std); "
                         f"{type(model).__name__} has none")
    return norm


_ARGS = ("eps", "steps", "step_size", "clean_weight", "k", "pair_set", "minmax_m", "target", "pool",
         "random_start", "step", "method", "units")


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
