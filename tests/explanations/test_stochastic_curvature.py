"""The curvature term on models with stochastic layers: both passes see the same masks."""

import pytest
import timm
import torch
from torch import nn

import lightning_modules  # noqa: F401  (registers resnet9)
from explanations.objectives import build_objective
from explanations.regularizers import capture_rng_state, curvature_term, frozen_batchnorm_stats
from explanations.saliency import input_gradient


def _dropout_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Softplus(beta=2.0), nn.Dropout(0.2),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 4),
    )


def _r_h(model, x, y, h, replay=True):
    torch.manual_seed(1)
    state = capture_rng_state(x.device) if replay else None
    g = input_gradient(model, x, y, create_graph=True).grad
    return curvature_term(model, x, y, g, h, rng_state=state).mean().item()


def _assert_not_one_over_h(values: dict[float, float], eval_value: float) -> None:
    # a genuine curvature varies slowly with h; mask noise grows as 1/h (x100 over this range)
    assert max(values.values()) / min(values.values()) < 3.0, values
    assert values[1e-3] < 5 * eval_value + 1e-6, (values, eval_value)


def test_dropout_masks_shared_r_h_does_not_scale_as_one_over_h():
    model = _dropout_net().train()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    hs = (1e-3, 1e-2, 1e-1)
    replayed = {h: _r_h(model, x, y, h) for h in hs}
    noisy = {h: _r_h(model, x, y, h, replay=False) for h in hs}
    eval_value = _r_h(model.eval(), x, y, 1e-3)
    model.train()
    _assert_not_one_over_h(replayed, eval_value)
    # without the replay the term measures the mask difference: ~1/h, and far above eval mode
    assert noisy[1e-3] > 20 * noisy[1e-1] / 10 and noisy[1e-3] > 50 * replayed[1e-3], (noisy, replayed)


def test_replay_leaves_generator_as_after_one_pass():
    model = _dropout_net().train()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(3)
    state = capture_rng_state(x.device)
    g = input_gradient(model, x, y, create_graph=True).grad
    after_first = torch.get_rng_state()
    curvature_term(model, x, y, g, 1e-2, rng_state=state)
    assert torch.equal(torch.get_rng_state(), after_first)


@pytest.mark.parametrize("objective", ["r2et", "est_h"])
def test_objective_replays_masks_on_timm_drop_path(objective):
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=8, num_classes=4, drop_path_rate=0.3,
        drop_rate=0.2, depth=2,
    )
    # ViT's GELU is smooth; drop-path and dropout are the only randomness
    model.train()
    x, y = torch.rand(2, 3, 16, 16), torch.tensor([0, 1])
    terms = {}
    for h in (1e-3, 1e-2, 1e-1):
        torch.manual_seed(5)
        out = build_objective(objective, h=h, k=0.25)(model, x, y)
        assert torch.isfinite(out.loss)
        terms[h] = out.terms["curvature"].item()
    assert max(terms.values()) / min(terms.values()) < 3.0, terms


def test_frozen_batchnorm_cumulative_average_counts_one_pass():
    torch.manual_seed(0)
    a, b = torch.randn(4, 2, 3, 3) + 1, torch.randn(4, 2, 3, 3) + 2
    single = nn.BatchNorm2d(2, momentum=None).train()
    single(a)
    single(b)
    frozen = nn.BatchNorm2d(2, momentum=None).train()
    frozen(a)
    with frozen_batchnorm_stats(frozen):
        frozen(torch.randn(4, 2, 3, 3) + 7)
    assert frozen.momentum is None
    assert frozen.num_batches_tracked.item() == 1
    frozen(b)
    assert frozen.num_batches_tracked.item() == 2
    torch.testing.assert_close(frozen.running_mean, single.running_mean)
    torch.testing.assert_close(frozen.running_var, single.running_var)
