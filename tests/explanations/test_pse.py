"""PSE definitions (DESIGN §6) on models whose answer is known, and batched == looped checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from explanations.pse import (
    BALANCED,
    CATEGORIES,
    INEFFECTIVE,
    PROMOTION,
    SUPPRESSION,
    PSESettings,
    add_sums,
    analyze_batch,
    batch_sums,
    categorize,
    check_cutoffs,
    group_index_map,
    group_logits,
    group_masks,
    group_pse,
    groups_to_pixels,
    per_sample_rows,
    promotion_share,
    pse_from_logits,
    summarize,
    unit_activations,
    unit_changes,
)

C, H, W, K = 1, 4, 4, 3


def linear_model(a: float = 1.0, b: float = 1.0) -> nn.Module:
    """Z = W x: Z_0 = a * pixel 0 (the true class), Z_1 = b * pixel 1 (the target), Z_2 = 0."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, K, bias=True))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[0, 0] = a
        model[1].weight[1, 1] = b
        model[1].bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
    return model


def deltas(pairs: list[tuple[float, float]]) -> torch.Tensor:
    """Perturbations that lower pixel 0 by s and raise pixel 1 by p (so S = s, P = p for a = b = 1)."""
    d = torch.zeros(len(pairs), C, H, W)
    for i, (s, p) in enumerate(pairs):
        d[i, 0, 0, 0] = -s
        d[i, 0, 0, 1] = p
    return d


# (S, P) -> expected phi and category with the default cut-offs (1/3, 2/3)
CASES = [
    ((0.3, 0.1), 0.25, SUPPRESSION),
    ((0.1, 0.1), 0.5, BALANCED),
    ((0.1, 0.3), 0.75, PROMOTION),
    ((0.2, 0.1), 1 / 3, BALANCED),  # boundary: phi = 1/3 is balanced (lo <= phi <= hi)
    ((0.1, 0.2), 2 / 3, BALANCED),
    ((0.2, -0.1), 0.0, SUPPRESSION),  # P <= 0 < S
    ((0.2, 0.0), 0.0, SUPPRESSION),
    ((-0.1, 0.2), 1.0, PROMOTION),  # S <= 0 < P
    ((-0.1, -0.2), math.nan, INEFFECTIVE),
    ((0.0, 0.0), math.nan, INEFFECTIVE),
]


def test_linear_model_matches_analytic_answer():
    a, b = 2.0, 0.5
    model = linear_model(a, b)
    pairs = [sp for sp, _, _ in CASES]
    delta = deltas(pairs)
    x0 = torch.full((len(pairs), C, H, W), 0.5)
    labels = torch.zeros(len(pairs), dtype=torch.long)
    targets = torch.ones(len(pairs), dtype=torch.long)
    with torch.no_grad():
        result = pse_from_logits(model(x0), model(x0 + delta), labels, targets)
    expected_s = torch.tensor([a * s for (s, _), _, _ in CASES])
    expected_p = torch.tensor([b * p for (_, p), _, _ in CASES])
    torch.testing.assert_close(result.S, expected_s, atol=1e-6, rtol=0)
    torch.testing.assert_close(result.P, expected_p, atol=1e-6, rtol=0)
    phi = promotion_share(expected_s, expected_p)
    torch.testing.assert_close(result.phi, phi, equal_nan=True)
    # with a = b = 1 the analytic phi and categories of the table hold exactly
    model = linear_model()
    with torch.no_grad():
        result = pse_from_logits(model(x0), model(x0 + delta), labels, targets)
    torch.testing.assert_close(result.phi, torch.tensor([p for _, p, _ in CASES]), equal_nan=True, atol=1e-6, rtol=0)
    assert result.category.tolist() == [c for _, _, c in CASES]


def test_cutoffs_are_configurable_and_validated():
    s = torch.tensor([0.3, 0.1, 0.1])
    p = torch.tensor([0.1, 0.1, 0.3])  # phi = 0.25, 0.5, 0.75
    assert categorize(s, p, (0.2, 0.8)).tolist() == [BALANCED, BALANCED, BALANCED]
    assert categorize(s, p, (0.5, 0.5)).tolist() == [SUPPRESSION, BALANCED, PROMOTION]
    # one-sided effects keep their side whatever the cut-offs
    assert categorize(torch.tensor([0.2, -0.1]), torch.tensor([-0.1, 0.2]), (0.0, 1.0)).tolist() == [
        SUPPRESSION, PROMOTION,
    ]
    with pytest.raises(ValueError, match="cutoffs"):
        check_cutoffs((0.7, 0.3))
    assert CATEGORIES[SUPPRESSION] == "suppression" and CATEGORIES[INEFFECTIVE] == "ineffective"


def test_group_effects_of_linear_model_add_up():
    model = linear_model(1.5, 0.7)
    torch.manual_seed(0)
    x0 = torch.rand(3, C, H, W) * 0.5
    delta = (torch.rand(3, C, H, W) - 0.5) * 0.2
    labels, targets = torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long)
    group = group_pse(model, x0, delta, labels, targets, group_size=2)
    whole = pse_from_logits(model(x0), model(x0 + delta), labels, targets)
    assert group.S.shape == (3, 4)
    torch.testing.assert_close(group.S.sum(1), whole.S, atol=1e-5, rtol=0)
    torch.testing.assert_close(group.P.sum(1), whole.P, atol=1e-5, rtol=0)


class BatchSizeNoise(nn.Module):
    """The linear model plus 1e-6 * batch size: outputs that depend on the batch composition,
    as float rounding in real batched convolutions does."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = linear_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + 1e-6 * x.shape[0]


def test_group_without_perturbation_is_ineffective_whatever_the_batch_rounding():
    model = BatchSizeNoise()
    x0 = torch.full((2, C, H, W), 0.5)
    delta = torch.zeros(2, C, H, W)
    delta[0, 0, 0, 0] = -0.2  # sample 0: only group 0 moves (S = 0.2); sample 1: nothing moves
    labels, targets = torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long)
    group = group_pse(model, x0, delta, labels, targets, group_size=2)
    assert group.category[0, 0] == SUPPRESSION
    assert group.category[0, 1:].tolist() == [INEFFECTIVE] * 3
    assert group.category[1].tolist() == [INEFFECTIVE] * 4
    assert torch.equal(group.S[1], torch.zeros(4)) and torch.equal(group.P[1], torch.zeros(4))


def small_convnet(num_classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Softplus(), nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )


@pytest.mark.parametrize("group_size,chunk_size", [(4, 256), (5, 7)])
def test_group_effects_batched_equal_loop_over_groups(group_size, chunk_size):
    model = small_convnet()
    model.train()  # the helpers switch to eval mode themselves and restore it
    torch.manual_seed(1)
    x = torch.rand(3, 3, 12, 12) * 0.8
    delta = (torch.rand(3, 3, 12, 12) - 0.5) * 0.1
    labels, targets = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 0])
    batched = group_pse(model, x, delta, labels, targets, group_size, chunk_size=chunk_size)
    assert model.training and model[1].training

    model.eval()
    masks = group_masks(12, 12, group_size)
    with torch.no_grad():
        clean = model(x)
        looped = torch.stack([model(x + delta * m[None, None].float()) for m in masks], dim=1)
    reference = pse_from_logits(clean, looped, labels, targets)
    torch.testing.assert_close(batched.S, reference.S, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.P, reference.P, atol=1e-5, rtol=1e-5)
    assert torch.equal(batched.category, reference.category)
    torch.testing.assert_close(group_logits(model, x, delta, group_size, chunk_size), looped, atol=1e-5, rtol=1e-5)


def test_group_index_map_covers_every_pixel_once():
    index, count = group_index_map(10, 7, 4)
    assert count == 3 * 2 and index.shape == (10, 7)
    assert sorted(index.unique().tolist()) == list(range(count))
    masks = group_masks(10, 7, 4)
    assert torch.equal(masks.sum(0), torch.ones(10, 7, dtype=torch.long))
    values = torch.arange(12.0).view(2, 6)
    pixels = groups_to_pixels(values, 10, 7, 4)
    assert pixels.shape == (2, 10, 7) and pixels[1, 9, 6] == values[1, 5]


class Probe(nn.Module):
    """Identity 'layer' on the input followed by a linear head: units = channel means of x."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Identity()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))

    def forward(self, x):
        return self.head(self.layer(x))


def test_unit_changes_known_answer():
    model = Probe()
    torch.manual_seed(0)
    x = torch.rand(8, 3, 4, 4) * 0.5
    delta = torch.zeros_like(x)
    delta[:, 0] = 0.2  # channel 0 promoted
    delta[:, 1] = -0.2  # channel 1 suppressed, channel 2 unchanged
    _, clean = unit_activations(model, x, "layer")
    _, adv = unit_activations(model, x + delta, "layer")
    torch.testing.assert_close(clean, x.mean(dim=(2, 3)))
    stats = unit_changes(clean, adv, threshold=0.2)
    torch.testing.assert_close(stats.mean_change.float(), torch.tensor([0.2, -0.2, 0.0]), atol=1e-6, rtol=0)
    assert stats.frac_promoted == pytest.approx(1 / 3) and stats.frac_suppressed == pytest.approx(1 / 3)


def test_analysis_of_shards_sums_to_the_whole():
    model = small_convnet(num_classes=4)
    torch.manual_seed(2)
    x = torch.rand(6, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    uniform = torch.rand(6)
    cfg = PSESettings(eps=0.3, steps=5, only_correct=False, group_size=4, cam_layer="3")
    whole = analyze_batch(model, x, labels, cfg, uniform=uniform)
    parts = [analyze_batch(model, x[s], labels[s], cfg, uniform=uniform[s]) for s in (slice(0, 4), slice(4, 6))]
    merged = add_sums(add_sums(None, batch_sums(parts[0], cfg)), batch_sums(parts[1], cfg))
    a, b = summarize(batch_sums(whole, cfg), cfg), summarize(merged, cfg)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-6, nan_ok=True), key
    for name in CATEGORIES:
        assert f"frac_{name}" in a and f"cam_true/share_{name}" in a and f"group/frac_{name}" in a
    columns, rows = per_sample_rows(whole)
    assert rows.shape == (6, len(columns))
    assert whole.cams.shape == (6, 2, 8, 8) and whole.group.S.shape == (6, 4)


def test_failed_attacks_are_counted_not_dropped():
    model = small_convnet(num_classes=4)
    x, labels = torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0])
    cfg = PSESettings(eps=1e-6, steps=2, only_correct=False, group_size=4, cam_layer="3")  # too small to reach a target
    result = analyze_batch(model, x, labels, cfg, uniform=torch.rand(5))
    numbers = summarize(batch_sums(result, cfg), cfg)
    trivially_reached = int((result.pred_clean == result.targets).sum())  # target already predicted
    assert numbers["num_analysed"] == 5
    assert numbers["num_failed"] == 5 - trivially_reached
    assert numbers["attack_success_rate"] == pytest.approx(trivially_reached / 5)
    cfg_all = PSESettings(eps=1e-6, steps=2, only_correct=False, include_failed=True, group_size=4, cam_layer="3")
    numbers = summarize(batch_sums(analyze_batch(model, x, labels, cfg_all, uniform=torch.rand(5)), cfg_all), cfg_all)
    assert numbers["num_counted"] == 5  # the failed attacks are in the category shares
    assert sum(numbers[f"frac_{c}"] for c in CATEGORIES) == pytest.approx(1.0)


def test_settings_choices_are_the_validators_lists():
    """The Literal types the CLI and pse_report offer are the values the validators accept."""
    import typing

    from explanations.cam import CAM_METHODS
    from explanations.pgd import NORMS
    from explanations.targeted_pgd import TARGET_RULES

    hints = typing.get_type_hints(PSESettings)
    assert typing.get_args(hints["norm"]) == NORMS
    assert typing.get_args(hints["target_rule"]) == TARGET_RULES
    assert typing.get_args(hints["cam_method"]) == CAM_METHODS


def test_docs_settings_table_lists_every_setting():
    import dataclasses
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "pse.md").read_text()
    table = text[text.index("## Settings"):text.index("## Where the numbers go")]
    assert re.findall(r"^\| `(\w+)` \|", table, flags=re.M) == [f.name for f in dataclasses.fields(PSESettings)]
