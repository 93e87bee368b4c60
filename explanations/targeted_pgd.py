"""Targeted PGD on the Carlini-Wagner margin (DESIGN §6), batched, l_inf or l2.

For a clean batch x (B, C, H, W) in [0, 1], a target class t (B,) per sample and logits Z, the
attack minimizes the C&W margin

    m(x') = max_{j != t} Z_j(x') - Z_t(x'),    loss = max(m(x'), -kappa)

over x' = x + delta with ||delta||_p <= eps (p = inf or 2) and x' in [0, 1], by projected steps:
signed steps for l_inf (``delta -= alpha * sign(grad)``), l2-normalized steps for l2
(``delta -= alpha * grad / ||grad||_2``), each followed by projection onto the eps ball and
clipping to [0, 1] (the clip moves every coordinate towards x, so the ball constraint still holds).

The attack succeeds on a sample when the target is the adversarial prediction
(``argmax Z(x') == t``). With ``early_stop=True`` (default) a sample freezes at its first iterate
with m(x') < -kappa (batched masks, no per-sample loop), so perturbations are not inflated past the
point where they work; with kappa = 0 that is the first iterate that reaches the target.

Targets come from a rule (or are given):
    ``random``        a uniformly random class other than the true label y,
    ``least_likely``  the class with the smallest clean logit among classes != y,
    ``second_likely`` the class with the largest clean logit among classes != y (the second most
                      likely class when x is correctly classified).

Conventions (DESIGN §3): the model runs in eval mode (each module's previous mode is restored),
inside ``torch.enable_grad()``, and gradients are taken with ``torch.autograd.grad(..., inputs=)``,
so parameter ``.grad`` is never written. Projection and random start come from
:mod:`explanations.pgd` (offset form).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from explanations.explainers import eval_mode
from explanations.pgd import NORMS, check_norm, per_sample_norm  # noqa: F401  (NORMS: re-exported)
from explanations.pgd import project_delta as project
from explanations.pgd import random_start
from explanations.validation import check_eps, check_images, check_positive, check_steps

TARGET_RULES: tuple[str, ...] = ("random", "least_likely", "second_likely")


def check_target_rule(rule: str) -> None:
    """Raise a clear error for an unknown target rule."""
    if rule not in TARGET_RULES:
        raise ValueError(f"target_rule={rule!r} is not a known target rule; valid: {TARGET_RULES}")


def choose_targets(
    logits: Tensor,
    labels: Tensor,
    rule: str = "random",
    uniform: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Target classes (B,) != labels from clean logits (B, K) by ``rule`` (see module docstring).

    For ``random``, ``uniform`` (B,) values in [0, 1) fix the draw (t = (y + 1 + floor(u (K-1))) mod K,
    uniform over the K - 1 other classes); otherwise they are drawn with ``generator`` (on the CPU).
    """
    check_target_rule(rule)
    num_classes = logits.shape[1]
    if num_classes < 2:
        raise ValueError(f"a targeted attack needs at least 2 classes, got {num_classes}")
    labels = labels.to(logits.device)
    is_label = nn.functional.one_hot(labels, num_classes).bool()
    if rule == "least_likely":
        return logits.detach().masked_fill(is_label, float("inf")).argmin(dim=1)
    if rule == "second_likely":
        return logits.detach().masked_fill(is_label, float("-inf")).argmax(dim=1)
    if uniform is None:
        uniform = torch.rand(labels.shape[0], generator=generator)
    uniform = uniform.to(logits.device, torch.float64).clamp(0.0, 1.0 - 1e-12)
    offset = 1 + (uniform * (num_classes - 1)).floor().long()
    return (labels + offset) % num_classes


def cw_margin(logits: Tensor, targets: Tensor) -> Tensor:
    """C&W margin (B,): max_{j != t} Z_j - Z_t; negative iff t is the strict arg max."""
    is_target = nn.functional.one_hot(targets, logits.shape[1]).bool()
    other = logits.masked_fill(is_target, float("-inf")).amax(dim=1)
    return other - logits.gather(1, targets[:, None]).squeeze(1)


@dataclass
class TargetedAttack:
    """Result of :func:`targeted_pgd` (all detached).

    x_adv, delta: (B, C, H, W); targets, steps: (B,) long (steps = iterations a sample moved);
    success: (B,) bool, the adversarial prediction is the target; clean_logits, adv_logits: (B, K);
    margin: (B,) final C&W margin (negative on success).
    """

    x_adv: Tensor
    delta: Tensor
    targets: Tensor
    success: Tensor
    clean_logits: Tensor
    adv_logits: Tensor
    margin: Tensor
    steps: Tensor

    @property
    def success_rate(self) -> float:
        """Fraction of samples whose adversarial prediction is the target."""
        return float(self.success.float().mean()) if self.success.numel() else float("nan")


def default_step_size(eps: float, steps: int) -> float:
    """alpha = 2.5 eps / T (Madry et al.): lets an iterate cross the ball and come back."""
    return 2.5 * eps / max(1, steps)


def targeted_pgd(
    model: nn.Module,
    x: Tensor,
    labels: Tensor | None = None,
    targets: Tensor | None = None,
    *,
    eps: float = 8 / 255,
    steps: int = 20,
    step_size: float | None = None,
    norm: str = "linf",
    target_rule: str = "random",
    kappa: float = 0.0,
    rand_init: bool = False,
    early_stop: bool = True,
    uniform: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> TargetedAttack:
    """Targeted PGD on the C&W margin for a batch x (B, C, H, W) in [0, 1] (float, finite; checked).

    ``eps``: l_inf radius in (0, 1] (pixel units) or a positive l2 radius; ``steps`` >= 1.

    Give ``targets`` (B,) directly, or ``labels`` (B,) and a ``target_rule`` (``uniform`` /
    ``generator`` fix the ``random`` rule's draw). ``step_size`` defaults to 2.5 eps / steps
    (l_inf: per-coordinate; l2: per-step l2 length). ``kappa`` >= 0 asks for a confidence margin.
    ``rand_init`` starts from a uniform point of the ball instead of x.
    """
    check_norm(norm)
    check_images(x)
    eps = check_eps(eps, norm=norm)
    check_steps(steps)
    if step_size is not None:
        check_positive(step_size, "step_size (None: 2.5 eps / steps)")
    if kappa < 0:
        raise ValueError(f"kappa={kappa} must be non-negative")
    alpha = default_step_size(eps, steps) if step_size is None else float(step_size)
    x = x.detach()
    view = (-1,) + (1,) * (x.dim() - 1)
    with eval_mode(model), torch.enable_grad():
        with torch.no_grad():
            clean_logits = model(x)
        if targets is None:
            if labels is None:
                raise ValueError("targeted_pgd needs targets, or labels and a target_rule")
            targets = choose_targets(clean_logits, labels, target_rule, uniform, generator)
        targets = targets.to(x.device)
        delta = random_start(x, eps, norm, generator) if rand_init else torch.zeros_like(x)
        rows = torch.arange(x.shape[0], device=x.device)  # samples still moving
        moved = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        for _ in range(steps):
            # Only the samples still moving are forwarded (eval mode: samples are independent).
            whole = rows.numel() == x.shape[0]
            xs, ds, ts = (x, delta, targets) if whole else (x[rows], delta[rows], targets[rows])
            d = ds.detach().requires_grad_(True)
            margin = cw_margin(model(xs + d), ts)
            keep = margin.detach() >= -kappa if early_stop else torch.ones_like(margin, dtype=torch.bool)
            if not bool(keep.any()):
                break
            loss = margin[keep].clamp_min(-kappa).sum()
            (grad,) = torch.autograd.grad(loss, inputs=[d])
            grad = grad[keep]
            if norm == "linf":
                step = grad.sign()
            else:
                step = grad / per_sample_norm(grad, "l2").clamp_min(1e-12).view(view)
            rows = rows[keep]
            new = project(ds[keep] - alpha * step, xs[keep], eps, norm)
            delta = delta.detach().index_copy(0, rows, new.detach())
            moved[rows] += 1
        with torch.no_grad():
            x_adv = (x + delta).clamp(0.0, 1.0)  # exact [0, 1] despite float rounding
            delta = x_adv - x
            adv_logits = model(x_adv)
    margin = cw_margin(adv_logits, targets)
    success = adv_logits.argmax(dim=1) == targets
    return TargetedAttack(
        x_adv=x_adv.detach(), delta=delta.detach(), targets=targets, success=success,
        clean_logits=clean_logits.detach(), adv_logits=adv_logits.detach(), margin=margin.detach(),
        steps=moved,
    )


def perturbation_norm(delta: Tensor, norm: str) -> Tensor:
    """||delta_i||_p per sample (B,), p = inf or 2."""
    check_norm(norm)
    return per_sample_norm(delta, norm)
