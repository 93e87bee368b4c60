"""ReLU-type -> Softplus handling (explanations/activations.py): modules and functional calls alike."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explanations.activations import (
    DEFAULT_SURROGATE_BETA,
    SoftplusMode,
    resolve_surrogate,
    swap_activations,
    trace_activations,
)

BETA = 3.0


class FunctionalNet(nn.Module):
    """A small CIFAR-style net that calls F.relu / relu_ in forward (no activation modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        h = self.conv2(h).relu_()
        h = torch.relu(h + 0.1)
        return self.fc(h.mean((2, 3)))


class ModuleNet(nn.Module):
    """The same computation with nn.ReLU modules."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.act2 = nn.ReLU(inplace=True)
        self.act3 = nn.ReLU()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = self.act1(self.conv1(x))
        h = self.act2(self.conv2(h))
        h = self.act3(h + 0.1)
        return self.fc(h.mean((2, 3)))


class GeluNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.GELU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def _pair():
    torch.manual_seed(0)
    functional = FunctionalNet()
    modular = ModuleNet()
    modular.load_state_dict(functional.state_dict())
    return functional, modular


@pytest.mark.parametrize(
    "call",
    [
        lambda x: F.relu(x),
        lambda x: torch.relu(x),
        lambda x: x.relu(),
        lambda x: nn.ReLU()(x),
        lambda x: F.relu(x.clone(), inplace=True),
        lambda x: F.relu(x.clone(), True),
        lambda x: x.clone().relu_(),
        lambda x: torch.relu_(x.clone()),
        lambda x: nn.ReLU(inplace=True)(x.clone()),
        lambda x: F.relu6(x),
        lambda x: nn.ReLU6()(x),
        lambda x: F.leaky_relu(x, 0.1),
        lambda x: nn.LeakyReLU(0.2)(x),
        lambda x: F.elu(x),
    ],
)
def test_softplus_mode_replaces_every_relu_type_call(call):
    x = torch.linspace(-3, 3, 13, dtype=torch.float64, requires_grad=True)
    with SoftplusMode(BETA) as mode:
        y = call(x)
    assert mode.calls == 1
    torch.testing.assert_close(y, F.softplus(x, beta=BETA))
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, torch.sigmoid(BETA * x.detach()))


def test_softplus_mode_leaves_other_calls_alone():
    x = torch.linspace(-3, 3, 13)
    with SoftplusMode(BETA) as mode:
        torch.testing.assert_close(F.hardtanh(x), x.clamp(-1, 1))  # not ReLU6
        torch.testing.assert_close(F.gelu(x), torch.nn.functional.gelu(x))
        torch.testing.assert_close(x.clamp_min(0), x.clamp(min=0))
    assert mode.calls == 0
    torch.testing.assert_close(F.relu(x), x.clamp(min=0))  # outside: a ReLU again


def test_functional_and_module_relu_give_the_same_surrogate_output_and_gradient():
    functional, modular = _pair()
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    outs, grads = [], []
    for model in (functional, modular):
        with SoftplusMode(BETA):
            out = model(x)
        (g,) = torch.autograd.grad(out[:, 0].sum(), x)
        outs.append(out.detach())
        grads.append(g)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    # and it really is a smooth surrogate: the plain models differ from it
    assert not torch.allclose(functional(x), outs[0])


def test_trace_names_calls_by_module_and_classifies_models():
    functional, modular = _pair()
    x = torch.rand(1, 3, 8, 8)
    t_f = trace_activations(functional, x)
    assert t_f.relu == ["<root> (relu)", "<root> (relu_)"]  # F.relu and torch.relu share a name
    assert t_f.piecewise_linear and t_f.smooth == []
    t_m = trace_activations(modular, x)
    assert t_m.relu == ["act1 (relu)", "act2 (relu)", "act3 (relu)"]
    t_g = trace_activations(GeluNet(), x)
    assert t_g.relu == [] and t_g.smooth == ["act (gelu)"] and not t_g.piecewise_linear
    # the trace runs in eval mode and restores the flags
    modular.train()
    trace_activations(modular, x)
    assert all(m.training for m in modular.modules())


def test_swap_activations_functional_model_is_persistent_and_keeps_the_state_dict():
    functional, modular = _pair()
    keys = list(functional.state_dict())
    x = torch.rand(3, 3, 8, 8)
    with SoftplusMode(BETA):
        expected = modular(x)
    report = swap_activations(functional, BETA, example=x)
    assert report["hooked"] and report["modules"] == [] and len(report["functional"]) == 2
    assert list(functional.state_dict()) == keys
    torch.testing.assert_close(functional(x), expected, rtol=0, atol=0)
    assert trace_activations(functional, x).relu == []
    clone = copy.deepcopy(functional)
    torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)
    # outside the model's forward, ReLU is ReLU again (the mode is scoped to the forward)
    assert F.relu(torch.tensor(-1.0)).item() == 0.0


def test_swap_activations_module_model_replaces_modules_and_function_attributes():
    shared = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), shared, nn.Conv2d(4, 4, 3), shared, nn.Flatten())
    model.act_fn = F.relu  # a function attribute (timm style); never called here
    report = swap_activations(model, BETA, example=torch.rand(1, 3, 8, 8))
    assert report["modules"] == ["1 (ReLU)", "3 (ReLU)"] and not report["hooked"]
    assert report["attributes"] == ["<root>.act_fn (relu)"]
    assert model[1] is model[3] and isinstance(model[1], nn.Softplus) and model[1].beta == BETA
    torch.testing.assert_close(model.act_fn(torch.zeros(1)), F.softplus(torch.zeros(1), beta=BETA))


def test_swap_on_a_model_without_relu_is_refused_by_name():
    with pytest.raises(ValueError, match=r"no effect on GeluNet.*gelu"):
        swap_activations(GeluNet(), BETA, example=torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="softplus_beta=-1"):
        swap_activations(ModuleNet(), -1)


def test_forward_error_does_not_leave_the_mode_active():
    functional, _ = _pair()
    swap_activations(functional, BETA, example=torch.rand(1, 3, 8, 8))
    with pytest.raises(RuntimeError):
        functional(torch.rand(1, 5, 8, 8))  # wrong channel count
    assert F.relu(torch.tensor(-1.0)).item() == 0.0


def test_resolve_surrogate():
    x = torch.rand(1, 3, 8, 8)
    functional, modular = _pair()
    assert resolve_surrogate(functional, "auto", x) == DEFAULT_SURROGATE_BETA
    assert resolve_surrogate(modular, 5.0, x) == 5.0
    assert resolve_surrogate(GeluNet(), "auto", x) is None
    assert resolve_surrogate(functional, None, x) is None
    with pytest.raises(ValueError, match=r"surrogate_beta=10.0 has no effect on GeluNet"):
        resolve_surrogate(GeluNet(), 10.0, x)
    with pytest.raises(ValueError, match=r"surrogate_beta='on' is not valid"):
        resolve_surrogate(functional, "on", x)
