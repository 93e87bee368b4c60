"""The input contract of the core API (explanations.validation): images float (B, C, H, W),
finite, in [0, 1]; eps in (0, 1]; steps >= 1; anything else refused with a message naming the
value. Explanation entry points run the model in eval mode (restored); training-time
regularizers keep the caller's train mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explanations import (
    ATTACKS,
    AdversarialTraining,
    PaperERAttack,
    PSESettings,
    build_attack,
    build_objective,
    explain,
    explain_with_logits,
    saliency,
    targeted_pgd,
    thickness_estimates,
    topk_thickness,
)
from explanations.evaluation import EvaluationProtocol, parse_attacks
from explanations.validation import check_eps, check_images, check_steps

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def tiny_model(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3, padding=1)] + ([nn.BatchNorm2d(4)] if bn else [])
    return nn.Sequential(*layers, nn.Softplus(beta=3.0), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))


def images(b: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(b, 3, 8, 8, generator=g), torch.randint(0, 3, (b,), generator=g)


def _registered(name):
    """Build the registered attack ``name`` from (model, eps, steps), passing what it takes."""
    return lambda model, eps=8 / 255, steps=2: build_attack(name, model, dict(eps=eps, steps=steps, k=5))


#: Every attack of the project, built from (model, eps, steps): the registry (the noise baseline
#: included) plus the paper preset (whose box radius is steps * step_size normalised units).
ATTACK_FACTORIES = {
    **{name: _registered(name) for name in ATTACKS},
    "er_paper": lambda model, eps=None, steps=2: PaperERAttack(model, MEAN, STD, steps=steps, step_size=5e-3, k=5),
}
TAKES_EPS = [n for n, cls in ATTACKS.items() if "eps" in cls.options]
TAKES_STEPS = [n for n, cls in ATTACKS.items() if "steps" in cls.options] + ["er_paper"]


def bad_images() -> dict[str, tuple[torch.Tensor, str]]:
    """Bad inputs a user hands over, with the message that must name them."""
    x, _ = images()
    nan = x.clone()
    nan[0, 1, 2, 3] = float("nan")
    nan[2, 0, 0, 0] = float("inf")
    return {
        "0..255 floats": (x * 255, r"images have values in \[0\.\d+, 2\d\d\.?\d*\]; .* in \[0, 1\] \(divide by 255\)"),
        "negative": (x - 0.5, r"images have values in \[-0\.\d+, 0\.\d+\]"),
        "NaN and inf": (nan, r"images have 2 non-finite value\(s\) \(NaN or inf\) of 768"),
        "NHWC": (x.permute(0, 2, 3, 1).contiguous(), r"images of shape \(4, 8, 8, 3\) look channels-last .* x\.permute\(0, 3, 1, 2\)"),
        "uint8": ((x * 255).to(torch.uint8), r"images have dtype torch\.uint8; .* x\.float\(\) / 255"),
        "3-D": (x[0], r"images must have shape \(B, C, H, W\) \(4-D\), got \(3, 8, 8\)"),
    }


# ------------------------------------------------------------------------ the validators
def test_validators_accept_the_contract_and_name_what_they_refuse():
    check_images(images()[0])
    check_images(images()[0].to(torch.bfloat16))
    check_images(torch.zeros(0, 3, 8, 8))
    assert check_eps(8 / 255) == pytest.approx(0.0314, abs=1e-4) and check_eps(1) == 1.0
    assert check_eps(2.0, norm="l2") == 2.0 and check_steps(1) == 1
    with pytest.raises(ValueError, match=r"eps=8 is in pixel units of \[0, 1\]; did you mean 8/255 = 0\.0314\?"):
        check_eps(8)
    with pytest.raises(ValueError, match="eps=0 is no attack"):
        check_eps(0.0)
    for bad in (-0.1, float("nan"), float("inf"), "0.03", True):
        with pytest.raises(ValueError, match=f"eps={bad!r}"):
            check_eps(bad)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=f"steps={bad!r} must be an integer >= 1"):
            check_steps(bad)


# ------------------------------------------------------------------------ every attack
@pytest.mark.parametrize("name", TAKES_EPS)
def test_every_attack_refuses_eps_outside_0_1(name):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"eps=8 is in pixel units of \[0, 1\]; did you mean 8/255 = 0\.0314\?"):
        ATTACK_FACTORIES[name](model, eps=8)
    with pytest.raises(ValueError, match="eps=0 is no attack"):
        ATTACK_FACTORIES[name](model, eps=0.0)


@pytest.mark.parametrize("name", TAKES_STEPS)
def test_every_attack_refuses_zero_steps(name):
    with pytest.raises(ValueError, match=r"steps=0 must be an integer >= 1 \(0 steps is no attack"):
        ATTACK_FACTORIES[name](tiny_model(), steps=0)


def test_paper_box_radius_must_be_a_pixel_budget():
    with pytest.raises(ValueError, match=r"steps \* step_size = 8 normalised units is a box of radius 2 in pixel units"):
        PaperERAttack(tiny_model(), MEAN, STD, steps=100, step_size=0.08)
    with pytest.raises(ValueError, match=r"box=-1.0 must be a positive finite number"):
        PaperERAttack(tiny_model(), MEAN, STD, steps=1, step_size=1.0, box=-1.0)
    with pytest.raises(ValueError, match=r"is a box of radius 1.25 in pixel units"):
        PaperERAttack(tiny_model(), MEAN, STD, steps=1, step_size=1.0, box=5.0)
    assert PaperERAttack(tiny_model(), MEAN, STD, steps=100, step_size=0.08, box=4.0).eps == 4.0  # 1 pixel: kept


@pytest.mark.parametrize("name", list(ATTACK_FACTORIES))
@pytest.mark.parametrize("case", list(bad_images()))
def test_every_attack_refuses_bad_images(name, case):
    x, match = bad_images()[case]
    y = images()[1]
    with pytest.raises(ValueError, match=match):
        ATTACK_FACTORIES[name](tiny_model())(x, y)


@pytest.mark.parametrize("name", list(ATTACK_FACTORIES))
def test_images_are_checked_once_per_call_not_per_step(name, monkeypatch):
    """The check is one aminmax pass per call; the attack loop does not repeat it."""
    calls = []
    aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda *a, **kw: calls.append(1) or aminmax(*a, **kw))
    model = tiny_model()
    x, y = images()
    factory = ATTACK_FACTORIES[name]
    attack = factory(model, steps=5)
    attack(x, y)
    assert len(calls) == 1


# ------------------------------------------------------------------------ explanations
@pytest.mark.parametrize("case", list(bad_images()))
def test_explain_and_thickness_refuse_bad_images(case):
    x, match = bad_images()[case]
    model = tiny_model()
    y = images()[1]
    for call in (lambda: explain(model, x, y), lambda: explain_with_logits(model, x, y), lambda: saliency(model, x, y),
                 lambda: thickness_estimates(model, x, y, k=5, num_samples=1, num_points=1)):
        with pytest.raises(ValueError, match=match):
            call()


def test_explanations_run_in_eval_mode_and_restore_every_flag():
    """A BatchNorm model in train mode: the saliency of an image is the same alone and in a batch,
    the running statistics do not move, and every submodule keeps its own flag."""
    model = tiny_model(bn=True).train()
    model[-1].eval()  # a submodule with its own flag
    bn = model[1]
    x, y = images(6)
    running = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    flags = [m.training for m in model.modules()]
    batched = explain(model, x, y)
    alone = torch.cat([explain(model, x[i : i + 1], y[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(batched, alone)
    torch.testing.assert_close(explain_with_logits(model, x, y).saliency, batched)
    torch.testing.assert_close(saliency(model, x, y), batched)
    thick = thickness_estimates(model, x, y, k=5, num_samples=1, num_points=2)
    topk_thickness(model, x[:1], y[:1], k=5, num_samples=1, num_points=2)
    assert thick["all"].shape == (6,)
    assert [m.training for m in model.modules()] == flags and model.training
    assert torch.equal(bn.running_mean, running[0]) and torch.equal(bn.running_var, running[1])
    assert int(bn.num_batches_tracked) == running[2]


def test_training_regularizers_keep_train_mode():
    """R2ET's terms inside training_step see the batch statistics (train mode): they move BN's
    running statistics, unlike the explanation entry points."""
    model = tiny_model(bn=True).train()
    x, y = images(6)
    before = model[1].running_mean.clone()
    out = build_objective("r2et", k=5)(model, x, y)
    assert torch.isfinite(out.loss) and model.training
    assert not torch.equal(model[1].running_mean, before)


# ------------------------------------------------------------------------ evaluation, PSE, AT
def test_evaluation_refuses_no_attack_settings():
    with pytest.raises(ValueError, match=r"steps=0 must be an integer >= 1"):
        EvaluationProtocol(eps=[8 / 255], steps=0)
    with pytest.raises(ValueError, match="eps=0 is no attack"):
        EvaluationProtocol(eps=[0.0, 8 / 255])
    with pytest.raises(ValueError, match=r"eps=8 is in pixel units of \[0, 1\]; did you mean 8/255"):
        EvaluationProtocol(eps=[8])
    with pytest.raises(ValueError, match="thickness_eps=0 is no attack"):
        EvaluationProtocol(eps=[8 / 255], thickness_eps=0.0)
    protocol = EvaluationProtocol(eps=[8 / 255], attacks=[{"name": "er", "kwargs": {"steps": 0}}], k=5, thickness=False)
    with pytest.raises(ValueError, match=r"steps=0 must be an integer >= 1"):
        protocol.prepare(tiny_model(), images()[0])


def test_evaluation_refuses_bad_images():
    protocol = EvaluationProtocol(eps=[8 / 255], attacks=["er"], k=5, steps=1, thickness=False)
    x, y = images()
    with pytest.raises(ValueError, match=r"\(divide by 255\)"):
        protocol.evaluate(tiny_model(), [(x * 255, y, torch.arange(4))])


def test_noise_in_the_list_with_noise_baseline_false_is_a_conflict():
    with pytest.raises(ValueError, match=r"the attack list names 'noise' .* but the noise baseline is off .*: drop one"):
        parse_attacks(["er", "noise"], noise=False)
    with pytest.raises(ValueError, match="drop one"):
        EvaluationProtocol(attacks=["er", "noise"], noise=False)
    assert [s.name for s in parse_attacks(None, noise=False)] == ["er", "er_surrogate", "mse"]  # default ensemble


def test_targeted_pgd_and_pse_settings_share_the_validators():
    model = tiny_model()
    x, y = images()
    with pytest.raises(ValueError, match=r"steps=0 must be an integer >= 1"):
        targeted_pgd(model, x, y, eps=8 / 255, steps=0)
    with pytest.raises(ValueError, match=r"eps=8 is in pixel units .* 8/255 = 0\.0314"):
        targeted_pgd(model, x, y, eps=8, steps=2)
    with pytest.raises(ValueError, match=r"\(divide by 255\)"):
        targeted_pgd(model, x * 255, y, steps=2)
    with pytest.raises(ValueError, match=r"eps=8 is in pixel units"):
        PSESettings(eps=8)
    with pytest.raises(ValueError, match="eps=0 is no attack"):
        PSESettings(eps=0.0)
    with pytest.raises(ValueError, match=r"steps=0 must be an integer >= 1"):
        PSESettings(steps=0)
    assert PSESettings(eps=2.0, norm="l2").eps == 2.0  # an l2 radius may exceed 1


def test_adversarial_training_refuses_zero_steps_and_pixel_eps():
    with pytest.raises(ValueError, match=r"objective 'at' \(its training attack\): steps=0 must be an integer >= 1"):
        AdversarialTraining(steps=0)
    with pytest.raises(ValueError, match=r"objective 'at' .*eps=8 is in pixel units"):
        AdversarialTraining(eps=8)


def test_pool_zero_is_refused_instead_of_meaning_no_pooling():
    model = tiny_model()
    x, y = images()
    match = r"pool=0 is not valid: give null \(no pooling\) or an integer >= 1"
    with pytest.raises(ValueError, match=match):
        explain(model, x, y, pool=0)
    for name in TAKES_EPS:
        with pytest.raises(ValueError, match=match):
            ATTACKS[name](model, eps=8 / 255, k=5, pool=0)


def test_integrated_gradients_with_zero_steps_is_refused():
    model, (x, y) = tiny_model(), images()
    with pytest.raises(ValueError, match=r"steps=0 must be an integer >= 1"):
        explain(model, x, y, method="integrated_gradients", steps=0)
