"""The threat model of the public R2ET code (Chen et al., NeurIPS 2024, "Training for Stable
Explanation for Free"; github.com/ccha005/R2ET, ``batch_retrain.PGD_m``), as an ERAttack preset.

What that code does, per image, in the model's (normalised) input space z = (x - mean) / std:
the objective is the boundary gap of the clean top-k (pairs (r, k) for r < k and (k, k + r) for
r <= k, which sum to ``sum_{r<=k} s - sum_{k<r<=2k} s``) of the CE-loss gradient saliency;
100 steps ``z -= 5e-3 * g / (||g||_2 + 1e-10)`` (l2-normalised, fixed length, no momentum);
after each step ``z`` is clamped to ``[z0 - 100 * 5e-3, z0 + 100 * 5e-3]`` (an l_inf box of
radius 0.5 in normalised units) with no [0, 1] pixel clipping; with ``early_stop`` the attack
stops at the first prediction flip and the P@k of the last unflipped iterate is reported.

Differences from the default protocol (pixel-space l_inf ball of eps/255, [0, 1] box, APGD
schedule, best iterate): the box is in normalised units (radius 0.5 std per channel, 29/255 for
std 0.229), but it does not bind: 100 steps of l2 length 5e-3 travel at most 0.5 normalised units
in l2, i.e. at most 0.5 max(std) ~ 0.115 in pixel l2, about half the l2 radius of the 1/255 l_inf
ball (0.217). Measured on the published CIFAR-10 ResNet-20 and 40 JPEG test images
(``python -m benchmarks.paper_travel``, docs/attacks.md): pixel l2 0.074 mean / 0.107 max, l_inf
2.1/255 mean / 3.6/255 max (ReLU); 0.088 / 0.112 and 2.6/255 / 4.4/255 with Softplus(10). It is a
*small* threat model, nearest the 1/255 and 2/255 budgets. Images may leave [0, 1], and the
step is a fixed l2 length. ``first_flip=True`` (default) reproduces the reference, ``False``
keeps the same threat model but returns the best iterate (never weaker). A first-step flip,
for which the reference code has no unflipped iterate (its evaluation would fail on the empty
list), returns the clean image here (P@k 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from explanations.attacks.er import ERAttack
from explanations.validation import check_positive, check_steps


class PaperERAttack(ERAttack):
    """ERAttack under the R2ET reference threat model (see the module docstring).

    Args:
        model: classifier on pixel images in [0, 1] (normalisation inside the model).
        mean, std: per-channel normalisation of the reference's input space.
        steps: 100. step_size: l2 length of a step in normalised units (5e-3).
        box: l_inf radius of the box around the clean image, normalised units (None: the
            reference's steps * step_size); its widest side in pixels, box * max(std), must be
            in (0, 1].
        k: top-k size (100 in the reference). first_flip: stop at the first flip (reference).
        clip: also clip to [0, 1] pixels (the reference does not). Other keywords: ERAttack's.

    Examples:
        >>> attack = paper_attack(model, mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.243, 0.261))
        >>> x_adv = attack(images, labels)
    """

    name = "er_paper"

    def __init__(
        self, model: nn.Module, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor,
        steps: int = 100, step_size: float = 5e-3, k: int | float = 100, first_flip: bool = True,
        clip: bool = False, target: str = "loss", surrogate_beta: float | str | None = None,
        box: float | None = None, **kwargs: Any,
    ) -> None:
        check_steps(steps)
        check_positive(step_size, "step_size")
        if box is not None:
            check_positive(box, "box")
        self.mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
        self.std = torch.as_tensor(std, dtype=torch.float64).flatten()
        if not bool((self.std > 0).all()):
            raise ValueError(f"std={std!r} must be positive")
        super().__init__(
            model, eps=steps * step_size if box is None else box, steps=steps, step_size=step_size, k=k,
            pair_set="boundary",
            step="l2", target=target, random_start=False, surrogate_beta=surrogate_beta,
            legacy=first_flip, **kwargs,
        )
        self.clip = bool(clip)

    def _check_eps(self, eps: float) -> float:
        """The box radius (steps * step_size, or ``box``) is in normalised units: its widest
        pixel-unit side, radius * max(std), must be a budget in (0, 1]."""
        widest = float(eps) * float(self.std.max())
        if not 0.0 < widest <= 1.0:
            raise ValueError(
                f"steps * step_size = {eps:g} normalised units is a box of radius {widest:.4g} in pixel units "
                f"(times max(std) = {float(self.std.max()):g}); it must be in (0, 1]: lower steps or step_size, "
                "or give a box"
            )
        return float(eps)

    def _scale(self, like: Tensor) -> Tensor:
        return self.std.to(like.device, like.dtype).view(1, -1, *([1] * (like.dim() - 2)))

    def _project(self, x: Tensor, x0: Tensor) -> Tensor:
        bound = self.eps * self._scale(x)
        out = torch.minimum(torch.maximum(x, x0 - bound), x0 + bound)
        return out.clamp(0.0, 1.0) if self.clip else out

    def _direction(self, grad: Tensor, eta: Tensor) -> Tensor:
        std = self._scale(grad)
        g_z = grad * std  # dJ/dz for x = mean + std * z
        norm = g_z.flatten(1).norm(dim=1).view(-1, *([1] * (grad.dim() - 1)))
        eta = eta.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))
        return std * (eta * g_z / (norm + 1e-10))


def paper_attack(model: nn.Module, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor,
                 **kwargs: Any) -> PaperERAttack:
    """The R2ET reference attack preset: ``PaperERAttack(model, mean, std, **kwargs)``."""
    return PaperERAttack(model, mean, std, **kwargs)
