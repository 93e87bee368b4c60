import pytest
import torch
from torch import nn

from explanations.explainers import (
    METHODS,
    eval_mode,
    explain,
    explain_with_logits,
    seeded_normal,
    seeded_uniform,
)
from explanations.saliency import input_gradient, saliency


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def small_model(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 4, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.Softplus(beta=2.0), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)]
    return nn.Sequential(*layers).double()


def data(b: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (b,), generator=g)


KW = {"smoothgrad": {"num_samples": 3, "noise_std": 0.1}, "integrated_gradients": {"steps": 4}}


def test_gradient_and_grad_x_input_match_their_definitions():
    model = small_model()
    x, y = data()
    torch.testing.assert_close(explain(model, x, y, "gradient"), saliency(model, x, y))
    g = input_gradient(model, x, y).grad
    torch.testing.assert_close(explain(model, x, y, "grad_x_input"), (g * x).abs().sum(1).flatten(1))
    pooled = explain(model, x, y, "grad_x_input", pool=2)
    assert pooled.shape == (4, 9)


def test_smoothgrad_without_noise_is_the_gradient_and_seed_is_reproducible():
    model = small_model()
    x, y = data()
    plain = explain(model, x, y, "gradient")
    torch.testing.assert_close(explain(model, x, y, "smoothgrad", num_samples=2, noise_std=0.0), plain)
    a = explain(model, x, y, "smoothgrad", num_samples=4, noise_std=0.2, seed=3)
    b = explain(model, x, y, "smoothgrad", num_samples=4, noise_std=0.2, seed=3)
    c = explain(model, x, y, "smoothgrad", num_samples=4, noise_std=0.2, seed=4)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    gen = torch.Generator().manual_seed(3)
    torch.testing.assert_close(explain(model, x, y, "smoothgrad", num_samples=4, noise_std=0.2, generator=gen), a)


def test_smoothgrad_is_one_big_batch():
    calls = []

    class Spy(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            calls.append(x.shape[0])
            return self.inner(x)

    x, y = data(3)
    explain(Spy(small_model()), x, y, "smoothgrad", num_samples=5)
    assert sorted(calls) == [3, 15]
    calls.clear()
    explain(Spy(small_model()), x, y, "integrated_gradients", steps=7)
    assert calls == [21]


def test_integrated_gradients_special_cases():
    model = small_model()
    x, y = data()
    # one right-Riemann step from a zero baseline is gradient x input
    torch.testing.assert_close(
        explain(model, x, y, "integrated_gradients", steps=1), explain(model, x, y, "grad_x_input")
    )
    # a linear model: IG = (x - b) * W_c exactly, for any number of steps
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 5)).double()
    base = torch.full_like(x, 0.3)
    ig = explain(lin, x, None, "integrated_gradients", target="logit", steps=5, baseline=base)
    cls = lin(x).argmax(1)
    w = lin[1].weight[cls].view(-1, 3, 6, 6)
    torch.testing.assert_close(ig, ((x - base) * w).abs().sum(1).flatten(1))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("target", ["loss", "logit"])
def test_batched_equals_per_sample(method, target):
    model = small_model()
    x, y = data(5)
    kw = KW.get(method, {})
    batched = explain(model, x, y, method, target=target, **kw)
    single = torch.cat([explain(model, x[i : i + 1], y[i : i + 1], method, target=target, **kw) for i in range(5)])
    torch.testing.assert_close(batched, single)


@pytest.mark.parametrize("method", METHODS)
def test_create_graph_gives_the_saliency_gradient(method):
    model = small_model()
    x, y = data(2)
    kw = KW.get(method, {})
    xv = x.clone().requires_grad_(True)
    s = explain(model, xv, y, method, create_graph=True, **kw)
    weights = torch.rand(s.shape, generator=torch.Generator().manual_seed(5), dtype=s.dtype)
    (g,) = torch.autograd.grad((s * weights).sum(), xv)
    # directional finite difference
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=x.dtype)
    h = 1e-6
    f = lambda z: (explain(model, z, y, method, **kw) * weights).sum()  # noqa: E731
    numeric = (f(x + h * d) - f(x - h * d)) / (2 * h)
    torch.testing.assert_close((g * d).sum(), numeric, rtol=1e-4, atol=1e-8)


def test_logits_are_those_at_x_and_parameter_grads_untouched():
    model = small_model()
    x, y = data()
    for method in METHODS:
        out = explain_with_logits(model, x, y, method, **KW.get(method, {}))
        torch.testing.assert_close(out.logits.detach(), model(x).detach())
    assert all(p.grad is None for p in model.parameters())


def test_logit_target_explains_the_given_class():
    model = small_model()
    x, _ = data()
    classes = torch.tensor([0, 1, 2, 3])
    s = explain_with_logits(model, x, None, "gradient", target="logit", classes=classes).saliency
    xv = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xv).gather(1, classes[:, None]).sum(), xv)
    torch.testing.assert_close(s, g.abs().sum(1).flatten(1))


def test_errors_are_clear():
    model = small_model()
    x, y = data()
    with pytest.raises(ValueError, match="not a known explanation method"):
        explain(model, x, y, "lrp")
    with pytest.raises(ValueError, match="does not take"):
        explain(model, x, y, "gradient", num_samples=3)
    with pytest.raises(ValueError, match="needs labels"):
        explain(model, x, None, "smoothgrad")


def test_eval_mode_restores_each_flag():
    model = small_model(bn=True).train()
    model[1].eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and not model[1].training and model[0].training


def test_seeded_noise_is_keyed_by_sample_id():
    ids = torch.tensor([3, 10, 11, 400])
    u = seeded_uniform(ids, (3, 5, 5), seed=7)
    assert u.shape == (4, 3, 5, 5) and u.min() > 0 and u.max() < 1
    torch.testing.assert_close(seeded_uniform(ids[2:3], (3, 5, 5), seed=7), u[2:3])
    assert not torch.equal(u[1], u[2])
    assert not torch.equal(seeded_uniform(ids, (3, 5, 5), seed=8), u)
    assert not torch.equal(seeded_uniform(ids, (3, 5, 5), seed=7, stream=1), u)
    big = seeded_uniform(torch.arange(64), (32, 32), seed=0)
    assert abs(big.mean().item() - 0.5) < 0.01 and abs(big.var().item() - 1 / 12) < 0.005
    z = seeded_normal(torch.arange(64), (32, 32), seed=0)
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02
