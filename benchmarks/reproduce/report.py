"""docs/results.md and its plots, from the study's results JSON (nothing is typed in by hand).

The markdown holds: the setup (preset, hardware, the exact command), the starting point, the main
table per task (worst-case P@k over the attack ensemble at every budget, thickness, the
paper-protocol column, SmoothGrad / IG, cost), the paired comparisons of R2ET with every other
method (bootstrap intervals per training seed and whether the seeds agree), the thickness-P@k
rank correlation, the step check, every sweep point, PSE, and links to the PNG plots (matplotlib,
Agg backend) written next to the JSON. Free-text analysis is read from
``benchmarks/reproduce/notes/<preset>.md`` when that file exists, so a rerun regenerates the whole
document. :func:`task_summary` is the compact machine-readable block stored in the results JSON.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from benchmarks.reproduce.presets import METHOD_NAMES
from explanations.statistics import rank_correlation

NOTES_DIR = Path(__file__).resolve().parent / "notes"
WORST = "worst"


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def _pm(stat: dict | None, digits: int = 3) -> str:
    if not stat:
        return "–"
    mean, se = stat.get("mean"), stat.get("se")
    if se is None or (isinstance(se, float) and math.isnan(se)):
        return _f(mean, digits)
    return f"{_f(mean, digits)} ± {_f(se, digits)}"


def _value(sel: dict) -> str:
    value, param = sel.get("value"), sel.get("param")
    if param is None or value is None:
        return "–"
    if param == "at_eps":
        return f"eps={value * 255:.3g}/255"
    short = {"weight": "w", "weight_decay": "wd", "softplus_beta": "beta"}[param]
    return f"{short}={value:.3g}"


def _cost(run: dict) -> float:
    """Training cost of a run: process CPU seconds on CPU (robust to other load), wall on GPU."""
    return run["train_cpu_seconds"] if run.get("device", "cpu") == "cpu" else run["train_seconds"]


def eps_keys(task: dict) -> list[str]:
    """The budgets' tags (``eps_8`` ...) in ascending order, as the evaluation stored them."""
    return [k.split("/", 1)[1] for k in next(iter(task["eval"].values()))["per_image"] if k.startswith("worst/")]


def _eps_label(tag: str) -> str:
    return tag.replace("eps_", "").replace("_", ".") + "/255"


def _headline(task: dict) -> str:
    from explanations.evaluation import eps_tag

    return eps_tag(task["config"]["eval"]["eps"])


def _seed_values(task: dict, method: str, get) -> list[float]:
    return [get(ev) for _, ev in sorted(task.get("seed_eval", {}).get(method, {"0": task["eval"][method]}).items())]


def _over_seeds(values: list[float]) -> str:
    """Mean over training seeds, with the range when there is more than one."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return _f(mean)
    return f"{_f(mean)} [{_f(min(values))}, {_f(max(values))}]"


# ------------------------------------------------------------------------------------- summary
def task_summary(task: dict) -> dict[str, Any]:
    """The machine-readable block of a task.

    Per method: ``test_acc``, ``p_at_k_worst`` (by budget), ``thickness_boundary`` /
    ``thickness_all_pairs`` as the mean over the method's training seeds (``seeds`` of them; the
    same numbers as the main table), the seed-0 values (``*_seed0``: the selected run itself, the
    one with the extras), the noise baseline and the paper-protocol column (seed 0). Per comparison
    (``r2et_vs_<method>``, R2ET minus the method at the headline budget): ``paired_diff`` with its
    95% interval ``ci_low`` / ``ci_high`` (seed-averaged per-image difference, bootstrap over
    images), ``seeds_agree`` and the per-seed intervals.
    """
    methods: dict[str, Any] = {}
    tags = eps_keys(task)
    for method, ev in task["eval"].items():
        seeds = task.get("seed_eval", {}).get(method, {"0": ev})
        n = len(seeds)
        mean = lambda get: sum(get(e) for e in seeds.values()) / n  # noqa: E731
        run = task["runs"][task["selection"][method]["run"]]
        methods[method] = {
            "name": METHOD_NAMES[method],
            "selected": task["selection"][method]["run"],
            "value": task["selection"][method]["value"],
            "activation": run["model_kwargs"]["activation"],
            "seeds": n,
            "test_acc": mean(lambda e: e["test_acc"]),
            "p_at_k_worst": {t: mean(lambda e, t=t: e["p_at_k"][WORST][t]["mean"]) for t in tags},
            "thickness_boundary": mean(lambda e: e["thickness_boundary"]["mean"]),
            "thickness_all_pairs": mean(lambda e: e["thickness_all_pairs"]["mean"]),
            "test_acc_seed0": ev["test_acc"],
            "p_at_k_worst_seed0": {t: ev["p_at_k"][WORST][t]["mean"] for t in tags},
            "thickness_boundary_seed0": ev["thickness_boundary"]["mean"],
            "p_at_k_noise_seed0": {t: ev["p_at_k"]["noise"][t]["mean"] for t in tags},
            "p_at_k_paper_protocol_seed0": (ev.get("paper") or {}).get("p_at_k", {}).get("mean"),
            "finetune_cpu_seconds": run["train_cpu_seconds"],
        }
    comps = {}
    for other, c in task.get("comparisons", {}).items():
        comps[f"r2et_vs_{other}"] = {
            "paired_diff": c["paired_diff"], "ci_low": c["ci_low"], "ci_high": c["ci_high"],
            "seeds_agree": c["seeds_agree"], "eps": c["eps"], "r2et_seeds": c["n_seeds"], "other_seeds": c["other_seeds"],
            "per_seed": [{k: r[k] for k in ("seed", "other_seed", "paired_diff", "ci_low", "ci_high", "sign", "test_acc_diff")}
                         for r in c["seeds"]],
        }
    head = _headline(task)
    th = [methods[m]["thickness_boundary"] for m in methods]
    th_all = [methods[m]["thickness_all_pairs"] for m in methods]
    pk = [methods[m]["p_at_k_worst"][head] for m in methods]
    return {
        "headline_eps": head, "methods": methods, "comparisons": comps,
        "start_test_acc": task["pretrain"].get("test_acc"),
        "published_test_acc": (task["pretrain"].get("published") or {}).get("test_acc"),
        "rank_correlation_thickness_p_at_k": {"boundary": rank_correlation(th, pk), "all_pairs": rank_correlation(th_all, pk)},
    }


# ------------------------------------------------------------------------------------- tables
def main_table(task: dict) -> list[str]:
    runs, sel, evals = task["runs"], task["selection"], task["eval"]
    tags = eps_keys(task)
    head = _headline(task)
    base_time = _cost(runs[sel["vanilla"]["run"]]) if "vanilla" in sel else None
    lines = [
        "| Method | Act. | Chosen | Seeds | Val acc | Test acc | "
        + " | ".join(f"worst P@k {_eps_label(t)}" for t in tags)
        + f" | noise P@k {_eps_label(head)} | Thickness (boundary) | Thickness (all pairs) | Paper-protocol P@k | "
        "SmoothGrad P@k | IG P@k | Fine-tune CPU s | × vanilla |",
        "|---|" * 1 + "---|" * (13 + len(tags)),
    ]
    for method, s in sel.items():
        ev, run = evals[method], runs[s["run"]]
        n = len(task.get("seed_eval", {}).get(method, {"0": ev}))
        ratio = f"{_cost(run) / base_time:.1f}" if base_time else "–"
        cells = []
        for t in tags:
            cells.append(_over_seeds(_seed_values(task, method, lambda e, t=t: e["p_at_k"][WORST][t]["mean"])) if n > 1
                         else _pm(ev["p_at_k"][WORST][t]))
        acc = _over_seeds(_seed_values(task, method, lambda e: e["test_acc"])) if n > 1 else _f(ev["test_acc"])
        lines.append(
            f"| {METHOD_NAMES[method]} | {run['model_kwargs']['activation']} | {_value(s)} | {n} | "
            f"{_f(run['sweep']['val_acc'])} | {acc} | " + " | ".join(cells)
            + f" | {_pm(ev['p_at_k']['noise'][head])} | {_pm(ev['thickness_boundary'], 4)} | {_pm(ev['thickness_all_pairs'], 4)} | "
            f"{_pm((ev.get('paper') or {}).get('p_at_k'))} | {_pm((ev.get('smoothgrad') or {}).get('p_at_k'))} | "
            f"{_pm((ev.get('integrated_gradients') or {}).get('p_at_k'))} | {_cost(run):.0f} | {ratio} |"
        )
    return lines


def attack_table(task: dict) -> list[str]:
    """P@k of each ensemble member at the headline budget (seed 0): which attack does the work."""
    head = _headline(task)
    sources = []
    for ev in task["eval"].values():
        for src in ev["p_at_k"]:
            if src not in sources:
                sources.append(src)
    order = [s for s in ("er", "er_surrogate", "mse", "noise", WORST) if s in sources] + [
        s for s in sources if s not in ("er", "er_surrogate", "mse", "noise", WORST)]
    lines = ["| Method | " + " | ".join(order) + " |", "|---|" + "---|" * len(order)]
    for method, ev in task["eval"].items():
        lines.append(f"| {METHOD_NAMES[method]} | " + " | ".join(_f((ev["p_at_k"].get(s) or {}).get(head, {}).get("mean")) for s in order) + " |")
    return lines


def verdict(c: dict) -> str:
    """Plain words for one comparison (R2ET minus the other method)."""
    signs = {r["sign"] for r in c["seeds"]}
    other = " (the other method: 1 model, its training noise not sampled)" if c["other_seeds"] == 1 and c["n_seeds"] > 1 else ""
    if c["n_seeds"] == 1:
        other = " (one training seed)"
    if c["seeds_agree"]:
        return ("**R2ET higher in every seed**" if signs == {1} else "**R2ET lower in every seed**") + other
    if signs == {0}:
        return "not resolved (every interval contains 0)" + other
    if 0 in signs and len(signs) == 2:
        return "partly resolved (some seeds' intervals contain 0)" + other
    return "not resolved (seeds disagree in sign)" + other


def comparison_table(task: dict) -> list[str]:
    comps = task.get("comparisons") or {}
    if not comps:
        return []
    tags = eps_keys(task)
    lines = [
        f"| R2ET vs | paired diff at {_eps_label(_headline(task))} [95% interval] | 95% interval per R2ET seed | seeds (R2ET × other) | "
        "verdict | test acc diff (points) | " + " | ".join(f"diff at {_eps_label(t)}" for t in tags) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(tags),
    ]
    for other, c in comps.items():
        rows = c["seeds"]
        intervals = "; ".join(f"s{r['seed']}: [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]" for r in rows)
        acc = sum(r["test_acc_diff"] for r in rows) / len(rows) * 100
        by = " | ".join(f"{c['by_eps'][t]['paired_diff']:+.3f}" + (" *" if c["by_eps"][t]["seeds_agree"] else "") for t in tags)
        lines.append(f"| {METHOD_NAMES[other]} | {c['paired_diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] | {intervals} | "
                     f"{c['n_seeds']} × {c['other_seeds']} | {verdict(c)} | {acc:+.1f} | {by} |")
    return lines


def check_table(task: dict) -> list[str]:
    rows = []
    for method, ev in task["eval"].items():
        c = ev.get("step_check")
        if not c:
            continue
        rows.append(f"| {METHOD_NAMES[method]} | {c['n']} | {_pm(c['main_worst'])} | {_pm(c['strong_worst'])} | "
                    f"{_pm(c['combined_worst'])} | {_pm(c['combined_minus_main'])} | {_f(c['share_lowered'], 2)} |")
    if not rows:
        return []
    cfg = task["config"]["eval"]
    return [f"| Method | images | main worst P@k ({cfg['steps']} steps per attack and budget) | {cfg['check_steps']}-step "
            f"ensemble alone at {cfg['eps'] * 255:.3g}/255 | main + {cfg['check_steps']}-step | change of the worst case | "
            "share of images lowered |", "|---|---|---|---|---|---|---|", *rows]


def sweep_table(task: dict) -> list[str]:
    lines = [
        "| Method | Value | Source | Val acc | Val P@k (short ERAttack) | Fine-tune s (CPU s) | Selected |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, s in task["selection"].items():
        for run_id in s["points"]:
            run = task["runs"][run_id]
            mark = "**yes**" if run_id == s["run"] else ""
            lines.append(
                f"| {METHOD_NAMES[method]} | {_value({'param': run['param'], 'value': run['value']})} | "
                f"{s['source']} | {_f(run['sweep']['val_acc'])} | {_pm(run['sweep'].get('val_p_at_k'))} | "
                f"{run['train_seconds']:.0f} ({run['train_cpu_seconds']:.0f}) | {mark} |"
            )
    notes = [f"- {METHOD_NAMES[m]}: {s['note']}" for m, s in task["selection"].items() if s["note"] != "single value"]
    floor = next((s["floor"] for s in task["selection"].values() if s.get("floor") is not None), None)
    head = [f"Accuracy floor: val accuracy >= {_f(floor)} (vanilla fine-tune minus the preset's floor)."] if floor else []
    return head + [""] + lines + ([""] + notes if notes else [])


def seed_table(task: dict) -> list[str]:
    rows = []
    for method, seeds in task.get("seed_eval", {}).items():
        if len(seeds) < 2:
            continue
        for seed, ev in sorted(seeds.items()):
            run = task["runs"][task["seed_runs"][method][seed]]
            rows.append(f"| {METHOD_NAMES[method]} | {run.get('seed', seed)} | {_f(run['sweep']['val_acc'])} | {_f(ev['test_acc'])} | "
                        + " | ".join(_pm(ev["p_at_k"][WORST][t]) for t in eps_keys(task)) + f" | {_pm(ev['thickness_boundary'], 4)} |")
    if not rows:
        return []
    return ["| Method | training seed | Val acc | Test acc | " + " | ".join(f"worst P@k {_eps_label(t)}" for t in eps_keys(task))
            + " | Thickness (boundary) |", "|---|---|---|---|" + "---|" * (len(eps_keys(task)) + 1), *rows]


def val_sweep_table(task: dict) -> list[str]:
    """The validation-only sweep next to the main study's selected runs (same val images)."""
    variants = task.get("val_sweep") or {}
    if not variants:
        return []
    lines = ["| Run | Method | Setting | Val acc | Val P@k (short ERAttack) | Fine-tune CPU s |", "|---|---|---|---|---|---|"]
    for method in ("sp", "est_h", "r2et"):
        if method in task["selection"]:
            run = task["runs"][task["selection"][method]["run"]]
            lines.append(f"| main study (selected) | {METHOD_NAMES[method]} | {_value({'param': run['param'], 'value': run['value']})}, "
                         f"{run['epochs']} epoch(s) | {_f(run['sweep']['val_acc'])} | {_pm(run['sweep'].get('val_p_at_k'))} | {_cost(run):.0f} |")
    for name, info in variants.items():
        changes = dict(info["variant"].get("set") or {})
        changes.pop("weight", None)
        setting = ", ".join([_value({"param": info["param"], "value": info["value"]})] + [f"{k}={v}" for k, v in changes.items()])
        lines.append(f"| {name} | {METHOD_NAMES[info['method']]} | {setting} | {_f(info['sweep']['val_acc'])} | "
                     f"{_pm(info['sweep'].get('val_p_at_k'))} | {_cost(info):.0f} |")
    return lines


def pse_table(task: dict) -> list[str]:
    rows = []
    for method, ev in task["eval"].items():
        p = ev.get("pse")
        if not p:
            continue
        rows.append(
            f"| {METHOD_NAMES[method]} | {_f(p.get('attack_success_rate'), 2)} | {int(p.get('num_counted', 0))} | "
            + " | ".join(_f(p.get(f"frac_{c}"), 2) for c in ("suppression", "balanced", "promotion"))
            + " | " + " | ".join(_f(p.get(f"group/frac_{c}"), 2) for c in ("suppression", "balanced", "promotion", "ineffective"))
            + f" | {_f(p.get('mean_phi'), 2)} |"
        )
    if not rows:
        return []
    return [
        "| Method | targeted-PGD success | counted | sample: sup | bal | pro | group: sup | bal | pro | ineff. | mean phi |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def cost_lines(task: dict) -> list[str]:
    sel, runs = task["selection"], task["runs"]
    if "at" not in sel or "r2et" not in sel:
        return []
    at, r2 = runs[sel["at"]["run"]], runs[sel["r2et"]["run"]]
    t_at, t_r = _cost(at), _cost(r2)
    kw = at["model_kwargs"].get("objective_kwargs") or {}
    head = _headline(task)
    p_at, p_r = task["eval"]["at"]["p_at_k"][WORST][head]["mean"], task["eval"]["r2et"]["p_at_k"][WORST][head]["mean"]
    return [
        f"- AT's training attack: {kw.get('steps')} step(s), `{kw.get('step', 'sign')}` steps of {kw.get('step_size')} "
        f"(pixel units), box {kw.get('eps')}; R2ET fine-tune {t_r:.0f} CPU s, AT {t_at:.0f} CPU s "
        f"(AT / R2ET = {t_at / max(t_r, 1e-9):.2f}); worst-case P@k at {_eps_label(head)}: R2ET {_f(p_r)}, AT {_f(p_at)}.",
    ]


def timing_table(task: dict) -> list[str]:
    keys: list[str] = []
    for ev in task["eval"].values():
        for key in ev.get("timings_s", {}):
            if key not in keys and not key.endswith("_cpu"):
                keys.append(key)
    lines = ["| Method | " + " | ".join(keys) + " | total | total CPU s |", "|---|" + "---|" * (len(keys) + 2)]
    for method, ev in task["eval"].items():
        t = ev.get("timings_s", {})
        lines.append(
            f"| {METHOD_NAMES[method]} | " + " | ".join(f"{t.get(k, 0):.0f}" for k in keys) + f" | {ev.get('eval_seconds', 0):.0f} | {ev.get('eval_cpu_seconds', 0):.0f} |"
        )
    return lines


# ------------------------------------------------------------------------------------- plots
def _ci(ev: dict, tag: str) -> tuple[float, float]:
    """Mean worst-case P@k and the half-width of its 95% interval over images (1.96 SE)."""
    stat = ev["p_at_k"][WORST][tag]
    se = stat.get("se")
    return stat["mean"], 1.96 * (se if se is not None and not math.isnan(se) else 0.0)


def make_plots(results: dict, out_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for task_name, task in results["tasks"].items():
        ev = task["eval"]
        head = _headline(task)
        tags = eps_keys(task)
        prefix = f"{task_name}_"
        fig, ax = plt.subplots(figsize=(6.5, 4.8))
        for method, e in ev.items():
            for seed, es in sorted(task.get("seed_eval", {}).get(method, {"0": e}).items()):
                mean, half = _ci(es, head)
                acc = 100 * es["test_acc"]
                ax.errorbar(acc, mean, yerr=half, fmt="o" if seed == "0" else ".", capsize=3, alpha=1.0 if seed == "0" else 0.5,
                            color=f"C{list(ev).index(method) % 10}")
            mean, _ = _ci(e, head)
            ax.annotate(METHOD_NAMES[method], (100 * e["test_acc"], mean), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("test accuracy (%)")
        ax.set_ylabel(f"worst-case P@k at {_eps_label(head)} (95% interval)")
        ax.set_title(f"{task_name}: ranking robustness vs accuracy (small dots: other seeds)")
        ax.grid(alpha=0.3)
        files[prefix + "pk_vs_acc"] = _save(fig, out_dir / f"{prefix}pk_vs_acc.png")

        fig, ax = plt.subplots(figsize=(6.5, 4.8))
        xs = [float(t.replace("eps_", "").replace("_", ".")) for t in tags]
        for method, e in ev.items():
            means = [e["p_at_k"][WORST][t]["mean"] for t in tags]
            halves = [_ci(e, t)[1] for t in tags]
            line = ax.errorbar(xs, means, yerr=halves, marker="o", capsize=2, label=METHOD_NAMES[method])
            ax.plot(xs, [e["p_at_k"]["noise"][t]["mean"] for t in tags], ls="--", color=line[0].get_color(), alpha=0.4)
        ax.set_xlabel("eps (x 1/255)")
        ax.set_ylabel("P@k (solid: worst case over the ensemble; dashed: noise)")
        ax.set_title(f"{task_name}: P@k vs budget (seed 0)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        files[prefix + "pk_vs_eps"] = _save(fig, out_dir / f"{prefix}pk_vs_eps.png")

        fig, ax = plt.subplots(figsize=(6.5, 4.8))
        for method, e in ev.items():
            th = e["thickness_boundary"]
            mean, half = _ci(e, head)
            ax.errorbar(th["mean"], mean, xerr=1.96 * (th.get("se") or 0.0), yerr=half, fmt="o", capsize=3)
            ax.annotate(METHOD_NAMES[method], (th["mean"], mean), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"boundary top-k thickness at {_eps_label(head)}")
        ax.set_ylabel(f"worst-case P@k at {_eps_label(head)}")
        ax.set_title(f"{task_name}: thickness vs P@k (seed 0, 95% intervals)")
        ax.grid(alpha=0.3)
        files[prefix + "thickness_vs_pk"] = _save(fig, out_dir / f"{prefix}thickness_vs_pk.png")
    return files


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)


# ------------------------------------------------------------------------------------- document
TASK_TITLES = {"cifar": "CIFAR-10 (JPEG image-folder copy)", "imagenette": "Imagenette (fine-tuned from our vanilla checkpoint)"}


def _protocol(results: dict) -> list[str]:
    pre = results["preset"]
    lines = [
        "- **Workflow.** One vanilla ReLU model is the starting point (published weights adapted to the "
        "training images, or trained from scratch; see each task), then every method is fine-tuned from that "
        "checkpoint with `RobustClassifier(init_from=...)` for the same number of epochs on the same images, "
        "with the same optimizer (SGD + Nesterov, lr as below, no weight decay except for WD). Training runs "
        "through `lightning.Trainer` on the project's DataModules.",
        "- **Activations.** Vanilla and WD keep ReLU. SP swaps ReLU for Softplus(beta) and trains with CE. "
        "Every regularizer (Est-H, Grad-norm, R2ET\\H, R2ET, R2ET-mm) and AT fine-tune the same Softplus "
        "network, so SP is the control for the activation swap.",
        "- **Weights.** R2ET family and Est-H: adaptive weights `lambda = w (CE + 1) / |R|`; Grad-norm: "
        "`w ||g||^2`; WD: the optimizer's weight decay. Each value is chosen on the validation split (sweep "
        "table): the highest val P@k under a short ERAttack among the values whose val accuracy is at most "
        "the floor below vanilla's. Nothing is chosen on test images.",
        "- **Evaluation** (`explanations.evaluation.EvaluationProtocol`, the protocol of the callbacks and of "
        "`train.py validate -c configs/evaluate.yaml`): fixed class-balanced test subset, eval mode, explained "
        "scalar = CE with the true label, all images counted. Per image and budget the *worst case* is the "
        "lowest P@k over the ensemble (ERAttack, ERAttack through a Softplus(10) surrogate when the model has "
        "ReLU-type activations, MSE attack, uniform noise) and over every smaller budget. The attacks keep the "
        "prediction and return their best iterate (APGD step-size schedule). `±` is one standard error over "
        "images; intervals in the comparisons are paired bootstrap intervals over images (10,000 resamples).",
        "- **Comparisons.** R2ET minus each method, per image, on the same images; for each training seed s "
        "of R2ET the other method's seed s (its seed 0 when it has only one). A claim holds only when the 95% "
        "interval excludes zero on the same side in every seed (`seeds_agree`).",
    ]
    for task_name, cfg in pre["tasks_cfg"].items():
        e = cfg["eval"]
        start = ("published weights adapted for " if cfg.get("pretrained") else "pretrain ") + \
            f"{cfg['pretrain_epochs']} epoch(s) on {cfg['train_size']} train images (lr {cfg['pretrain_lr']})"
        lines.append(
            f"- **{task_name} preset numbers.** {cfg['backbone']} {cfg['backbone_kwargs']} at {cfg['image_size']} px"
            f"{', saliency pooled ' + str(cfg['pool']) + 'x' + str(cfg['pool']) if cfg['pool'] else ''}, k = {cfg['k']}; "
            f"{start}; fine-tune {cfg['finetune_epochs']} epoch(s) on {cfg['finetune_size'] or cfg['train_size']} of them "
            f"(lr {cfg['finetune_lr']}), batch {cfg['batch_size']}; val accuracy on {cfg['val_size']} images, "
            + (f"sweep P@k on {cfg['sweep_eval_size']} val images with a {cfg['sweep_attack_steps']}-step ERAttack; "
               if cfg["sweep_eval_size"] else "no sweep P@k; ")
            + f"floor {cfg['accuracy_floor']} points; Softplus beta {cfg['softplus_beta']:g}; training seeds: "
            + (f"{cfg['seeds']} for {', '.join(METHOD_NAMES[m] for m in cfg['seed_methods'])}, 1 for the others. "
               if cfg.get("seed_methods") and cfg.get("seeds", 1) > 1 else "1. ")
            + f"Evaluation: {e['size']} test images, eps {', '.join(f'{x * 255:.3g}' for x in e['eps_list'])} /255, "
            f"{e['steps']} steps per attack and budget; thickness {e['thickness_samples']} x {e['thickness_points']} "
            f"points at {e['eps'] * 255:.3g}/255; step check {e['check_steps']} steps on {e['check_size']} images; "
            f"paper-protocol attack ({e['paper_steps']} steps of {e['paper_step_size']}) on {e['paper_size']} images; "
            + (f"SmoothGrad ({e['smoothgrad_samples']} samples, sigma {e['smoothgrad_noise']}) and IG ({e['ig_steps']} "
               f"steps) under a {e['explainer_steps']}-step ERAttack on {e['explainer_size']} images; "
               if e["explainer_size"] else "no SmoothGrad/IG attacks; ")
            + f"PSE: {e['pse_steps']}-step targeted PGD (random target), {e['pse_group_size']} px groups, "
            f"{e['pse_size']} images; test accuracy on {e['test_acc_size']} images."
        )
    return lines


def render_markdown(results: dict, plot_files: dict[str, str], doc_path: Path, others: list[dict] | None = None) -> str:
    pre = results["preset"]
    hw = results["hardware"]
    rel = lambda p: os.path.relpath(p, doc_path.parent)  # noqa: E731
    md = [
        "# Reproduction study: does R2ET buy ranking robustness at equal accuracy?",
        "",
        f"*Generated by `benchmarks/reproduce` (preset `{pre['name']}`); every number below comes from "
        f"`{rel(results['json_path'])}`. Do not edit by hand: rerun the command, and put analysis in "
        f"`benchmarks/reproduce/notes/{pre['name']}.md`.*",
        "",
        "## Setup",
        "",
        f"- Preset `{pre['name']}`: {pre['description']}.",
        f"- Command: `{results['command']}`",
        f"- Hardware: {hw['cpu']} ({hw['cores']} cores visible, torch threads {hw['threads']}); "
        f"GPU: {hw['gpu'] or 'none'}; torch {hw['torch']}, lightning {hw['lightning']}, timm {hw['timm']}; "
        f"{hw['platform']}. Load average at start {hw['load_start']}, at end {hw.get('load_end', '–')}.",
        f"- Seed {results['seed']}. Wall time of this invocation {results['wall_seconds']:.0f} s; compute time of "
        f"all stages (from the stage records, also those reused from an earlier invocation) "
        f"{results['stage_seconds']:.0f} s.",
    ]
    if results.get("overrides"):
        md.append(f"- Overrides of the preset: `{' '.join(results['overrides'])}`")
    md += ["", "### Protocol", "", *_protocol(results), ""]

    notes = NOTES_DIR / f"{pre['name']}.md"
    md += ["## Findings", ""]
    md += [notes.read_text().strip(), ""] if notes.is_file() else [
        f"*No analysis notes yet (`benchmarks/reproduce/notes/{pre['name']}.md`).*", ""]

    for task_name, task in results["tasks"].items():
        md += [f"## {TASK_TITLES.get(task_name, task_name)}", ""]
        pre_run = task["pretrain"]
        pub = pre_run.get("published") or {}
        swap = pre_run.get("swap_val_acc") or {}
        start = []
        if pub:
            start.append(f"Published weights (`{Path(pub['weights_file']).name}`): test accuracy {_f(pub['test_acc'], 4)} on "
                         f"{pub['test_size']} test images before the adaptation; ")
        start.append(f"starting point of every fine-tune: test accuracy {_f(pre_run.get('test_acc'), 4)} "
                     f"({pre_run.get('test_size', '–')} images), val accuracy {_f(pre_run['sweep']['val_acc'], 4)}, "
                     f"{pre_run['train_seconds']:.0f} s of training ({pre_run['train_cpu_seconds']:.0f} CPU s).")
        if swap:
            start.append(" Its val accuracy with every ReLU swapped for Softplus(beta), before any fine-tuning: "
                         + ", ".join(f"beta {float(b):g}: {_f(a)}" for b, a in swap.items())
                         + f" (the Softplus fine-tunes use beta {task['config']['softplus_beta']:g}).")
        md += ["".join(start), "", *main_table(task), "",
               "Columns: *worst P@k* = per-image worst case over the ensemble and smaller budgets, mean over the "
               "images (± SE for one seed; for several seeds the mean over seeds and [min, max]); *noise* = uniform "
               "noise of the same budget; *Thickness* = Monte-Carlo top-k thickness (boundary pairs / all pairs); "
               "*Paper-protocol* = the R2ET reference attack (first flip, normalised-space l2 steps; an image "
               "whose first step flips the class counts as P@k 1, as in the reference code); "
               "*SmoothGrad/IG* = ERAttack on that explanation; *Fine-tune CPU s* of the selected run, "
               "*× vanilla* its ratio to the vanilla fine-tune.", ""]
        for key in ("pk_vs_acc", "pk_vs_eps", "thickness_vs_pk"):
            path = plot_files.get(f"{task_name}_{key}")
            if path:
                md.append(f"![{task_name} {key}]({rel(path)})")
        md.append("")
        comp = comparison_table(task)
        if comp:
            md += ["### Paired comparisons (R2ET minus each method, worst-case P@k)", "", *comp, "",
                   "Paired diff = the seed-averaged per-image difference, with its bootstrap interval over images; "
                   "the per-seed intervals pair R2ET seed s with the other method's seed s (its seed 0 when it has "
                   "one model). `*` after a per-budget difference: the seeds agree at that budget too.", ""]
        s = task_summary(task)
        rc = s["rank_correlation_thickness_p_at_k"]
        md += [f"Thickness–P@k rank correlation across the {len(task['eval'])} methods (seed 0, Spearman, worst-case P@k "
               f"at {_eps_label(_headline(task))}): boundary thickness {_f(rc['boundary'])}, all-pairs thickness "
               f"{_f(rc['all_pairs'])}.", ""]
        cost = cost_lines(task)
        if cost:
            md += ["### AT at the reference strength", "", *cost, ""]
        check = check_table(task)
        if check:
            md += ["### Is the attack strong enough? (step check at the headline budget)", "", *check, ""]
        md += ["### Which attack finds the worst case (seed 0, headline budget)", "", *attack_table(task), ""]
        seeds = seed_table(task)
        if seeds:
            md += ["### Training seeds", "", *seeds, ""]
        md += ["### Weight selection on the validation split", "", *sweep_table(task), ""]
        vs = val_sweep_table(task)
        if vs:
            md += ["### Why: the validation-only sweep", "",
                   "Variants of R2ET (and their SP / Est-H controls) fine-tuned from the same start on the same "
                   "images, scored on the validation split only (the sweep's images and attack); no test image "
                   "is used. The main-study rows are the selected points of their grids (the best val P@k of "
                   "several draws on the same images), so a variant needs a clear margin to count.", "", *vs, ""]
        pse = pse_table(task)
        if pse:
            md += ["### Promotion-suppression effect (targeted PGD)", "", *pse, ""]
        md += ["### Evaluation cost (seconds per model, seed 0)", "", *timing_table(task), ""]
    if others:
        md += ["## Rerun comparison", "", *compare_section(results, others)]
    return "\n".join(md)


def compare_section(results: dict, others: list[dict]) -> list[str]:
    """Rerun noise: the headline numbers of this run next to those of other runs (``--compare``)."""
    lines: list[str] = []
    for task_name, task in results["tasks"].items():
        runs = [o for o in others if task_name in o.get("tasks", {})]
        if not runs:
            continue
        head = _headline(task)
        metrics = (("test acc", lambda e: e["test_acc"]),
                   (f"worst P@k {_eps_label(head)}", lambda e: e["p_at_k"][WORST][head]["mean"]),
                   ("thickness", lambda e: e["thickness_boundary"]["mean"]))
        cols = " | ".join(f"{name}: this / other(s) / max abs diff" for name, _ in metrics)
        lines += [f"**{task_name}**. This run: {_run_label(results)}. Other runs: "
                  + "; ".join(_run_label(o) for o in runs) + ".", "", f"| Method | {cols} |", "|---|" + "---|" * len(metrics)]
        worst = {name: 0.0 for name, _ in metrics}
        for method, ev in task["eval"].items():
            cells = []
            for name, get in metrics:
                mine = get(ev)
                theirs = [get(o["tasks"][task_name]["eval"][method]) for o in runs if method in o["tasks"][task_name]["eval"]]
                diffs = [abs(mine - t) for t in theirs]
                if diffs:
                    worst[name] = max(worst[name], max(diffs))
                cells.append(f"{_f(mine)} / {' '.join(_f(t) for t in theirs)} / {_f(max(diffs) if diffs else None)}")
            lines.append(f"| {METHOD_NAMES[method]} | " + " | ".join(cells) + " |")
        lines += ["", "Largest difference over methods: " + ", ".join(f"{n} {_f(v)}" for n, v in worst.items()) + ".", ""]
    return lines


def _run_label(results: dict) -> str:
    hw = results.get("hardware", {})
    where = results.get("_source") or results.get("json_path")
    return f"seed {results.get('seed')}, {hw.get('threads', '?')} torch thread(s), torch {hw.get('torch', '?')}, `{where}`"


def write_study_report(results: dict, out_dir: Path, doc_path: Path, others: list[dict] | None = None) -> Path:
    """Plots into ``out_dir`` and the markdown at ``doc_path`` (``others``: results of reruns)."""
    plots = make_plots(results, out_dir)
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text(render_markdown(results, plots, doc_path, others))
    return doc_path
