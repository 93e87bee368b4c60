"""The evaluation protocol: worst case over the ensemble and over smaller budgets, on a trained model."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explanations.evaluation import EvaluationProtocol, eps_label, iter_batches, parse_attacks
from explanations.ranking_metrics import precision_at_k
from explanations.report import build_report, write_report_files

EPS = [1 / 255, 2 / 255, 4 / 255, 8 / 255]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained():
    """A width-8 ReLU net trained for 60 steps on 12 px images with a class-coloured square."""
    torch.manual_seed(0)
    n = 48
    y = torch.arange(n) % 3
    x = torch.rand(n, 3, 12, 12) * 0.5
    for c in range(3):
        x[y == c, c, 3 * c : 3 * c + 5, 2:7] += 0.5
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 36, 3))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    acc = (net(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9
    return net, x[:12].clamp(0, 1), y[:12], torch.arange(12) * 7  # dataset-like ids


def test_worst_case_never_rises_with_eps_and_is_below_every_attack_and_noise(trained):
    net, x, y, ids = trained
    protocol = EvaluationProtocol(eps=EPS, k=20, steps=4, thickness_samples=1, thickness_points=2)
    result = protocol.evaluate(net, iter_batches(x, y, ids, 5))
    v = result.values
    names = [s.name for s in protocol.prepare(net, x[:1])[0]]
    assert names == ["er", "er_surrogate", "mse", "noise"]  # ReLU net: the auto surrogate is kept
    prev = None
    for e in EPS:
        tag = f"eps_{e * 255:.3g}"
        worst = v[f"p_at_k/worst/gradient/{tag}"]
        assert worst.shape == (12,)
        for name in names:  # per image, at every eps: worst <= each attack and the noise baseline
            assert (worst <= v[f"p_at_k/{name}/gradient/{tag}"]).all(), (name, e)
        if prev is not None:  # per image: never above the worst case at a smaller eps
            assert (worst <= prev).all(), e
        prev = worst
        # the worst case is the minimum over attacks and smaller budgets, exactly
        smaller = [f"eps_{s * 255:.3g}" for s in EPS if s <= e]
        stack = torch.stack([v[f"p_at_k/{n}/gradient/{t}"] for n in names for t in smaller])
        assert torch.equal(worst, stack.min(0).values)
    assert v["p_at_k/worst/gradient/eps_8"].mean() < v["p_at_k/noise/gradient/eps_8"].mean()  # attacks do beat noise
    assert (v["flip_rate/er/gradient/eps_8"] == 0).all()
    assert torch.equal(result.ids, ids)


def test_results_do_not_depend_on_batching(trained):
    net, x, y, ids = trained
    protocol = EvaluationProtocol(eps=[2 / 255, 8 / 255], k=20, steps=2, attack_kwargs={"random_start": True},
                                  thickness_samples=1, thickness_points=2)
    a = protocol.evaluate(net, iter_batches(x, y, ids, 12)).values
    b = protocol.evaluate(net, iter_batches(x, y, ids, 5)).values
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, equal_nan=True, msg=key)


def test_summary_json_contract_and_report_files(trained, tmp_path):
    net, x, y, ids = trained
    protocol = EvaluationProtocol(eps=[0.5 / 255, 3 / 255], attacks=["er", "mse"], k=0.1, steps=1,
                                  thickness_samples=1, thickness_points=2)
    result = protocol.evaluate(net, iter_batches(x, y, ids, 6), keep_images=3)
    report = build_report(protocol, result.means(), result.num_images, result.notes)
    assert report["num_images"] == 12 and report["k"] == 14  # 10 % of 144 features, as a count
    assert report["accuracy"] == pytest.approx(float((net(x).argmax(1) == y).float().mean()))
    assert list(report["p_at_k"]) == ["worst", "er", "mse", "noise"]
    assert all(list(row) == ["0.5/255", "3/255"] for row in report["p_at_k"].values())
    assert set(report["thickness"]) == {"all_pairs", "boundary"}
    assert report["p_at_k"]["er"]["3/255"] == result.means()["p_at_k/er/gradient/eps_3"]
    paths = write_report_files(report, tmp_path, result.images)
    assert json.loads((tmp_path / "robustness_report.json").read_text())["num_images"] == 12
    assert {p.name for p in paths} >= {"p_at_k_vs_eps.png", "thickness.png", "saliency_gradient.png"}
    assert len(result.images["gradient"]["source"]) == 3


def test_settings_are_refused_with_the_value_and_the_choices():
    assert eps_label(8 / 255) == "8/255" and eps_label(0.5 / 255) == "0.5/255"
    with pytest.raises(ValueError, match=r"attack 'pgd' \(entry 'pgd'\) is not known; valid: \['er', 'mse', 'noise'\]"):
        parse_attacks(["pgd"])
    with pytest.raises(ValueError, match="reserved"):
        parse_attacks([{"name": "worst", "attack": "er"}])
    with pytest.raises(TypeError, match="steps"):
        EvaluationProtocol(attacks=[{"name": "noise", "kwargs": {"steps": 2}}], k=10).prepare(
            nn.Sequential(nn.Flatten(), nn.Linear(3 * 144, 3)), torch.rand(1, 3, 12, 12))
    with pytest.raises(ValueError, match="lists a budget twice"):
        EvaluationProtocol(eps=[2 / 255, 2 / 255])
    with pytest.raises(ValueError, match=r"k=200 is out of range for 144 features"):
        EvaluationProtocol(k=200).check_data(12, 12)
    with pytest.raises(ValueError, match="pool=5 does not divide"):
        EvaluationProtocol(pool=5).check_data(12, 12)
    assert [s.name for s in parse_attacks(["er"], noise=False)] == ["er"]
    assert [s.name for s in parse_attacks(None)] == ["er", "er_surrogate", "mse", "noise"]


def test_explicit_surrogate_on_a_smooth_model_is_an_error_naming_it():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(), nn.Flatten(), nn.Linear(4 * 144, 3))
    protocol = EvaluationProtocol(attacks=[{"name": "er_sp", "attack": "er", "kwargs": {"surrogate_beta": 10.0}}], k=10)
    with pytest.raises(ValueError, match="Sequential"):
        protocol.prepare(net, torch.rand(1, 3, 12, 12))


def test_an_evaluation_traces_the_model_once_not_per_batch_budget_and_member(trained, monkeypatch):
    import explanations.activations as activations

    net, x, y, ids = trained
    traced = []
    original = activations._trace
    monkeypatch.setattr(activations, "_trace", lambda model, example: traced.append(1) or original(model, example))
    protocol = EvaluationProtocol(eps=[2 / 255, 8 / 255], k=10, steps=1, thickness=False)  # er_surrogate: auto
    protocol.evaluate(net, iter_batches(x, y, ids, 4))  # 3 batches x 2 budgets x (er_surrogate, its auto check)
    assert "er_surrogate" in protocol.names and len(traced) == 1, traced  # one trace for the whole evaluation


def test_an_evaluation_explains_each_attacked_image_once(trained, monkeypatch):
    """The attacks hand back their scoring pass at the returned images: the protocol adds one clean
    explanation per batch and method, not one per attack and budget (and the numbers are those of
    explaining every attacked image again)."""
    import explanations.evaluation as evaluation

    net, x, y, ids = trained
    protocol = EvaluationProtocol(eps=[2 / 255, 8 / 255], k=10, steps=2, thickness=False)
    calls = []
    original = evaluation.explain_unchecked
    monkeypatch.setattr(evaluation, "explain_unchecked", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    result = protocol.evaluate(net, iter_batches(x, y, ids, 6))
    assert len(calls) == 2  # 2 batches x 1 method: the clean pass only
    for spec in protocol.prepare(net, x[:1])[0]:
        attack = protocol._build(spec, net, "gradient", 8 / 255)
        x_adv = attack(x, y, ids=ids)
        s0, s_adv = original(net, x, y, "gradient", "loss", None).saliency, original(net, x_adv, y, "gradient", "loss", None).saliency
        torch.testing.assert_close(result.values[f"p_at_k/{spec.name}/gradient/eps_8"], precision_at_k(s0, s_adv, 10).float())
