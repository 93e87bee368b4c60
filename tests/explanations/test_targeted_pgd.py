"""Targeted PGD on the C&W margin: reaches the target, respects the budget, leaves the model alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explanations.targeted_pgd import (
    choose_targets,
    cw_margin,
    perturbation_norm,
    targeted_pgd,
)

NUM_CLASSES = 4


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8 px RGB images: class c brightens quadrant c over a noisy grey background."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    x = 0.4 + 0.1 * torch.rand(n, 3, 8, 8, generator=g)
    rows, cols = (labels // 2) * 4, (labels % 2) * 4
    for c in range(NUM_CLASSES):  # loop over classes to build the data set, not over samples
        sel = labels == c
        x[sel, :, rows[sel][0] : rows[sel][0] + 4, cols[sel][0] : cols[sel][0] + 4] += 0.3
    return x.clamp(0, 1), labels


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        nn.Flatten(), nn.Linear(128, NUM_CLASSES),
    )
    x, y = make_data(256, 0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    xt, yt = make_data(64, 1)
    with torch.no_grad():
        assert (model(xt).argmax(1) == yt).float().mean() > 0.95
    opt.zero_grad(set_to_none=True)
    return model, xt, yt


@pytest.mark.parametrize("rule", ["random", "least_likely", "second_likely"])
def test_linf_reaches_target_within_budget(trained, rule):
    model, x, y = trained
    model.train()  # the attack runs in eval mode and restores the previous mode
    model[1].eval()
    eps = 0.25
    result = targeted_pgd(model, x, y, eps=eps, steps=30, norm="linf", target_rule=rule,
                          generator=torch.Generator().manual_seed(0))
    assert model.training and not model[1].training and model[0].training
    assert all(p.grad is None for p in model.parameters())
    assert (result.targets != y).all()
    assert result.success_rate >= 0.9, result.success_rate
    assert result.delta.abs().max() <= eps + 1e-6
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    torch.testing.assert_close(result.x_adv, x + result.delta)
    model.eval()
    with torch.no_grad():
        adv_pred = model(result.x_adv).argmax(1)
    assert torch.equal(adv_pred == result.targets, result.success)
    assert (result.margin[result.success] < 0).all()
    assert (result.steps <= 30).all()


def test_l2_reaches_target_within_budget(trained):
    model, x, y = trained
    eps = 2.0
    result = targeted_pgd(model, x, y, eps=eps, steps=30, norm="l2", target_rule="second_likely", rand_init=True,
                          generator=torch.Generator().manual_seed(0))
    assert result.success_rate >= 0.9, result.success_rate
    assert perturbation_norm(result.delta, "l2").max() <= eps + 1e-5
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1


def test_early_stop_keeps_first_successful_iterate(trained):
    model, x, y = trained
    kwargs = dict(eps=0.25, steps=30, target_rule="second_likely")
    stopped = targeted_pgd(model, x, y, **kwargs)
    running = targeted_pgd(model, x, y, early_stop=False, **kwargs)
    assert running.steps.eq(30).all() and (stopped.steps <= 30).all()
    both = stopped.success & running.success
    assert (perturbation_norm(stopped.delta[both], "linf") <= perturbation_norm(running.delta[both], "linf") + 1e-6).all()


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.8)])
def test_batched_attack_equals_per_sample_attacks(trained, norm, eps):
    model, x, y = trained
    x, y = x[:6], y[:6]
    targets = (y + 1) % NUM_CLASSES
    batched = targeted_pgd(model, x, targets=targets, eps=eps, steps=8, norm=norm)
    for i in range(6):  # reference: one sample at a time
        single = targeted_pgd(model, x[i : i + 1], targets=targets[i : i + 1], eps=eps, steps=8, norm=norm)
        # equal up to float noise (a sign step may flip on a near-zero gradient coordinate)
        assert ((batched.delta[i : i + 1] - single.delta).abs() > 1e-5).float().mean() < 1e-2
        assert batched.steps[i] == single.steps[0] and batched.success[i] == single.success[0]


def test_choose_targets_rules():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 5.0, 4.0, -1.0], [1.0, 1.0, 9.0, 2.0]])
    labels = torch.tensor([0, 2, 3])
    assert choose_targets(logits, labels, "second_likely").tolist() == [1, 1, 2]
    assert choose_targets(logits, labels, "least_likely").tolist() == [3, 3, 0]
    uniform = torch.tensor([0.0, 0.5, 0.999])
    assert choose_targets(logits, labels, "random", uniform=uniform).tolist() == [1, 0, 2]
    many = choose_targets(torch.zeros(3000, 4), torch.zeros(3000, dtype=torch.long), "random",
                          generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(many, minlength=4)
    assert counts[0] == 0 and (counts[1:] > 900).all()
    with pytest.raises(ValueError, match="target_rule"):
        choose_targets(logits, labels, "most_likely")


def test_cw_margin_sign():
    logits = torch.tensor([[1.0, 3.0, 2.0], [4.0, 0.0, 1.0]])
    torch.testing.assert_close(cw_margin(logits, torch.tensor([1, 1])), torch.tensor([-1.0, 4.0]))


def test_invalid_norm():
    with pytest.raises(ValueError, match="norm"):
        targeted_pgd(nn.Flatten(), torch.rand(1, 2), torch.tensor([0]), norm="l1")
