"""Evaluation of one trained model with the project's evaluation protocol and PSE.

Nothing here re-implements the evaluation: attacks, the per-image worst case, the noise baseline
and thickness come from ``explanations.evaluation.EvaluationProtocol`` (the protocol the
``RankingRobustness`` callback and ``train.py validate -c configs/evaluate.yaml`` run, with the
same seeds and noise streams), the PSE analysis from ``explanations.pse`` with the protocol's
target draw (``pse_target_uniform``). This module picks the study's images and settings and
averages per-sample values.

Conventions:
- The model runs in eval mode; the explained scalar is the cross-entropy with the true label
  (``target='loss'``, what R2ET trains and ERAttack attacks), over all images of the subset
  (correct or not).
- Randomness is keyed by (seed, image id): the MSE attack's random start, the noise baseline and
  the thickness end points do not depend on batching, and every model sees the same noise.
- ReLU models (vanilla, WD): the input Hessian of a piecewise-linear network is zero almost
  everywhere, so a direct attack only gets gradient through the softmax. For the attacks listed in
  ``relu_surrogate`` such a model is attacked twice, directly and through a Softplus(beta) copy
  (``surrogate_beta``, DESIGN §5), and each image keeps the *worse* of the two results (lower P@k:
  the protocol's worst case). Both attacks are recorded. Softplus models are attacked directly only.
- Each mean comes with its standard error over images (std / sqrt(n)): the sampling noise of the
  evaluation subset, not the training noise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from explanations.attacks import PaperERAttack
from explanations.evaluation import WORST, EvaluationProtocol, eps_tag, iter_batches
from explanations.explainers import eval_mode, explain_unchecked, explain_with_logits
from explanations.ranking_metrics import precision_at_k
from explanations.pse import PSESettings, add_sums, analyze_batch, batch_sums, pse_target_uniform, summarize

from benchmarks.reproduce.data import ImageSet
from benchmarks.reproduce.presets import EvalConfig

PSE_KEYS = (
    "num_samples", "num_counted", "clean_acc", "attack_success_rate", "frac_suppression",
    "frac_balanced", "frac_promotion", "frac_ineffective", "mean_phi", "mean_S", "mean_P",
    "group/frac_suppression", "group/frac_balanced", "group/frac_promotion",
    "group/frac_ineffective", "cam_true/share_all", "cam_target/share_all",
    "units/frac_promoted", "units/frac_suppressed",
)


def mean_se(values: Tensor) -> dict[str, float]:
    """Mean and standard error of per-sample values (NaNs ignored), plus the count."""
    v = values.detach().double().flatten()
    v = v[~torch.isnan(v)]
    n = int(v.numel())
    if n == 0:
        return {"mean": float("nan"), "se": float("nan"), "n": 0}
    se = float(v.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": float(v.mean()), "se": se, "n": n}


def _chunks(data: ImageSet, size: int, device) -> list[tuple[Tensor, Tensor, Tensor]]:
    size = max(1, int(size))
    return [
        (data.x[i : i + size].to(device), data.y[i : i + size].to(device), data.ids[i : i + size].to(device))
        for i in range(0, len(data), size)
    ]


@torch.no_grad()
def accuracy(net: nn.Module, dataset: Dataset | ImageSet, device, batch_size: int = 256) -> float:
    """Top-1 accuracy (eval mode, forward passes only) on a dataset (streamed) or an ImageSet."""
    correct = total = 0
    with eval_mode(net):
        if isinstance(dataset, ImageSet):
            batches = ((dataset.x[i : i + batch_size], dataset.y[i : i + batch_size]) for i in range(0, len(dataset), batch_size))
        else:
            batches = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
        for x, y in batches:
            pred = net(x.to(device)).argmax(1).cpu()
            correct += int((pred == torch.as_tensor(y)).sum())
            total += int(len(y))
    return correct / max(total, 1)


class Evaluator:
    """Per-sample attack metrics of one model on fixed images, from ``explanations.evaluation``
    (the protocol the callback and the standalone evaluation run; see the module docstring)."""

    def __init__(self, net: nn.Module, cfg: EvalConfig, k: int | float, pool: int | None, relu: bool, device) -> None:
        self.net, self.cfg, self.k, self.pool, self.relu, self.device = net, cfg, k, pool, relu, device

    def _protocol(self, eps: float, attacks: list, steps: int, method: str = "gradient",
                  method_kwargs: dict[str, Any] | None = None) -> EvaluationProtocol:
        """The protocol with ``attacks`` only (no noise baseline, no thickness) at one budget."""
        return EvaluationProtocol(
            eps=[eps], attacks=attacks, noise=False, k=self.k, target="loss", pool=self.pool, methods=[method],
            method_kwargs={method: dict(method_kwargs)} if method_kwargs else None, seed=self.cfg.seed,
            steps=steps, localization=False, thickness=False,
        )

    def _run(self, protocol: EvaluationProtocol, data: ImageSet, batch_size: int | None = None) -> dict[str, Tensor]:
        batches = iter_batches(data.x, data.y, data.ids, batch_size or self.cfg.batch_size)
        return protocol.evaluate(self.net, batches, self.device).values

    def robust_attack(
        self, data: ImageSet, name: str, eps: float, steps: int, method: str = "gradient",
        method_kwargs: dict[str, Any] | None = None, batch_size: int | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample ``p_at_k``, ``spearman``, ``kendall`` and ``pred_flip`` (the protocol's
        ``flip_rate``) under the attack ``name``; on a ReLU model (``name`` in ``relu_surrogate``)
        the protocol's per-image worst case of the attack and its Softplus-surrogate version, plus
        ``surrogate_wins`` (1 where the surrogate found the lower P@k)."""
        attacks: list[Any] = [{"name": name, "kwargs": {"surrogate_beta": None}}]
        surrogate = self.relu and name in self.cfg.relu_surrogate
        if surrogate:
            attacks.append({"name": f"{name}_surrogate", "attack": name,
                            "kwargs": {"surrogate_beta": self.cfg.surrogate_beta}})
        values = self._run(self._protocol(eps, attacks, steps, method, method_kwargs), data, batch_size)
        tag = eps_tag(eps)

        def per(src: str) -> dict[str, Tensor]:
            return {key: values[f"{metric}/{src}/{method}/{tag}"]
                    for key, metric in (("p_at_k", "p_at_k"), ("spearman", "spearman"), ("kendall", "kendall"),
                                        ("pred_flip", "flip_rate"))}

        if not surrogate:
            return per(name)
        worst = per(WORST)
        worst["surrogate_wins"] = (per(f"{name}_surrogate")["p_at_k"] < per(name)["p_at_k"]).float()
        return worst

    def pse(self, data: ImageSet) -> dict[str, float]:
        cfg = self.cfg
        settings = PSESettings(eps=cfg.eps, steps=cfg.pse_steps, group_size=cfg.pse_group_size)
        sums = None
        for x, y, ids in _chunks(data, cfg.batch_size, self.device):
            uniform = pse_target_uniform(ids, cfg.seed)
            sums = add_sums(sums, batch_sums(analyze_batch(self.net, x, y, settings, uniform=uniform), settings))
        result = summarize(sums, settings)
        return {key: float(result[key]) for key in PSE_KEYS if key in result}


def _stats(per_sample: dict[str, Tensor]) -> dict[str, Any]:
    return {key: mean_se(v) for key, v in per_sample.items()}


def _timed(timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; record its wall seconds under ``name`` and its process CPU seconds under
    ``name + '_cpu'`` (CPU time is what other processes on a shared machine distort least)."""
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    timings[name] = round(time.perf_counter() - start, 3)
    timings[name + "_cpu"] = round(time.process_time() - cpu, 3)
    return result


def _per_image(values: dict[str, Tensor], key: str) -> list[float]:
    """Per-image values of one protocol key as a JSON list (NaN kept as NaN)."""
    return [float(v) for v in values[key].double().tolist()]


def evaluate_model(
    net: nn.Module, test: ImageSet, test_acc: Dataset, cfg: EvalConfig, k: int | float,
    pool: int | None, relu: bool, device, log: Callable[[str], None] = print, extras: bool = True,
) -> dict[str, Any]:
    """Every metric of the study for one model (see the module docstring and presets.EvalConfig).

    Main block (always): test accuracy on ``test_acc``; on the first ``cfg.size`` test images the
    protocol's default ensemble (ER, ER through the Softplus surrogate where the model has ReLU-type
    activations, MSE, uniform noise) at every budget of ``cfg.eps_list`` with ``cfg.steps`` steps,
    the per-image worst case (cumulative over attacks and smaller budgets), boundary and all-pairs
    thickness at ``cfg.eps`` (``cfg.thickness_samples`` 0: none), and the paper-protocol attack
    column on the first ``cfg.paper_size`` images. Per-image worst-case and paper P@k are stored
    (``per_image``) for the paired statistics. ``extras``: also SmoothGrad / IG under ER, the step
    check (``cfg.check_steps`` steps at ``cfg.eps``) and PSE, each where its size is > 0.
    """
    t: dict[str, float] = {}
    res: dict[str, Any] = {"relu": relu, "sizes": {}, "per_image": {}}
    res["test_acc"] = _timed(t, "test_acc", lambda: accuracy(net, test_acc, device))
    res["sizes"]["test_acc"] = len(test_acc)
    main = test.head(cfg.size)
    res["ids"] = [int(i) for i in main.ids.tolist()]
    res["sizes"]["main"] = len(main)

    thickness = cfg.thickness_samples > 0
    protocol = EvaluationProtocol(
        eps=list(cfg.eps_list), attacks=None, noise=True, k=k, target="loss", pool=pool, seed=cfg.seed,
        steps=cfg.steps, localization=False, correlations=True, thickness=thickness,
        thickness_samples=max(1, cfg.thickness_samples), thickness_points=cfg.thickness_points, thickness_eps=cfg.eps,
    )
    out = _timed(t, "protocol", lambda: protocol.evaluate(net, iter_batches(main.x, main.y, main.ids, cfg.batch_size), device))
    values = out.values
    res["protocol"] = {"settings": protocol.settings(), "notes": list(out.notes),
                       "attack_seconds": {k_: round(v, 2) for k_, v in out.seconds.items()}}
    res["subset_acc"] = float(values["accuracy"].mean())
    sources = sorted({key.split("/")[1] for key in values if key.startswith("p_at_k/")})
    res["p_at_k"] = {src: {eps_tag(e): mean_se(values[f"p_at_k/{src}/gradient/{eps_tag(e)}"]) for e in protocol.eps}
                     for src in sources}
    res["spearman_worst"] = {eps_tag(e): mean_se(values[f"spearman/{WORST}/gradient/{eps_tag(e)}"]) for e in protocol.eps}
    res["flip_rate_worst"] = {eps_tag(e): mean_se(values[f"flip_rate/{WORST}/gradient/{eps_tag(e)}"]) for e in protocol.eps}
    for e in protocol.eps:
        res["per_image"][f"worst/{eps_tag(e)}"] = _per_image(values, f"p_at_k/{WORST}/gradient/{eps_tag(e)}")
    for pairs in ("boundary", "all_pairs") if thickness else ():
        res[f"thickness_{pairs}"] = mean_se(values[f"thickness/{pairs}/gradient"])
        res["per_image"][f"thickness_{pairs}"] = _per_image(values, f"thickness/{pairs}/gradient")
    worst = res["p_at_k"][WORST]
    log(f"    test acc {res['test_acc']:.3f}; worst P@k " + " / ".join(f"{worst[eps_tag(e)]['mean']:.3f}" for e in protocol.eps)
        + f" at eps {[round(e * 255, 2) for e in protocol.eps]}/255"
        + (f"; thickness {res['thickness_boundary']['mean']:.3f}" if thickness else "") + f" ({t['protocol']:.0f} s)")

    if cfg.paper_size:
        paper_set = main.head(cfg.paper_size)
        res["paper"] = _timed(t, "paper", lambda: paper_column(net, paper_set, cfg, k, device, pool))
        res["per_image"]["paper"] = res["paper"].pop("per_image")
        log(f"    paper-protocol attack P@k {res['paper']['p_at_k']['mean']:.3f} ({t['paper']:.0f} s)")
    if not extras:
        res["timings_s"] = t
        return res

    ev = Evaluator(net, cfg, k, pool, relu, device)
    if cfg.check_size and cfg.check_steps:
        check = main.head(cfg.check_size)
        proto = EvaluationProtocol(eps=[cfg.eps], attacks=None, noise=False, k=k, target="loss", pool=pool,
                                   seed=cfg.seed, steps=cfg.check_steps, localization=False, correlations=False,
                                   thickness=False)
        v = _timed(t, "check", lambda: proto.evaluate(net, iter_batches(check.x, check.y, check.ids, cfg.batch_size), device).values)
        tag = eps_tag(cfg.eps)
        strong = v[f"p_at_k/{WORST}/gradient/{tag}"]
        base = values[f"p_at_k/{WORST}/gradient/{tag}"][: len(check)]
        combined = torch.minimum(base, strong)  # the main worst case with the long attacks added
        res["step_check"] = {"steps": cfg.check_steps, "n": len(check), "eps": cfg.eps,
                             "main_worst": mean_se(base), "strong_worst": mean_se(strong),
                             "combined_worst": mean_se(combined), "combined_minus_main": mean_se(combined - base),
                             "share_lowered": float((combined < base).float().mean())}
        res["per_image"]["check_strong"] = _per_image({"s": strong}, "s")
        log(f"    step check: worst {float(base.mean()):.3f} with {cfg.steps} steps, {float(combined.mean()):.3f} with the "
            f"{cfg.check_steps}-step attacks added ({float(strong.mean()):.3f} alone) ({t['check']:.0f} s)")

    if cfg.explainer_size:
        exp_set = main.head(cfg.explainer_size)
        methods = {
            "smoothgrad": {"num_samples": cfg.smoothgrad_samples, "noise_std": cfg.smoothgrad_noise},
            "integrated_gradients": {"steps": cfg.ig_steps},
        }
        for method, kwargs in methods.items():
            per_call = max(1, cfg.batch_size * 4 // max(1, next(iter(kwargs.values()))))
            o = _timed(t, method, lambda: ev.robust_attack(exp_set, "er", cfg.eps, cfg.explainer_steps, method=method,
                                                           method_kwargs=kwargs, batch_size=per_call))
            res[method] = _stats(o)
            log(f"    {method} P@k {res[method]['p_at_k']['mean']:.3f} ({t[method]:.0f} s)")
        res["sizes"]["explainers"] = len(exp_set)

    if cfg.pse_size:
        pse_set = main.head(cfg.pse_size)
        res["pse"] = _timed(t, "pse", lambda: ev.pse(pse_set))
        res["sizes"]["pse"] = len(pse_set)
        log(f"    PSE sup/bal/pro {res['pse'].get('frac_suppression', float('nan')):.2f}/"
            f"{res['pse'].get('frac_balanced', float('nan')):.2f}/{res['pse'].get('frac_promotion', float('nan')):.2f} ({t['pse']:.0f} s)")
    res["timings_s"] = t
    return res


def paper_column(net: nn.Module, data: ImageSet, cfg: EvalConfig, k: int | float, device, cfg_pool: int | None = None) -> dict[str, Any]:
    """P@k under the R2ET reference threat model (``explanations.attacks.PaperERAttack``, first-flip,
    in the model's own normalised input space), gradient explanations of the CE loss. An image
    whose first step flips the prediction returns the clean image (P@k 1; the reference code has
    no unflipped iterate there): ``flip_rate`` counts the images stopped by a flip."""
    norm = getattr(net, "normalize", None)
    if norm is None:
        raise ValueError("the paper-protocol column needs a model with a Normalize first layer (mean/std)")
    attack = PaperERAttack(net, mean=norm.mean.flatten().tolist(), std=norm.std.flatten().tolist(),
                           steps=cfg.paper_steps, step_size=cfg.paper_step_size, k=k, pool=cfg_pool)
    pk, flips, stopped = [], [], []
    with eval_mode(net):
        for x, y, ids in _chunks(data, cfg.batch_size, device):
            with torch.enable_grad():
                x_adv = attack(x, y).detach()
                stopped.append(attack.flipped.float().cpu())
                s0 = explain_with_logits(net, x, y, "gradient", "loss", cfg_pool).saliency.detach()
                # the reference threat model leaves [0, 1] (no pixel clipping): its images skip the check
                s1 = explain_unchecked(net, x_adv, y, "gradient", "loss", cfg_pool).saliency.detach()
            with torch.no_grad():
                flips.append((net(x_adv).argmax(1) != net(x).argmax(1)).float().cpu())
            pk.append(precision_at_k(s0, s1, k).cpu())
    p = torch.cat(pk)
    return {"p_at_k": mean_se(p), "flip_rate": mean_se(torch.cat(flips)), "stopped_by_flip": mean_se(torch.cat(stopped)),
            "steps": cfg.paper_steps,
            "step_size": cfg.paper_step_size, "n": len(data), "per_image": _per_image({"p": p}, "p")}


def sweep_metrics(
    net: nn.Module, val_acc: Dataset, val_attack: ImageSet | None, cfg: EvalConfig, k: int | float,
    pool: int | None, relu: bool, steps: int, device,
) -> dict[str, Any]:
    """Validation numbers of one sweep point: accuracy and P@k under a short ERAttack."""
    start, cpu = time.perf_counter(), time.process_time()
    out: dict[str, Any] = {"val_acc": accuracy(net, val_acc, device), "val_size": len(val_acc)}
    if val_attack is not None and len(val_attack):
        ev = Evaluator(net, cfg, k, pool, relu, device)
        p = ev.robust_attack(val_attack, "er", cfg.eps, steps)["p_at_k"]
        out["val_p_at_k"] = mean_se(p)
    out["seconds"] = round(time.perf_counter() - start, 3)
    out["cpu_seconds"] = round(time.process_time() - cpu, 3)
    return out
