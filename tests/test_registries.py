"""A new objective, attack or explanation method is one registration: registered here (as user
code would), each gets the project's checks and works by name where the built-in ones do."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from explanations.attacks import ATTACKS, register_attack
from explanations.evaluation import EvaluationProtocol, iter_batches
from explanations.explainers import METHODS, Explanation, explain, explain_with_logits, register_method
from explanations.objectives import OBJECTIVES, Objective, ObjectiveOutput, build_objective, register_objective
from explanations.ranking_metrics import precision_at_k
from explanations.saliency import input_gradient, num_features, resolve_k, saliency_from_gradient
from lightning_modules.classifier import RobustClassifier, check_precision, check_sync_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = dict(backbone="resnet9", backbone_kwargs={"width": 4}, num_classes=3, activation="softplus", k=16)


@pytest.fixture
def registries():
    """Restore the three registries after the test (the registrations here are the test's own)."""
    saved = [(r, dict(r)) for r in (ATTACKS, OBJECTIVES, METHODS)]
    yield
    for registry, content in saved:
        registry.clear()
        registry.update(content)


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(beta=3.0), nn.Flatten(), nn.Linear(4 * 64, 3)).eval()


def test_a_registered_objective_gets_the_classifier_checks(registries):
    @register_objective("toy_input_l1")
    class ToyInputL1(Objective):
        """CE + alpha * mean |g(x)|_1 (double backprop)."""

        double_backprop = True

        def __init__(self, alpha: float = 1.0, target: str = "loss") -> None:
            self.alpha, self.target = alpha, target

        def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> ObjectiveOutput:
            out = input_gradient(model, x.detach().requires_grad_(True), y, self.target, create_graph=True)
            ce = F.cross_entropy(out.logits, y)
            loss = ce + self.alpha * out.grad.abs().flatten(1).sum(1).mean()
            return ObjectiveOutput(loss, out.logits, {"ce": ce.detach(), "loss": loss.detach()})

    entry = OBJECTIVES["toy_input_l1"]
    assert entry.options == ("alpha",) and entry.double_backprop and not entry.uses_k  # read from the class
    module = RobustClassifier(**TINY, objective="toy_input_l1", objective_kwargs={"alpha": 0.5})
    assert module.objective.alpha == 0.5
    with pytest.raises(ValueError, match=r"\['alpah'\] not known for objective='toy_input_l1'; valid objective_kwargs for 'toy_input_l1': \['alpha'\]"):
        RobustClassifier(**TINY, objective="toy_input_l1", objective_kwargs={"alpah": 0.5})
    with pytest.raises(ValueError, match="compile=True"):
        RobustClassifier(**TINY, objective="toy_input_l1", compile=True)
    with pytest.raises(RuntimeError, match=r"fp16\) cannot be used with model.objective='toy_input_l1'"):
        check_precision("toy_input_l1", "16-mixed")
    with pytest.raises(RuntimeError, match="SyncBatchNorm"):
        check_sync_batchnorm("toy_input_l1", True)
    with pytest.raises(ValueError, match=r"objective='nope' is not known; valid: \[.*'toy_input_l1'"):
        RobustClassifier(**TINY, objective="nope")

    # as a call, with a factory function: metadata given; a wrong double_backprop is refused
    register_objective("toy_plain", lambda **config: ToyInputL1(alpha=0.0), options=())
    with pytest.raises(ValueError, match=r"registered with double_backprop=False but builds ToyInputL1 with double_backprop=True"):
        build_objective("toy_plain")


def test_a_registered_attack_works_by_name_in_the_evaluation_protocol(registries):
    @register_attack
    class CornerShift:
        """Adds +eps to every pixel (clipped): a toy attack without steps; P@k measured like the others."""

        name = "toy_shift"

        def __init__(self, model: nn.Module, eps: float = 8 / 255, k: int | float = 0.1, method: str = "gradient",
                     method_kwargs: dict | None = None, target: str = "loss", pool: int | None = None,
                     sign: float = 1.0) -> None:
            self.model, self.eps, self.k, self.sign = model, eps, k, sign
            self.method, self.method_kwargs, self.target, self.pool = method, method_kwargs or {}, target, pool

        def __call__(self, images: Tensor, labels: Tensor | None = None, ids: Tensor | None = None) -> Tensor:
            x_adv = (images + self.sign * self.eps).clamp(0, 1)
            k = resolve_k(self.k, num_features(*images.shape[-2:], self.pool))
            s0 = explain(self.model, images, labels, self.method, self.target, self.pool, **self.method_kwargs)
            out = explain_with_logits(self.model, x_adv, labels, self.method, self.target, self.pool, **self.method_kwargs)
            self.p_at_k = precision_at_k(s0, out.saliency, k)
            self.clean_logits = self.model(images).detach()
            self.flipped = out.logits.argmax(1) != self.clean_logits.argmax(1)
            self.steps_taken = torch.zeros_like(self.flipped, dtype=torch.long)
            return x_adv

    assert CornerShift.options == {"eps", "k", "method", "method_kwargs", "target", "pool", "sign"}
    net = tiny_net()
    x, y, ids = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0]), torch.arange(4)
    protocol = EvaluationProtocol(eps=[4 / 255], attacks=["toy_shift", {"name": "down", "attack": "toy_shift", "kwargs": {"sign": -1.0}}],
                                  k=6, steps=3, noise=False, thickness=False)  # steps: not a toy_shift option, not passed
    values = protocol.evaluate(net, iter_batches(x, y, ids, 4)).values
    shifted = (x + 4 / 255).clamp(0, 1)
    expected = precision_at_k(explain(net, x, y), explain(net, shifted, y), 6)
    torch.testing.assert_close(values["p_at_k/toy_shift/gradient/eps_4"], expected)
    assert "p_at_k/down/gradient/eps_4" in values and "p_at_k/worst/gradient/eps_4" in values
    with pytest.raises(TypeError, match=r"attack entry 'toy_shift' \('toy_shift', CornerShift\) does not take \['steps'\]"):
        EvaluationProtocol(attacks=[{"name": "toy_shift", "kwargs": {"steps": 2}}], noise=False)
    with pytest.raises(TypeError, match=r"attack_kwargs \['restarts'\] are taken by no attack of the ensemble \(toy_shift\)"):
        EvaluationProtocol(attacks=["toy_shift"], noise=False, attack_kwargs={"restarts": 2})


def test_a_registered_method_is_explained_checked_and_evaluated(registries):
    @register_method("toy_grad_squared")
    def grad_squared(model, x, labels, target, pool, create_graph, classes, power: float = 2.0) -> Explanation:
        """a(x) = |g(x)| ** power."""
        x = x if x.requires_grad else x.detach().requires_grad_(True)
        out = input_gradient(model, x, labels, target, create_graph, classes)
        return Explanation(saliency_from_gradient(out.grad.abs() ** power, pool), out.logits)

    assert METHODS["toy_grad_squared"].options == ("power",)
    net = tiny_net()
    x, y = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2])
    g = input_gradient(net, x.requires_grad_(True), y).grad
    torch.testing.assert_close(explain(net, x.detach(), y, "toy_grad_squared", power=3.0), (g.abs() ** 3).sum(1).flatten(1))
    with pytest.raises(ValueError, match=r"method='toy_grad_squared' does not take \['pwr'\]; its options are \['power'\]"):
        explain(net, x.detach(), y, "toy_grad_squared", pwr=3.0)
    protocol = EvaluationProtocol(eps=[4 / 255], attacks=["er"], methods=["toy_grad_squared"], k=6, steps=1,
                                  thickness=False, method_kwargs={"toy_grad_squared": {"power": 1.0}})
    values = protocol.evaluate(net, [(x.detach(), y, torch.arange(3))]).values
    assert values["p_at_k/er/toy_grad_squared/eps_4"].shape == (3,)
    with pytest.raises(TypeError, match="must take"):
        register_method("toy_bad")(lambda model, x: None)
