"""Promotion-suppression effect (PSE) of adversarial perturbations (DESIGN §6).

The source paper publishes no code; the definitions below are this project's reading of it, and
every choice is a setting (see docs/pse.md).

For a clean image x0 with true label y, a perturbation delta toward a target class t and logits Z:

    suppression  S = Z_y(x0) - Z_y(x0 + delta)
    promotion    P = Z_t(x0 + delta) - Z_t(x0)
    share        phi = P / (P + S)          when S > 0 and P > 0
                 phi = 0  (suppression)     when P <= 0 < S
                 phi = 1  (promotion)       when S <= 0 < P
                 phi = NaN (ineffective)    when S <= 0 and P <= 0

Categories (codes in ``CATEGORIES`` order), cut-offs (lo, hi) = (1/3, 2/3) by default ("one
effect at least twice the other"): suppression-dominated if phi < lo, promotion-dominated if
phi > hi, balanced otherwise (lo <= phi <= hi, up to a 1e-6 float tolerance), ineffective if S <= 0 and P <= 0.

Levels:
- sample: the whole perturbation (:func:`pse_from_logits`).
- group: delta split into g x g pixel blocks (all channels; edge blocks may be smaller); block j's
  isolated effect uses x0 + delta * 1[block j], with S, P measured against the clean logits
  (:func:`group_pse`, batched forward passes in chunks of images).
- image: share of each group category's perturbation energy inside the CAM regions of y and t
  (``explanations.cam``).
- network: per unit (channel) of a layer, the activation a_u (spatial mean of a (B, C, h, w)
  output, token mean of (B, N, D), the value of (B, D)); the mean change
  Delta_u = mean_i [a_u(x0_i + delta_i) - a_u(x0_i)]; a unit is promoted if
  Delta_u > tau * sd_u and suppressed if Delta_u < -tau * sd_u, sd_u the standard deviation of
  a_u over the clean samples (tau = 0.2 by default, Cohen's "small" effect; tau = 0: the sign).

:class:`PSESettings` holds every choice (its field docs are the settings' one help text).
:func:`analyze_batch` runs the whole analysis (targeted PGD, the four levels) on a batch, and
:func:`batch_sums` / :func:`summarize` turn it into sum-reducible statistics and final numbers
(so that shards of a data set, e.g. DDP ranks, combine exactly); :func:`run_analysis` runs it
over batches of a set of images with the ``random`` targets keyed by (seed, dataset index)
(:func:`pse_target_uniform`). Tables, figures and report files: :mod:`explanations.pse_report`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from explanations.cam import (
    activation_maps,
    capture_output,
    check_cam_method,
    energy_by_category,
    energy_share_in_region,
    resolve_layer,
    top_region,
)
from explanations.explainers import eval_mode, seeded_uniform
from explanations.targeted_pgd import check_norm, check_target_rule, perturbation_norm, targeted_pgd
from explanations.validation import check_eps, check_positive, check_positive_int, check_steps

CATEGORIES: tuple[str, ...] = ("suppression", "balanced", "promotion", "ineffective")
SUPPRESSION, BALANCED, PROMOTION, INEFFECTIVE = range(4)
DEFAULT_CUTOFFS: tuple[float, float] = (1 / 3, 2 / 3)
from explanations.streams import PSE_TARGET_STREAM  # noqa: E402  (the one table of streams)


def pse_target_uniform(ids: Tensor, seed: int) -> Tensor:
    """The ``random`` target draw per sample (B,) float64 in (0, 1), keyed by (seed, dataset index).

    The callback, the checkpoint report and the reproduction study all draw with it, so a sample
    gets the same target everywhere, every epoch and on every DDP rank.
    """
    return seeded_uniform(ids, (), seed, PSE_TARGET_STREAM, torch.float64)


def check_cutoffs(cutoffs) -> tuple[float, float]:
    """Validate the phi cut-offs (lo, hi) with 0 <= lo <= hi <= 1."""
    try:
        lo, hi = (float(c) for c in cutoffs)
    except (TypeError, ValueError):
        raise ValueError(f"cutoffs={cutoffs!r} must be two numbers (lo, hi), e.g. (1/3, 2/3)") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"cutoffs={cutoffs!r} must satisfy 0 <= lo <= hi <= 1")
    return lo, hi


def suppression_promotion(
    clean_logits: Tensor, adv_logits: Tensor, labels: Tensor, targets: Tensor
) -> tuple[Tensor, Tensor]:
    """S and P for clean logits (B, K) and perturbed logits (B, ..., K): two tensors (B, ...)."""
    batch, k = clean_logits.shape
    flat = adv_logits.reshape(batch, -1, k)
    y = labels.to(clean_logits.device).view(batch, 1)
    t = targets.to(clean_logits.device).view(batch, 1)
    s = clean_logits.gather(1, y) - flat.gather(2, y[:, :, None].expand(-1, flat.shape[1], 1)).squeeze(2)
    p = flat.gather(2, t[:, :, None].expand(-1, flat.shape[1], 1)).squeeze(2) - clean_logits.gather(1, t)
    shape = adv_logits.shape[:-1]
    return s.reshape(shape), p.reshape(shape)


def promotion_share(s: Tensor, p: Tensor) -> Tensor:
    """phi (same shape): P / (P + S) if both > 0; 0 if P <= 0 < S; 1 if S <= 0 < P; else NaN."""
    both = (s > 0) & (p > 0)
    ratio = p / torch.where(both, p + s, torch.ones_like(s))
    phi = torch.full_like(s, float("nan"))
    phi = torch.where(both, ratio, phi)
    phi = torch.where((p <= 0) & (s > 0), torch.zeros_like(s), phi)
    return torch.where((s <= 0) & (p > 0), torch.ones_like(s), phi)


CUTOFF_TOLERANCE = 1e-6


def categorize(s: Tensor, p: Tensor, cutoffs=DEFAULT_CUTOFFS) -> Tensor:
    """Category codes (long, same shape) in ``CATEGORIES`` order (see the module docstring).

    phi is compared with the cut-offs in float64 with a tolerance of ``CUTOFF_TOLERANCE`` (1e-6):
    a phi within float rounding of a cut-off (e.g. S = 2P with the defaults) counts as balanced.
    """
    lo, hi = check_cutoffs(cutoffs)
    phi = promotion_share(s.double(), p.double())
    cat = torch.full(s.shape, BALANCED, dtype=torch.long, device=s.device)
    cat = torch.where(phi < lo - CUTOFF_TOLERANCE, SUPPRESSION, cat)
    cat = torch.where(phi > hi + CUTOFF_TOLERANCE, PROMOTION, cat)
    # The one-sided cases belong to their side whatever the cut-offs (lo = 0 or hi = 1 included).
    cat = torch.where((p <= 0) & (s > 0), SUPPRESSION, cat)
    cat = torch.where((s <= 0) & (p > 0), PROMOTION, cat)
    return torch.where((s <= 0) & (p <= 0), INEFFECTIVE, cat)


@dataclass
class PSE:
    """S, P, phi (float) and category (long), all of one shape (B,) or (B, G)."""

    S: Tensor
    P: Tensor
    phi: Tensor
    category: Tensor


def pse_from_logits(
    clean_logits: Tensor, adv_logits: Tensor, labels: Tensor, targets: Tensor, cutoffs=DEFAULT_CUTOFFS
) -> PSE:
    """Sample-level (adv (B, K)) or group-level (adv (B, G, K)) PSE from logits."""
    s, p = suppression_promotion(clean_logits, adv_logits, labels, targets)
    return PSE(S=s, P=p, phi=promotion_share(s, p), category=categorize(s, p, cutoffs))


# --------------------------------------------------------------------------------------------
# Group level
# --------------------------------------------------------------------------------------------


def group_index_map(height: int, width: int, group_size: int, device=None) -> tuple[Tensor, int]:
    """Group id of each pixel (H, W) long for g x g blocks in row-major order, and the group count.

    Blocks are ceil(H/g) x ceil(W/g); edge blocks are smaller when g does not divide the size.
    """
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be a positive integer")
    rows = torch.arange(height, device=device) // group_size
    cols = torch.arange(width, device=device) // group_size
    per_row = math.ceil(width / group_size)
    return rows[:, None] * per_row + cols[None, :], math.ceil(height / group_size) * per_row


def group_masks(height: int, width: int, group_size: int, device=None) -> Tensor:
    """One-hot pixel masks of the groups: (G, H, W) bool."""
    index, count = group_index_map(height, width, group_size, device)
    return index[None] == torch.arange(count, device=device)[:, None, None]


def group_logits(
    model: nn.Module, x: Tensor, delta: Tensor, group_size: int, chunk_size: int = 256
) -> Tensor:
    """Logits of every isolated group perturbation x0 + delta * 1[group]: (B, G, K).

    The B * G inputs are built and evaluated ``chunk_size`` images at a time (memory stays
    bounded for large images); eval mode, no gradients.
    """
    batch, _, height, width = x.shape
    masks = group_masks(height, width, group_size, x.device).to(x.dtype)[:, None]  # (G, 1, H, W)
    count = masks.shape[0]
    outputs = []
    with eval_mode(model), torch.no_grad():
        for start in range(0, batch * count, chunk_size):  # chunks of the flattened (B*G) inputs
            flat = torch.arange(start, min(start + chunk_size, batch * count), device=x.device)
            b, g = flat // count, flat % count
            outputs.append(model(x[b] + delta[b] * masks[g]))
    if not outputs:
        return x.new_zeros(batch, count, 0)
    logits = torch.cat(outputs)
    return logits.view(batch, count, logits.shape[-1])


def group_pse(
    model: nn.Module,
    x: Tensor,
    delta: Tensor,
    labels: Tensor,
    targets: Tensor,
    group_size: int,
    clean_logits: Tensor | None = None,
    cutoffs=DEFAULT_CUTOFFS,
    chunk_size: int = 256,
) -> PSE:
    """Group-level PSE: S, P, phi, category of each isolated g x g group, shapes (B, G).

    A group where delta is exactly zero leaves x0 unchanged, so its S = P = 0 and it is
    ``ineffective`` by definition; its logits are taken to be the clean ones rather than a second
    forward pass, whose float rounding depends on the batch composition (and so on the number of
    DDP ranks) and would otherwise give it a random category.
    """
    if clean_logits is None:
        with eval_mode(model), torch.no_grad():
            clean_logits = model(x)
    logits = group_logits(model, x, delta, group_size, chunk_size)
    index, count = group_index_map(x.shape[-2], x.shape[-1], group_size, x.device)  # (H, W)
    moved = (delta.detach() != 0).any(1).flatten(1).int()  # (B, H*W): pixels the perturbation touches
    touched = moved.new_zeros(moved.shape[0], count).index_add_(1, index.flatten(), moved) > 0  # (B, G)
    logits = torch.where(touched[..., None], logits, clean_logits[:, None].to(logits.dtype))
    return pse_from_logits(clean_logits, logits, labels, targets, cutoffs)


def groups_to_pixels(values: Tensor, height: int, width: int, group_size: int) -> Tensor:
    """Spread per-group values (B, G) to pixels (B, H, W)."""
    index, count = group_index_map(height, width, group_size, values.device)
    if values.shape[1] != count:
        raise ValueError(f"expected {count} groups for {height}x{width} and g={group_size}, got {values.shape[1]}")
    return values[:, index]


# --------------------------------------------------------------------------------------------
# Network level
# --------------------------------------------------------------------------------------------


def units_of(output: Tensor) -> Tensor:
    """Per-unit activations (B, U) of a layer output: spatial mean of (B, C, *spatial), token mean
    of (B, N, D) (units = D), the output itself for (B, D)."""
    if output.dim() == 2:
        return output
    if output.dim() == 3:
        return output.mean(dim=1)
    return output.flatten(2).mean(dim=2)


def unit_activations(
    model: nn.Module, x: Tensor, layer: str | nn.Module | None = None
) -> tuple[Tensor, Tensor]:
    """(logits (B, K), per-unit activations (B, U)) of the layer, captured with a forward hook."""
    _, module = resolve_layer(model, layer, x)
    with eval_mode(model), torch.no_grad(), capture_output(module) as store:
        logits = model(x)
    return logits, units_of(store["out"])


@dataclass
class UnitChanges:
    """Network-level summary: mean change Delta_u (U,), clean sd_u (U,), unit fractions."""

    mean_change: Tensor
    clean_std: Tensor
    frac_promoted: float
    frac_suppressed: float


def unit_changes_from_sums(
    count: Tensor | float, sum_change: Tensor, sum_clean: Tensor, sum_clean_sq: Tensor, threshold: float = 0.2
) -> UnitChanges:
    """Delta_u, sd_u and the promoted / suppressed fractions from sums over samples."""
    n = float(count)
    if n <= 0 or sum_change.numel() == 0:
        nan = torch.full_like(sum_change, float("nan"))
        return UnitChanges(nan, nan, float("nan"), float("nan"))
    mean_change = sum_change / n
    mean_clean = sum_clean / n
    std = (sum_clean_sq / n - mean_clean.pow(2)).clamp_min(0).sqrt()
    bound = threshold * std
    promoted = mean_change > bound
    suppressed = mean_change < -bound
    return UnitChanges(
        mean_change=mean_change,
        clean_std=std,
        frac_promoted=float(promoted.double().mean()),
        frac_suppressed=float(suppressed.double().mean()),
    )


def unit_changes(clean: Tensor, adv: Tensor, threshold: float = 0.2) -> UnitChanges:
    """Network-level summary from per-sample unit activations clean, adv (B, U)."""
    clean, adv = clean.double(), adv.double()
    return unit_changes_from_sums(
        clean.shape[0], (adv - clean).sum(0), clean.sum(0), clean.pow(2).sum(0), threshold
    )


# --------------------------------------------------------------------------------------------
# The whole analysis on a batch
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PSESettings:
    """Every choice of the analysis (definitions and reasons: docs/pse.md).

    The ``Args`` below are the one help text of these settings: LightningCLI shows them for
    ``callbacks.PSEAnalysis(settings=...)`` and ``benchmarks/pse_report.py`` makes a flag of each
    field with its doc, type, choices and default. Every value is checked here
    (``explanations.validation``), so every entry point refuses the same bad values.

    Args:
        eps: targeted PGD budget in pixel units of [0, 1] (linf: the radius, in (0, 1]; l2: a positive
            l2 radius)
        steps: PGD iterations (>= 1)
        step_size: PGD step (null: 2.5 eps / steps)
        norm: threat model of the attack
        target_rule: target class: random (keyed by seed and dataset index), least_likely or
            second_likely
        kappa: C&W margin confidence
        rand_init: start PGD from a uniform random point of the ball
        early_stop: freeze a sample at its first successful iterate
        cutoffs: phi cut-offs (lo, hi) between suppression / balanced / promotion, 0 <= lo <= hi <= 1
        only_correct: analyse correctly classified images only
        include_failed: count failed attacks in the category shares (they are always counted and
            reported)
        group_size: side g of the g x g pixel groups
        group_chunk_size: images per batched forward pass of the group analysis
        cam_method: class activation map method (cam needs the layer the linear head reads)
        cam_layer: module path of the CAM layer (null: the model's default,
            explanations.cam.default_cam_layer)
        cam_quantile: CAM region: the top fraction of pixels, in (0, 1]
        unit_layer: module path of the layer of the unit analysis (null: the CAM layer)
        unit_threshold: tau >= 0: a unit is promoted / suppressed when its mean change exceeds tau
            times its clean sd
    """

    eps: float = 8 / 255
    steps: int = 10
    step_size: float | None = None
    norm: Literal["linf", "l2"] = "linf"
    target_rule: Literal["random", "least_likely", "second_likely"] = "random"
    kappa: float = 0.0
    rand_init: bool = False
    early_stop: bool = True
    cutoffs: tuple[float, float] = DEFAULT_CUTOFFS
    only_correct: bool = True
    include_failed: bool = False
    group_size: int = 8
    group_chunk_size: int = 256
    cam_method: Literal["gradcam", "cam"] = "gradcam"
    cam_layer: str | None = None
    cam_quantile: float = 0.2
    unit_layer: str | None = None
    unit_threshold: float = 0.2

    def __post_init__(self) -> None:
        check_norm(self.norm)
        object.__setattr__(self, "eps", check_eps(self.eps, norm=self.norm))  # frozen: normalised once here
        check_steps(self.steps)
        if self.step_size is not None:
            step_size = check_positive(self.step_size, "step_size (null: 2.5 eps / steps)")
            object.__setattr__(self, "step_size", step_size)
        check_target_rule(self.target_rule)
        check_cam_method(self.cam_method)
        object.__setattr__(self, "cutoffs", check_cutoffs(self.cutoffs))
        check_positive_int(self.group_size, "group_size")
        check_positive_int(self.group_chunk_size, "group_chunk_size")
        if not 0.0 < self.cam_quantile <= 1.0:
            raise ValueError(f"cam_quantile={self.cam_quantile} must be in (0, 1] (0.2 = top 20%)")
        if self.unit_threshold < 0:
            raise ValueError(f"unit_threshold={self.unit_threshold} must be non-negative")


@dataclass
class PSEBatch:
    """Per-sample results of :func:`analyze_batch` (detached; B samples, G groups, U units).

    labels, targets, pred_clean, pred_adv, steps: (B,) long; correct, success, counted: (B,) bool
    (counted = in the category population); S, P, phi, category, delta_norm: (B,);
    group: PSE of shape (B, G) (NaN / INEFFECTIVE rows for samples not counted);
    energy_total (B, 4), energy_in_true, energy_in_target (B, 4): energy per group category;
    share_in_true, share_in_target (B,): share of the whole perturbation's energy in each region;
    cams (B, 2, H, W): maps of y and t before ReLU; unit_clean, unit_adv (B, U);
    x, delta (B, C, H, W).
    """

    labels: Tensor
    targets: Tensor
    pred_clean: Tensor
    pred_adv: Tensor
    steps: Tensor
    correct: Tensor
    success: Tensor
    counted: Tensor
    S: Tensor
    P: Tensor
    phi: Tensor
    category: Tensor
    delta_norm: Tensor
    group: PSE
    energy_total: Tensor
    energy_in_true: Tensor
    energy_in_target: Tensor
    share_in_true: Tensor
    share_in_target: Tensor
    cams: Tensor
    unit_clean: Tensor
    unit_adv: Tensor
    x: Tensor
    delta: Tensor


def analyze_batch(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    settings: PSESettings | None = None,
    uniform: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> PSEBatch:
    """Targeted PGD on x (B, C, H, W) in [0, 1], then the PSE at all four levels (batched).

    ``uniform`` (B,) in [0, 1) fixes the random targets per sample (see ``choose_targets``).
    """
    cfg = settings or PSESettings()
    x, labels = x.detach(), labels.to(x.device)
    attack = targeted_pgd(
        model, x, labels, eps=cfg.eps, steps=cfg.steps, step_size=cfg.step_size, norm=cfg.norm,
        target_rule=cfg.target_rule, kappa=cfg.kappa, rand_init=cfg.rand_init,
        early_stop=cfg.early_stop, uniform=uniform, generator=generator,
    )
    targets, delta = attack.targets, attack.delta
    sample = pse_from_logits(attack.clean_logits, attack.adv_logits, labels, targets, cfg.cutoffs)
    pred_clean = attack.clean_logits.argmax(1)
    correct = pred_clean == labels
    analysed = correct if cfg.only_correct else torch.ones_like(correct)
    counted = analysed & (attack.success | cfg.include_failed)

    # Group level, for the counted samples only (batched boolean index).
    batch, _, height, width = x.shape
    count = group_index_map(height, width, cfg.group_size)[1]
    group = PSE(
        S=x.new_full((batch, count), float("nan")), P=x.new_full((batch, count), float("nan")),
        phi=x.new_full((batch, count), float("nan")),
        category=torch.full((batch, count), INEFFECTIVE, dtype=torch.long, device=x.device),
    )
    idx = counted.nonzero().squeeze(1)
    if idx.numel():
        part = group_pse(
            model, x[idx], delta[idx], labels[idx], targets[idx], cfg.group_size,
            attack.clean_logits[idx], cfg.cutoffs, cfg.group_chunk_size,
        )
        for name in ("S", "P", "phi", "category"):
            getattr(group, name)[idx] = getattr(part, name)

    # Image level: CAM regions of the true and the target class on the clean image.
    cams = activation_maps(model, x, torch.stack([labels, targets], 1), cfg.cam_layer, cfg.cam_method)
    region = top_region(cams, cfg.cam_quantile)
    pixel_cats = groups_to_pixels(group.category, height, width, cfg.group_size)
    energy_total, energy_in = energy_by_category(delta, pixel_cats, region, len(CATEGORIES))
    shares = energy_share_in_region(delta, region)

    # Network level: unit activations at the unit layer (default: the CAM layer).
    unit_layer = cfg.unit_layer if cfg.unit_layer is not None else cfg.cam_layer
    _, unit_clean = unit_activations(model, x, unit_layer)
    _, unit_adv = unit_activations(model, attack.x_adv, unit_layer)

    return PSEBatch(
        labels=labels, targets=targets, pred_clean=pred_clean, pred_adv=attack.adv_logits.argmax(1),
        steps=attack.steps, correct=correct, success=attack.success, counted=counted,
        S=sample.S, P=sample.P, phi=sample.phi, category=sample.category,
        delta_norm=perturbation_norm(delta, cfg.norm), group=group,
        energy_total=energy_total, energy_in_true=energy_in[:, 0], energy_in_target=energy_in[:, 1],
        share_in_true=shares[:, 0], share_in_target=shares[:, 1], cams=cams,
        unit_clean=unit_clean, unit_adv=unit_adv, x=x, delta=delta,
    )


def batch_sums(batch: PSEBatch, settings: PSESettings | None = None) -> dict[str, Tensor]:
    """Sum-reducible statistics (float64 tensors) of a batch; add them over batches / ranks."""
    cfg = settings or PSESettings()
    analysed = batch.correct if cfg.only_correct else torch.ones_like(batch.correct)
    c = batch.counted
    cf = c.double()
    ncat = len(CATEGORIES)

    def per_cat(codes: Tensor, weights: Tensor) -> Tensor:
        return torch.zeros(ncat, dtype=torch.float64, device=codes.device).scatter_add_(
            0, codes.flatten(), weights.flatten().double()
        )

    phi_ok = c & torch.isfinite(batch.phi)
    group_rows = c[:, None].expand_as(batch.group.category)
    share_ok = c & torch.isfinite(batch.share_in_true)
    return {
        "n_samples": torch.tensor(float(batch.labels.numel()), dtype=torch.float64, device=c.device),
        "n_correct": batch.correct.double().sum(),
        "n_analysed": analysed.double().sum(),
        "n_success": (analysed & batch.success).double().sum(),
        "n_counted": cf.sum(),
        "cat_counts": per_cat(batch.category, cf),
        "phi_sum": torch.where(phi_ok, batch.phi.double(), 0.0).sum(),
        "phi_count": phi_ok.double().sum(),
        "S_sum": (batch.S.double() * cf).sum(),
        "P_sum": (batch.P.double() * cf).sum(),
        "steps_sum": (batch.steps.double() * cf).sum(),
        "norm_sum": (batch.delta_norm.double() * cf).sum(),
        "group_cat_counts": per_cat(batch.group.category, group_rows.double()),
        "energy_total": (batch.energy_total.double() * cf[:, None]).sum(0),
        "energy_in_true": (batch.energy_in_true.double() * cf[:, None]).sum(0),
        "energy_in_target": (batch.energy_in_target.double() * cf[:, None]).sum(0),
        "share_true_sum": torch.where(share_ok, batch.share_in_true.double(), 0.0).sum(),
        "share_target_sum": torch.where(share_ok, batch.share_in_target.double(), 0.0).sum(),
        "share_count": share_ok.double().sum(),
        "unit_count": cf.sum(),
        "unit_sum_change": ((batch.unit_adv - batch.unit_clean).double() * cf[:, None]).sum(0),
        "unit_sum_clean": (batch.unit_clean.double() * cf[:, None]).sum(0),
        "unit_sum_clean_sq": (batch.unit_clean.double().pow(2) * cf[:, None]).sum(0),
    }


def add_sums(a: dict[str, Tensor] | None, b: dict[str, Tensor]) -> dict[str, Tensor]:
    """Element-wise sum of two :func:`batch_sums` dicts (``a`` may be None)."""
    if a is None:
        return {k: v.clone() for k, v in b.items()}
    return {k: a[k] + b[k].to(a[k].device) for k in a}


def flatten_sums(sums: dict[str, Tensor]) -> tuple[Tensor, list[tuple[str, torch.Size]]]:
    """One float64 vector of all sums (for a single all-reduce) and the layout to undo it."""
    layout = [(k, v.shape) for k, v in sums.items()]
    return torch.cat([v.reshape(-1).double() for v in sums.values()]), layout


def unflatten_sums(vector: Tensor, layout: list[tuple[str, torch.Size]]) -> dict[str, Tensor]:
    """Inverse of :func:`flatten_sums`."""
    out, pos = {}, 0
    for name, shape in layout:
        n = int(torch.Size(shape).numel())
        out[name] = vector[pos : pos + n].reshape(shape)
        pos += n
    return out


def _ratio(num, den) -> float:
    num, den = float(num), float(den)
    return num / den if den > 0 else float("nan")


def summarize(sums: dict[str, Tensor], settings: PSESettings | None = None) -> dict[str, float]:
    """Final numbers from (reduced) sums; names without a prefix (the callback adds ``pse/``).

    Populations: ``attack_success_rate`` over analysed samples (correctly classified ones when
    only_correct); category shares, phi, S, P, group, CAM and unit numbers over counted samples
    (successful attacks, plus failed ones when include_failed). CAM ``share_<cat>`` is pooled:
    energy of <cat> groups inside the region / energy of <cat> groups (NaN when there is none).
    """
    cfg = settings or PSESettings()
    n_counted = float(sums["n_counted"])
    out = {
        "num_samples": float(sums["n_samples"]),
        "num_analysed": float(sums["n_analysed"]),
        "num_misclassified": float(sums["n_samples"] - sums["n_correct"]),
        "num_success": float(sums["n_success"]),
        "num_failed": float(sums["n_analysed"] - sums["n_success"]),
        "num_counted": n_counted,
        "clean_acc": _ratio(sums["n_correct"], sums["n_samples"]),
        "attack_success_rate": _ratio(sums["n_success"], sums["n_analysed"]),
    }
    for i, name in enumerate(CATEGORIES):
        out[f"frac_{name}"] = _ratio(sums["cat_counts"][i], n_counted)
    out["mean_phi"] = _ratio(sums["phi_sum"], sums["phi_count"])
    out["mean_S"] = _ratio(sums["S_sum"], n_counted)
    out["mean_P"] = _ratio(sums["P_sum"], n_counted)
    out["mean_steps"] = _ratio(sums["steps_sum"], n_counted)
    out["mean_norm"] = _ratio(sums["norm_sum"], n_counted)
    groups = float(sums["group_cat_counts"].sum())
    energy = float(sums["energy_total"].sum())
    for i, name in enumerate(CATEGORIES):
        out[f"group/frac_{name}"] = _ratio(sums["group_cat_counts"][i], groups)
        out[f"group/energy_{name}"] = _ratio(sums["energy_total"][i], energy)
    for region in ("true", "target"):
        inside = sums[f"energy_in_{region}"]
        for i, name in enumerate(CATEGORIES):
            out[f"cam_{region}/share_{name}"] = _ratio(inside[i], sums["energy_total"][i])
        out[f"cam_{region}/share_all"] = _ratio(sums[f"share_{region}_sum"], sums["share_count"])
    units = unit_changes_from_sums(
        sums["unit_count"], sums["unit_sum_change"], sums["unit_sum_clean"], sums["unit_sum_clean_sq"],
        cfg.unit_threshold,
    )
    out["units/frac_promoted"] = units.frac_promoted
    out["units/frac_suppressed"] = units.frac_suppressed
    out["units/mean_abs_change"] = (
        float(units.mean_change.abs().mean()) if units.mean_change.numel() else float("nan")
    )
    return out


def per_sample_rows(batch: PSEBatch) -> tuple[list[str], Tensor]:
    """Column names and a float64 matrix (B, F) of the per-sample results (for tables)."""
    group_counts = torch.zeros(batch.labels.shape[0], len(CATEGORIES), dtype=torch.float64, device=batch.labels.device)
    group_counts.scatter_add_(1, batch.group.category, torch.ones_like(batch.group.category, dtype=torch.float64))
    group_counts = group_counts * batch.counted.double()[:, None]
    columns = [
        "label", "target", "pred_clean", "pred_adv", "correct", "success", "counted", "steps",
        "S", "P", "phi", "category", "delta_norm", "cam_true_share", "cam_target_share",
    ] + [f"groups_{name}" for name in CATEGORIES]
    values = torch.stack(
        [
            batch.labels.double(), batch.targets.double(), batch.pred_clean.double(),
            batch.pred_adv.double(), batch.correct.double(), batch.success.double(),
            batch.counted.double(), batch.steps.double(), batch.S.double(), batch.P.double(),
            batch.phi.double(), batch.category.double(), batch.delta_norm.double(),
            batch.share_in_true.double(), batch.share_in_target.double(),
        ],
        dim=1,
    )
    return columns, torch.cat([values, group_counts], dim=1)


# --------------------------------------------------------------------------------------------
# The analysis over a set of images
# --------------------------------------------------------------------------------------------


def run_analysis(
    model: nn.Module,
    batches: Iterable[Any],
    settings: PSESettings,
    device: torch.device | str,
    seed: int = 0,
    on_batch: Callable[[PSEBatch], None] | None = None,
) -> tuple[dict[str, Tensor] | None, list[str], Tensor | None]:
    """Analyse every batch: (sums, per-sample column names, rows (N, F) with the dataset ``id`` first).

    ``batches`` yield objects with ``x`` (B, C, H, W), ``y`` (B,), ``ids`` (B,) dataset indices and
    ``to(device, dtype)`` (``callbacks._eval_subset.EvalBatch``); images are cast to the model's
    floating dtype. The ``random`` targets come from :func:`pse_target_uniform` (seed, id).
    ``sums`` (:func:`batch_sums`, added over batches) is None when there is no batch; ``on_batch``
    sees each :class:`PSEBatch` (e.g. to keep examples for a figure). The model is put in eval
    mode by the analysis helpers (modes restored) and the work runs inside ``torch.enable_grad()``.
    """
    params = next(iter(model.parameters()), None)
    dtype = params.dtype if params is not None and params.is_floating_point() else torch.float32
    sums, rows, columns = None, [], ["id"]
    with torch.enable_grad():
        for batch in batches:
            batch = batch.to(device, dtype)
            uniform = pse_target_uniform(batch.ids, seed)
            result = analyze_batch(model, batch.x, batch.y, settings, uniform=uniform)
            sums = add_sums(sums, {k: v.to(device) for k, v in batch_sums(result, settings).items()})
            names, values = per_sample_rows(result)
            columns = ["id", *names]
            rows.append(torch.cat([batch.ids.double()[:, None].to(values.device), values], 1).cpu())
            if on_batch is not None:
                on_batch(result)
    return sums, columns, (torch.cat(rows) if rows else None)
