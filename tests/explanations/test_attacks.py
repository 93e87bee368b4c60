import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explanations import OBJECTIVES, build_objective
from explanations.attacks import ATTACKS, ERAttack, MSEAttack, build_attack
from explanations.pgd import uniform_in_ball
from explanations.regularizers import block_gap
from explanations.explainers import explain, explain_with_logits
from explanations.ranking_metrics import precision_at_k
from explanations.saliency import ranking


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def quadrant_data(n: int, g: torch.Generator):
    """12 px images; the class is the quadrant holding a brighter square."""
    x = torch.rand(n, 3, 12, 12, generator=g) * 0.6
    y = torch.randint(0, 4, (n,), generator=g)
    for q in range(4):
        r, c = divmod(q, 2)
        x[y == q, :, r * 6 + 1 : r * 6 + 5, c * 6 + 1 : c * 6 + 5] += 0.3
    return x.clamp(0, 1), y


def conv_net(ch: int = 16, beta: float = 10.0) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, ch, 3, padding=1), nn.Softplus(beta=beta),
        nn.Conv2d(ch, ch, 3, padding=1, stride=2), nn.Softplus(beta=beta),
        nn.Flatten(), nn.Linear(ch * 36, 4),
    )


@pytest.fixture(scope="module")
def trained(threads):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = quadrant_data(512, g)
    model = conv_net()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    with threads(1):
        for _ in range(60):
            i = torch.randint(0, 512, (64,), generator=g)
            loss = F.cross_entropy(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    xt, yt = quadrant_data(32, g)
    return model, xt, yt


def small_double_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus(beta=3.0), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    ).double()


def double_data(b: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (b,), generator=g)


def check_constraints(model, x, x_adv, eps):
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    training = model.training
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x_adv).argmax(1), model(x).argmax(1))
    model.train(training)


def test_er_attack_beats_noise_of_the_same_budget(trained):
    model, x, y = trained
    eps, k = 8 / 255, 8
    model.eval()
    s0 = explain(model, x, y)
    attack = ERAttack(model, eps=eps, steps=20, k=k)
    x_adv = attack(x, y)
    check_constraints(model, x, x_adv, eps)
    p_er = precision_at_k(s0, explain(model, x_adv, y), k).mean().item()
    p_noise = precision_at_k(s0, explain(model, uniform_in_ball(x, eps, None, seed=0), y), k).mean().item()
    assert p_noise > 0.9
    assert p_er < p_noise - 0.15, (p_er, p_noise)
    # the MSE attack moves the saliency more than noise does, too
    x_mse = MSEAttack(model, eps=eps, steps=10, k=k)(x, y)
    check_constraints(model, x, x_mse, eps)
    d_mse = (explain(model, x_mse, y) - s0).norm(dim=1).mean()
    d_noise = (explain(model, uniform_in_ball(x, eps, None, seed=0), y) - s0).norm(dim=1).mean()
    assert d_mse > 2 * d_noise


#: Settings offered to every registered attack (each takes those among its ``options``).
SHARED = dict(eps=16 / 255, steps=4, k=10)


@pytest.mark.parametrize(
    "name, kwargs",
    [(name, {}) for name in ATTACKS]  # every registered attack with its defaults
    + [
        ("er", dict(step="l2", pair_set="all", random_start=True)),
        ("er", dict(pair_set="minmax", method="smoothgrad", method_kwargs={"num_samples": 2})),
        ("er", dict(target="logit", method="integrated_gradients", method_kwargs={"steps": 3})),
        ("mse", dict(random_start=False, method="grad_x_input")),
        ("noise", dict(draws=3, target="logit")),
    ],
)
def test_batched_equals_per_sample_loop(name, kwargs):
    model = small_double_model()
    x, y = double_data(6)
    ids = torch.arange(100, 106)
    attack = build_attack(name, model, SHARED, **kwargs)
    batched = attack(x, y, ids=ids)
    flipped, taken = attack.flipped.clone(), attack.steps_taken.clone()
    singles, single_taken = [], []
    for i in range(6):
        singles.append(attack(x[i : i + 1], y[i : i + 1], ids=ids[i : i + 1]))
        single_taken.append(attack.steps_taken)
    torch.testing.assert_close(batched, torch.cat(singles), rtol=0, atol=1e-12)
    assert torch.equal(taken, torch.cat(single_taken))
    assert flipped.dtype == torch.bool


@pytest.mark.parametrize("name", list(ATTACKS))
def test_every_registered_attack_keeps_the_contract(trained, name):
    """In the ball and in [0, 1], every prediction kept, the model's mode and parameter gradients
    untouched, and ``p_at_k`` / ``flipped`` / ``steps_taken`` / ``clean_logits`` as measured."""
    model, x, y = trained
    model.eval()
    eps, k = 8 / 255, 8
    attack = build_attack(name, model, dict(eps=eps, steps=3, k=k))
    x_adv = attack(x, y, torch.arange(x.shape[0]))
    check_constraints(model, x, x_adv, eps)
    assert all(p.grad is None for p in model.parameters()) and not model.training
    torch.testing.assert_close(attack.p_at_k.float(), precision_at_k(explain(model, x, y), explain(model, x_adv, y), k))
    assert attack.flipped.shape == (x.shape[0],) and attack.flipped.dtype == torch.bool
    assert attack.steps_taken.shape == (x.shape[0],)
    if "steps" not in type(attack).options:  # not an optimiser (the noise baseline): no steps
        assert (attack.steps_taken == 0).all()
    torch.testing.assert_close(attack.clean_logits, model(x).detach())
    # the scoring pass at the returned images, kept for the caller: what explaining them again gives
    again = explain_with_logits(model, x_adv, y)
    torch.testing.assert_close(attack.explanation.saliency, again.saliency, rtol=0, atol=0)
    torch.testing.assert_close(attack.explanation.logits, again.logits, rtol=0, atol=0)
    assert not attack.explanation.saliency.requires_grad


def test_an_attack_given_an_option_it_does_not_take_is_refused_naming_its_options():
    model = small_double_model()
    with pytest.raises(TypeError, match=r"attack 'noise' \(UniformNoise\) does not take \['steps'\]; its options: .*'draws'"):
        build_attack("noise", model, steps=3)
    with pytest.raises(TypeError, match=r"attack 'er' \(ERAttack\) does not take \['stepz'\]"):
        build_attack("er", model, stepz=3)
    noise = build_attack("noise", model, dict(eps=2 / 255, steps=3, pair_set="all"))  # shared: takes only eps
    assert noise.eps == pytest.approx(2 / 255)


def test_legacy_prediction_flip_keeps_last_unflipped_iterate():
    model = small_double_model(seed=3)
    x, y = double_data(16, seed=4)
    eps = 0.5
    attack = ERAttack(model, eps=eps, steps=6, step_size=0.1, k=8, legacy=True)
    x_adv = attack(x, y)
    check_constraints(model, x, x_adv, eps)
    assert attack.flipped.any(), "the setting should make some samples flip"
    assert (attack.steps_taken[attack.flipped] < 6).all()
    assert (attack.steps_taken[~attack.flipped] == 6).all()
    for i in attack.flipped.nonzero().flatten().tolist():
        short = ERAttack(model, eps=eps, steps=int(attack.steps_taken[i]), step_size=0.1, k=8, legacy=True)
        torch.testing.assert_close(short(x[i : i + 1], y[i : i + 1]), x_adv[i : i + 1], rtol=0, atol=1e-12)


def test_mode_restored_and_parameter_grads_untouched():
    model = small_double_model().train()
    model[1].eval()
    x, y = double_data()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    running = model[1].running_mean.clone()
    for name in ATTACKS:
        build_attack(name, model, dict(eps=4 / 255, steps=2, k=5))(x, y)
    assert model.training and model[0].training and not model[1].training
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert torch.equal(model[1].running_mean, running)


def test_surrogate_gives_relu_networks_a_logit_attack():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 64, 3),
    ).double()
    x, y = double_data(8)
    plain = ERAttack(model, eps=8 / 255, steps=5, k=8, target="logit", surrogate_beta=None)(x, y)
    torch.testing.assert_close(plain, x)  # the input Hessian of a ReLU net is zero
    attack = ERAttack(model, eps=8 / 255, steps=5, k=8, target="logit", surrogate_beta=5.0)
    x_adv = attack(x, y)
    check_constraints(model, x, x_adv, 8 / 255)
    s0 = explain(model, x, None, target="logit")
    assert precision_at_k(s0, explain(model, x_adv, None, target="logit"), 8).mean() < 1.0
    assert all(isinstance(m, nn.ReLU) for m in model if isinstance(m, (nn.ReLU, nn.Softplus)))


def test_block_gap_and_errors():
    s = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    order = ranking(s)
    assert block_gap(s, order, 2).item() == (5 + 4) - (3 + 2)
    assert block_gap(s, order, 2, "all").item() == pytest.approx(4.5 - 2.0)
    assert block_gap(s, order, 2, "minmax", m=1).item() == 4 - 3
    model = small_double_model()
    with pytest.raises(ValueError, match="step="):
        ERAttack(model, step="linf")
    with pytest.raises(ValueError, match="not known"):
        build_attack("pgd", model)
    with pytest.raises(ValueError, match="needs labels"):
        ERAttack(model)(double_data()[0])


# ---------------------------------------------------------------- AT objective
def test_at_objective_is_registered_and_trains():
    assert "at" in OBJECTIVES
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus(beta=3.0), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    ).train()
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 3, (6,))
    # shared keys plus objective_kwargs; unknown keys are ignored
    objective = build_objective(
        "at", k=10, pair_set="boundary", h=1e-3, adaptive=True, weight=1.0, target="loss", pool=None,
        eps=8 / 255, steps=2, clean_weight=0.5, something_else=3,
    )
    assert objective.double_backprop
    calls = []
    model[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    running = model[1].running_mean.clone()
    out = objective(model, x, y)
    assert model.training and model[1].training
    assert all(p.grad is None for p in model.parameters())
    assert set(out.terms) == {"ce", "ce_adv", "loss", "attack_flipped", "attack_l2", "attack_linf"}
    assert out.logits.shape == (6, 3) and torch.isfinite(out.loss)
    assert calls[-1] == 12  # clean and attacked images share one forward
    assert not torch.equal(model[1].running_mean, running)  # only that train-mode forward moved BN
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    expected = out.terms["ce_adv"] + 0.5 * out.terms["ce"]
    torch.testing.assert_close(out.terms["loss"], expected)


def test_at_without_clean_term_uses_the_attack_clean_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    x, y = torch.rand(5, 3, 8, 8), torch.randint(0, 3, (5,))
    objective = build_objective("at", k=0.2, steps=1)
    out = objective(model, x, y)
    torch.testing.assert_close(out.logits, model(x).detach())
    torch.testing.assert_close(out.loss.detach(), out.terms["ce_adv"])
    with pytest.raises(ValueError, match="clean_weight"):
        build_objective("at", clean_weight=-1)


def test_at_objective_in_the_lightning_module():
    classifier = pytest.importorskip("lightning_modules.classifier")
    module = classifier.RobustClassifier(
        backbone="resnet9", backbone_kwargs={"width": 2}, num_classes=3, activation="softplus",
        softplus_beta=2.0, objective="at", k=8, objective_kwargs={"eps": 4 / 255, "steps": 2, "clean_weight": 1.0},
    ).train()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    with warnings.catch_warnings():  # self.log without a Trainer
        warnings.simplefilter("ignore")
        loss = module.training_step((x, y), 0)
    assert torch.isfinite(loss) and module.model.training
    loss.backward()
    assert all(p.grad is not None for p in module.model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- step lengths
def _one_step(step: str, step_size: float):
    """x_adv - x of one fixed step from mid-grey images (the [0, 1] box and the eps box never bind)."""
    model = small_double_model()
    x = 0.5 + 0.01 * double_data(4)[0]
    y = model(x).argmax(1)  # any labels: one step of this size keeps the prediction here
    attack = ERAttack(model, eps=1.0, steps=1, step_size=step_size, step=step, k=10, legacy=True)
    x_adv = attack(x, y)
    assert not attack.flipped.any()
    return (x_adv - x).flatten(1)


def test_an_l2_step_has_l2_length_step_size_and_a_sign_step_linf_length_step_size():
    d = 3 * 8 * 8
    delta = _one_step("l2", 0.05)
    torch.testing.assert_close(delta.norm(dim=1), torch.full((4,), 0.05, dtype=delta.dtype))
    assert (delta.abs().amax(dim=1) < 0.05).all()  # l_inf <= l2, strictly for a spread gradient
    delta = _one_step("sign", 0.01)  # unchanged: l_inf = step_size, l2 = step_size * sqrt(d)
    torch.testing.assert_close(delta.abs().amax(dim=1), torch.full((4,), 0.01, dtype=delta.dtype))
    torch.testing.assert_close(delta.norm(dim=1), torch.full((4,), 0.01 * d ** 0.5, dtype=delta.dtype))


def test_an_l2_step_without_step_size_travels_like_the_signed_step():
    """The defaults of the l2 step are the Euclidean length of the signed step they replace."""
    d = 3 * 8 * 8
    model = small_double_model()
    attack = ERAttack(model, eps=0.02, steps=4, step="l2", k=10, legacy=True)
    assert attack._initial_step(d) == pytest.approx(2.5 * 0.02 / 4 * d ** 0.5)
    assert ERAttack(model, eps=0.02, steps=4, step="l2")._initial_step(d) == pytest.approx(2 * 0.02 * d ** 0.5)
    assert ERAttack(model, eps=0.02, steps=4)._initial_step(d) == pytest.approx(2 * 0.02)


def _normalized_model(std=(0.229, 0.224, 0.225)):
    from lightning_modules.backbones import NormalizedClassifier

    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(beta=5.0), nn.Flatten(), nn.Linear(4 * 64, 3))
    return NormalizedClassifier(body, mean=(0.485, 0.456, 0.406), std=std).double()


def _reference_at_step(step_size):
    """The AT objective with ``units: normalized``, one l2 step of ``step_size``, on a normalised
    model: (model, objective, attack, x, y, x_adv, kept, z) with z the kept perturbations in
    normalised units, flattened."""
    model = _normalized_model()
    x, y = double_data(6)
    x = 0.25 + 0.5 * x
    objective = build_objective("at", k=10, steps=1, step="l2", step_size=step_size, units="normalized")
    objective.check_model(model)
    attack = objective.attack_for(model)
    x_adv = attack(x, y)
    kept = ~attack.flipped
    z = ((x_adv - x) / model.normalize.std).flatten(1)[kept]
    return model, objective, attack, x, y, x_adv, kept, z


def test_at_at_the_reference_strength_steps_one_normalised_unit():
    """units: normalized, one l2 step of 1: the kept training perturbation is exactly one
    normalised unit long (l2 of (x_adv - x) / std), its pixel l2 between min(std) and max(std)."""
    model, objective, _, x, y, x_adv, kept, z = _reference_at_step(1.0)
    assert kept.sum() >= 4
    torch.testing.assert_close(z.norm(dim=1), torch.ones(int(kept.sum()), dtype=z.dtype))
    assert (z.abs().amax(dim=1) <= 1.0 + 1e-12).all()  # the box (1 unit) never binds a unit step
    pixel = (x_adv - x).flatten(1)[kept].norm(dim=1)
    assert ((pixel >= 0.224 - 1e-9) & (pixel <= 0.229 + 1e-9)).all()
    out = objective(model, x, y)  # the objective trains on that attack and logs its size
    assert out.terms["attack_l2"] <= 0.229 + 1e-9 and out.terms["attack_linf"] <= 0.229 + 1e-9


def test_at_normalized_units_refusals():
    with pytest.raises(ValueError, match=r"units='normalized'.*does not take \{'eps': 0.1\}"):
        build_objective("at", k=10, steps=1, step="l2", step_size=1.0, units="normalized", eps=0.1)
    with pytest.raises(ValueError, match=r"does not take \{'step': 'sign'\}"):
        build_objective("at", k=10, steps=1, step_size=1.0, units="normalized")
    with pytest.raises(ValueError, match=r"units='metric' is not known; valid: \('pixel', 'normalized'\)"):
        build_objective("at", k=10, units="metric")
    objective = build_objective("at", k=10, steps=1, step="l2", step_size=1.0, units="normalized")
    with pytest.raises(ValueError, match="needs a model with a `normalize` layer"):
        objective.check_model(small_double_model())


def test_a_long_reference_at_step_keeps_its_l2_length_under_a_one_pixel_box():
    """Steps longer than 1 / max(std) normalised units keep the box at 1 pixel; the step's l2
    length is still step_size normalised units (the box binds only on a pixel moved by > 1)."""
    model, _, attack, x, y, x_adv, kept, z = _reference_at_step(8.0)
    assert attack.eps == pytest.approx(1 / 0.229)  # the box, normalised units: 1 pixel for the widest std
    assert kept.any() and (z.abs().amax(dim=1) < attack.eps).all()
    torch.testing.assert_close(z.norm(dim=1), torch.full((int(kept.sum()),), 8.0, dtype=z.dtype))
    reference = build_objective("at", k=10, steps=1, step="l2", step_size=1.0, units="normalized")
    assert reference.attack_for(model).eps == pytest.approx(1.0)  # the reference's box: steps * step_size


def test_the_classifier_checks_its_model_against_the_objective_when_built(monkeypatch):
    """RobustClassifier calls ``objective.check_model(model)`` once it has its model, so a model the
    training attack cannot run on is refused before any step."""
    classifier = pytest.importorskip("lightning_modules.classifier")
    from explanations.adversarial_training import AdversarialTraining

    def refuse(self, model):
        raise ValueError(f"refused {type(model).__name__}")

    at = {"objective": "at", "k": 8, "objective_kwargs": {"steps": 1, "step": "l2", "step_size": 1.0, "units": "normalized"}}
    kwargs = dict(backbone="resnet9", backbone_kwargs={"width": 2}, num_classes=3, activation="softplus", **at)
    module = classifier.RobustClassifier(**kwargs)
    attack = module.objective.attack_for(module.model)  # the model's own std: the reference box of 1 unit
    assert isinstance(attack, ERAttack) and attack.eps == pytest.approx(1.0)
    monkeypatch.setattr(AdversarialTraining, "check_model", refuse)
    with pytest.raises(ValueError, match="refused NormalizedClassifier"):
        classifier.RobustClassifier(**kwargs)
