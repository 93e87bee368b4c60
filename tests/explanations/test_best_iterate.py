"""The best-iterate ranking attacks: never weaker than the first-flip attack, monotone in budget,
surrogates for any ReLU network, MSE beats noise, the noise baseline, the R2ET reference preset."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explanations.attacks import (
    ATTACKS,
    ERAttack,
    MSEAttack,
    UniformNoise,
    apgd_checkpoints,
    paper_attack,
)
from explanations.explainers import eval_mode, explain, explain_unchecked
from explanations.ranking_metrics import precision_at_k


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


CONTRAST = 0.08
#: The registered optimisers (attacks with steps and restarts; not the noise baseline): the
#: best-iterate machinery's guarantees hold for each.
OPTIMISERS = [name for name, cls in ATTACKS.items() if {"steps", "restarts", "step_size"} <= cls.options]


def quadrant_data(n: int, g: torch.Generator, contrast: float = 0.3):
    """12 px images; the class is the quadrant holding a brighter square."""
    x = torch.rand(n, 3, 12, 12, generator=g) * 0.6
    y = torch.randint(0, 4, (n,), generator=g)
    for q in range(4):
        r, c = divmod(q, 2)
        x[y == q, :, r * 6 + 1 : r * 6 + 5, c * 6 + 1 : c * 6 + 5] += contrast
    return x.clamp(0, 1), y


class FunctionalReLUNet(nn.Module):
    """The same layers as ``relu_net`` but with ``F.relu`` calls in forward (as most CIFAR code)."""

    def __init__(self, ch: int = 8) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, ch, 3, padding=1)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1, stride=2)
        self.fc = nn.Linear(ch * 36, 4)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        return self.fc(x.flatten(1))


class ModuleReLUNet(FunctionalReLUNet):
    def __init__(self, ch: int = 8) -> None:
        super().__init__(ch)
        self.a1, self.a2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        return self.fc(self.a2(self.c2(self.a1(self.c1(x)))).flatten(1))


def softplus_net(ch: int = 8) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, ch, 3, padding=1), nn.Softplus(beta=10.0),
        nn.Conv2d(ch, ch, 3, padding=1, stride=2), nn.Softplus(beta=10.0),
        nn.Flatten(), nn.Linear(ch * 36, 4),
    )


def train(model: nn.Module, steps: int = 150, seed: int = 0, contrast: float = CONTRAST):
    """Adam on 512 low-contrast quadrant images: ~90% accuracy, small margins (flips happen)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = quadrant_data(512, g, contrast)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(steps):
        i = torch.randint(0, 512, (64,), generator=g)
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def trained(threads):
    with threads(1):
        torch.manual_seed(1)
        model = train(softplus_net()).double()
    xt, yt = quadrant_data(24, torch.Generator().manual_seed(5), CONTRAST)
    return model, xt.double(), yt


@pytest.fixture(scope="module")
def trained_relu(threads):
    with threads(1):
        torch.manual_seed(2)
        functional = train(FunctionalReLUNet()).double()
    xt, yt = quadrant_data(16, torch.Generator().manual_seed(6), CONTRAST)
    return functional, xt.double(), yt


def p_at_k(model, x, x_adv, y, k):
    return precision_at_k(explain(model, x, y), explain(model, x_adv, y), k)


def p_at_k_unclipped(model, x, x_adv, y, k):
    """P@k for attacked images that may leave [0, 1] (the paper threat model does not clip)."""
    with eval_mode(model):
        return precision_at_k(explain(model, x, y), explain_unchecked(model, x_adv, y).saliency, k)


def kept_prediction(model, x, x_adv):
    with torch.no_grad():
        return torch.equal(model(x_adv).argmax(1), model(x).argmax(1))


def kept_rows(model, x, x_adv):
    with torch.no_grad():
        return model(x_adv).argmax(1) == model(x).argmax(1)


def test_apgd_checkpoints_follow_the_reference_schedule():
    assert [t for t, _ in apgd_checkpoints(100)] == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(10)[:2] == [(2, 2), (3, 1)]
    assert apgd_checkpoints(0) == []


def test_new_attack_at_least_as_strong_as_legacy_per_image(trained):
    model, x, y = trained
    eps, k, steps = 8 / 255, 14, 10
    ids = torch.arange(x.shape[0])
    legacy = ERAttack(model, eps=eps, steps=steps, k=k, legacy=True, random_start=True)
    x_old = legacy(x, y, ids)
    p_old = p_at_k(model, x, x_old, y, k)
    assert legacy.flipped.any(), "the setting should stop some samples early"
    # same step, same start, same seed: the legacy trajectory is a prefix of the new one
    new = ERAttack(model, eps=eps, steps=steps, k=k, step_size=legacy.step_size, random_start=True)
    x_new = new(x, y, ids)
    p_new = p_at_k(model, x, x_new, y, k)
    assert kept_prediction(model, x, x_new) and kept_prediction(model, x, x_old)
    torch.testing.assert_close(new.p_at_k, p_new)
    assert (p_new <= p_old).all(), (p_new - p_old)
    assert p_new.mean() < p_old.mean() - 0.02
    # the default (APGD schedule, 2 restarts) is stronger than legacy on average too
    auto = ERAttack(model, eps=eps, steps=steps, k=k, restarts=2)
    p_auto = p_at_k(model, x, auto(x, y, ids), y, k)
    assert p_auto.mean() < p_old.mean() - 0.02, (p_auto.mean(), p_old.mean())


@pytest.mark.parametrize("name", OPTIMISERS)
def test_flip_is_undone_and_the_sample_continues(trained, name):
    model, x, y = trained
    attack = ATTACKS[name](model, eps=0.3, steps=8, step_size=0.1, k=14)
    x_adv = attack(x, y)
    assert kept_prediction(model, x, x_adv)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-9 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert attack.flipped.any() and attack.undone.max() >= 1
    # no sample stops: every step is either accepted or undone
    assert torch.equal(attack.steps_taken + attack.undone, torch.full_like(attack.undone, 8))


@pytest.mark.parametrize("name", OPTIMISERS)
def test_more_steps_restarts_and_a_warm_started_larger_ball_never_weaken(trained, name):
    model, x, y = trained
    cls = ATTACKS[name]
    k, ids = 14, torch.arange(x.shape[0])
    short = cls(model, eps=4 / 255, steps=4, step_size=1 / 255, k=k)
    x4 = short(x, y, ids)
    longer = cls(model, eps=4 / 255, steps=9, step_size=1 / 255, k=k)
    longer(x, y, ids)
    assert (longer.p_at_k <= short.p_at_k).all()
    one = cls(model, eps=4 / 255, steps=4, k=k, restarts=1, random_start=True)
    three = cls(model, eps=4 / 255, steps=4, k=k, restarts=3, random_start=True)
    one(x, y, ids)
    three(x, y, ids)
    assert (three.p_at_k <= one.p_at_k).all() and three.p_at_k.mean() <= one.p_at_k.mean()
    wide = cls(model, eps=8 / 255, steps=4, k=k)
    x8 = wide(x, y, ids, x_init=x4)
    assert (wide.p_at_k <= short.p_at_k).all()
    assert (x8 - x).abs().max() <= 8 / 255 + 1e-9
    torch.testing.assert_close(wide.p_at_k, p_at_k(model, x, x8, y, k))


def test_surrogate_is_the_same_for_functional_and_module_relu(trained_relu):
    functional, x, y = trained_relu
    modules = ModuleReLUNet().double()
    modules.load_state_dict(functional.state_dict())
    kw = dict(eps=8 / 255, steps=5, k=14, target="logit")
    plain = ERAttack(functional, surrogate_beta=None, **kw)
    torch.testing.assert_close(plain(x, y), x)  # the input Hessian of a ReLU net is zero
    assert plain.p_at_k.eq(1).all()
    a_fun, a_mod = ERAttack(functional, **kw), ERAttack(modules, **kw)  # surrogate_beta="auto"
    x_fun, x_mod = a_fun(x, y), a_mod(x, y)
    assert a_fun.surrogate == a_mod.surrogate == 10.0
    torch.testing.assert_close(x_fun, x_mod, rtol=0, atol=1e-6)
    torch.testing.assert_close(a_fun.p_at_k, a_mod.p_at_k)
    assert a_fun.p_at_k.mean() < 0.95, a_fun.p_at_k.mean()
    assert kept_prediction(functional, x, x_fun)
    # P@k is measured on the real model, not on the surrogate
    torch.testing.assert_close(a_fun.p_at_k, precision_at_k(
        explain(functional, x, None, target="logit"), explain(functional, x_fun, None, target="logit"), 14))
    assert not any(isinstance(m, nn.Softplus) for m in modules.modules())  # nothing was swapped


def test_explicit_surrogate_on_a_smooth_model_is_an_error_naming_it(trained):
    model, x, y = trained
    attack = ERAttack(model, eps=8 / 255, steps=2, k=14, surrogate_beta=10.0)
    with pytest.raises(ValueError, match="Sequential"):
        attack(x, y)
    auto = ERAttack(model, eps=8 / 255, steps=1, k=14)
    auto(x[:2], y[:2])
    assert auto.surrogate is None
    with pytest.raises(ValueError, match="surrogate_beta"):
        ERAttack(model, surrogate_beta="yes")
    with pytest.raises(ValueError, match="surrogate_beta"):
        ERAttack(model, surrogate_beta=-1.0)


def test_mse_attack_beats_noise_of_the_same_budget(trained):
    model, x, y = trained
    eps, k, ids = 8 / 255, 14, torch.arange(x.shape[0])
    noise = UniformNoise(model, eps=eps, seed=0, k=k)
    x_noise = noise(x, y, ids)
    mse = MSEAttack(model, eps=eps, steps=10, k=k)
    x_mse = mse(x, y, ids)
    assert kept_prediction(model, x, x_mse) and kept_prediction(model, x, x_noise)
    p_mse, p_noise = p_at_k(model, x, x_mse, y, k), p_at_k(model, x, x_noise, y, k)
    torch.testing.assert_close(noise.p_at_k, p_noise)
    assert p_mse.mean() < p_noise.mean() - 0.05, (p_mse.mean(), p_noise.mean())


def test_uniform_noise_is_seeded_per_sample_and_keeps_the_prediction(trained):
    model, x, y = trained
    ids = torch.arange(40, 40 + x.shape[0])
    noise = UniformNoise(model, eps=0.4, seed=3, k=14, draws=2)
    batched = noise(x, y, ids)
    p, flipped = noise.p_at_k.clone(), noise.flipped.clone()
    singles = torch.cat([noise(x[i : i + 1], y[i : i + 1], ids[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched[:4], singles, rtol=0, atol=1e-12)
    assert kept_prediction(model, x, batched)
    assert flipped.any(), "a large budget should flip some draws"
    torch.testing.assert_close(batched[flipped], x[flipped])  # every draw flipped: clean image back
    assert (p[flipped] == 1).all()
    plain = UniformNoise(model, eps=0.4, seed=3, k=14, keep_prediction=False)
    x_plain = plain(x, y, ids)
    assert torch.equal(plain.flipped, ~kept_rows(model, x, x_plain))
    torch.testing.assert_close(plain.p_at_k, p_at_k(model, x, x_plain, y, 14))
    with pytest.raises(ValueError, match="draws"):
        UniformNoise(model, draws=0)
    with pytest.raises(ValueError, match="keep_prediction"):
        UniformNoise(model, draws=2, keep_prediction=False)


def test_paper_preset_threat_model(trained):
    model, x, y = trained
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.5)
    attack = paper_attack(model, mean, std, steps=6, k=14)
    assert attack.legacy and attack.eps == pytest.approx(6 * 5e-3) and attack.step == "l2"
    g = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    d = attack._direction(g, torch.full((2,), 5e-3, dtype=torch.float64))
    z_len = (d / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)).flatten(1).norm(dim=1)
    torch.testing.assert_close(z_len, torch.full((2,), 5e-3, dtype=torch.float64))
    x_adv = attack(x, y)
    bound = attack.eps * torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    assert ((x_adv - x).abs() <= bound + 1e-12).all()
    assert kept_prediction(model, x, x_adv)
    assert p_at_k_unclipped(model, x, x_adv, y, 14).mean() < 1.0
    best = paper_attack(model, mean, std, steps=6, k=14, first_flip=False)
    best(x, y)
    assert (best.p_at_k <= p_at_k_unclipped(model, x, x_adv, y, 14)).all()


def test_legacy_rejects_restarts_and_warm_start(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match="restarts"):
        ERAttack(model, legacy=True, restarts=2)
    with pytest.raises(ValueError, match="restarts"):
        ERAttack(model, restarts=0)
    with pytest.raises(ValueError, match="x_init"):
        ERAttack(model, legacy=True, k=14)(x, y, x_init=x)
    with pytest.raises(ValueError, match="step_size"):
        ERAttack(model, step_size=0.0)
