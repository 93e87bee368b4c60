"""UniformNoise: the noise baseline of the same budget, registered as the attack ``noise``.

It is an attack like the others for the registry and the evaluation protocol (same call shape and
after-call attributes); it is no optimiser, so its options (``UniformNoise.options``) hold no
``steps``, ``pair_set``, ``restarts`` or ``surrogate_beta``.

``x' = clip_[0,1](x + eps (2u - 1))`` with u uniform per pixel from the counter-based stream
(``seed``, ``stream`` + draw, ``ids[i]``) (:func:`explanations.pgd.uniform_in_ball`), the same
stream wherever the baseline is drawn. With ``draws`` > 1 each sample keeps its draw with the
lowest P@k among those that keep the prediction.

On a flip (``keep_prediction=True``, default, as for the attacks and the ensemble's worst case):
a draw that changes the prediction is discarded; a sample whose every draw flips gets the clean
image back (P@k = 1, ``flipped``), which makes the baseline look more stable at budgets where
noise flips many predictions: read ``flipped`` beside it, or use more ``draws``. With
``keep_prediction=False`` the baseline is the plain first draw, flipped or not (``flipped`` marks
the flips), as a noise curve is usually reported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from explanations.attacks.registry import register_attack
from explanations.explainers import Explanation, check_method, eval_mode, explain_unchecked
from explanations.pgd import uniform_in_ball
from explanations.ranking_metrics import precision_at_k
from explanations.saliency import check_target, num_features, resolve_k
from explanations.validation import (
    check_eps,
    check_images,
    check_pool,
    check_positive_int,
)

from explanations.streams import NOISE_STREAM  # draw j uses NOISE_STREAM + j


@register_attack
class UniformNoise:
    """Uniform noise in the l_inf ball, prediction kept (see the module docstring).

    Args:
        model: classifier in pixel space. eps: l_inf radius in (0, 1] (pixel units). seed: noise seed (None: global RNG).
        k, method, method_kwargs, target, pool: how P@k is measured (as for the attacks).
        draws: noise draws per sample (>= 1). stream: first stream of the draws.
        keep_prediction: discard draws that flip the prediction (see the module docstring).

    Returns:
        ``noise(images, labels=None, ids=None)``: noisy images (B, C, H, W) (``images``: float,
        finite, in [0, 1], checked once per call); after a call
        ``p_at_k`` (B,), ``flipped`` (B,) (every draw flipped), ``steps_taken`` (zeros),
        ``clean_logits`` (B, K) and ``explanation`` (saliency and logits at the returned images)
        as for the attacks.

    Examples:
        >>> x_noise = UniformNoise(model, eps=8 / 255, seed=0)(images, labels, ids)
    """

    name = "noise"

    def __init__(
        self, model: nn.Module, eps: float = 8 / 255, seed: int | None = 0, k: int | float = 0.1,
        method: str = "gradient", method_kwargs: dict[str, Any] | None = None, target: str = "loss",
        pool: int | None = None, draws: int = 1, stream: int = NOISE_STREAM, keep_prediction: bool = True,
    ) -> None:
        eps = check_eps(eps)
        check_positive_int(draws, "draws")
        check_pool(pool)
        if not keep_prediction and draws != 1:
            raise ValueError(f"draws={draws} needs keep_prediction=True (without it only the first draw is used)")
        check_target(target)
        check_method(method, method_kwargs)
        self.model, self.eps, self.seed, self.k = model, float(eps), seed, k
        self.method, self.method_kwargs = method, dict(method_kwargs or {})
        self.target, self.pool, self.draws, self.stream = target, pool, draws, stream
        self.keep_prediction = bool(keep_prediction)
        self.p_at_k = self.flipped = self.steps_taken = self.clean_logits = None
        self.explanation: Explanation | None = None

    def __repr__(self) -> str:
        return f"UniformNoise(eps={self.eps:.4g}, seed={self.seed}, draws={self.draws}, k={self.k})"

    def _explain(self, x: Tensor, labels: Tensor | None, classes: Tensor | None):
        return explain_unchecked(self.model, x, labels, self.method, self.target, self.pool,
                                   classes=classes, **self.method_kwargs)

    def __call__(self, images: Tensor, labels: Tensor | None = None, ids: Tensor | None = None) -> Tensor:
        """Noisy images (B, C, H, W), detached, every prediction kept."""
        check_images(images)
        if self.target == "loss" and labels is None:
            raise ValueError("target='loss' needs labels: call noise(images, labels)")
        x0 = images.detach()
        k = resolve_k(self.k, num_features(*x0.shape[-2:], self.pool))
        with eval_mode(self.model):
            clean = self._explain(x0, labels, None)
            s0, logits0 = clean.saliency.detach(), clean.logits.detach()
            pred0 = logits0.argmax(1)
            classes = pred0 if self.target == "logit" else None
            best_x, best_p = x0.clone(), torch.ones_like(precision_at_k(s0, s0, k))
            best_s, best_logits = s0, logits0
            kept_any = torch.zeros_like(pred0, dtype=torch.bool)
            for draw in range(self.draws):
                x = uniform_in_ball(x0, self.eps, ids, self.seed, stream=self.stream + draw)
                out = self._explain(x, labels, classes)
                p = precision_at_k(s0, out.saliency.detach(), k)
                ok = out.logits.detach().argmax(1) == pred0
                better = ok & (p < best_p) if self.keep_prediction else torch.ones_like(ok)
                best_x = torch.where(better.view(-1, 1, 1, 1), x, best_x)
                best_p = torch.where(better, p, best_p)
                best_s = torch.where(better.view(-1, 1), out.saliency.detach(), best_s)
                best_logits = torch.where(better.view(-1, 1), out.logits.detach(), best_logits)
                kept_any |= ok
        self.p_at_k, self.flipped, self.clean_logits = best_p, ~kept_any, logits0  # flipped: no kept draw
        self.explanation = Explanation(best_s, best_logits)
        self.steps_taken = torch.zeros_like(pred0)
        return best_x.detach()

    forward = __call__
