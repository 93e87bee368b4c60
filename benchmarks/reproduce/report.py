"""docs/results.md and its plots, from the study's results JSON (nothing is typed in by hand).

The markdown holds: the setup (preset, hardware, the exact command), the main table per task, an
automatic check of the expected ordering (R2ET above Est-H, SP, WD and vanilla in ERAttack P@k at
similar accuracy, far cheaper than AT) with the standard errors, every sweep point, the curves as
tables, and links to the PNG plots (matplotlib, Agg backend) written next to the JSON. Free-text
analysis is read from ``benchmarks/reproduce/notes/<preset>.md`` when that file exists, so a
rerun regenerates the whole document.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from benchmarks.reproduce.presets import METHOD_NAMES

NOTES_DIR = Path(__file__).resolve().parent / "notes"
ORDER_BASELINES = ("est_h", "sp", "wd", "vanilla")


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


def _pk(ev: dict, key: str) -> dict | None:
    block = ev.get(key)
    return None if not block else block.get("p_at_k")


# ------------------------------------------------------------------------------------- tables
def main_table(task: dict) -> list[str]:
    runs, sel, evals = task["runs"], task["selection"], task["eval"]
    base_time = _cost(runs[sel["vanilla"]["run"]]) if "vanilla" in sel else None
    lines = [
        "| Method | Act. | Chosen | Val acc | Test acc | ER P@k | MSE P@k | ER Spearman | Thickness | "
        "SmoothGrad P@k | IG P@k | PSE sup / bal / pro | Fine-tune s (CPU s) | × vanilla |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, s in sel.items():
        ev, run = evals[method], runs[s["run"]]
        pse = ev.get("pse") or {}
        pse_txt = "–" if not pse else " / ".join(_f(pse.get(f"frac_{c}"), 2) for c in ("suppression", "balanced", "promotion"))
        t, c = run["train_seconds"], run["train_cpu_seconds"]
        ratio = f"{_cost(run) / base_time:.1f}" if base_time else "–"
        lines.append(
            f"| {METHOD_NAMES[method]} | {run['model_kwargs']['activation']} | {_value(s)} | "
            f"{_f(run['sweep']['val_acc'])} | {_f(ev['test_acc'])} | {_pm(_pk(ev, 'er'))} | "
            f"{_pm(_pk(ev, 'mse'))} | {_pm((ev.get('er') or {}).get('spearman'))} | "
            f"{_pm(ev.get('thickness'))} | {_pm(_pk(ev, 'smoothgrad'))} | "
            f"{_pm(_pk(ev, 'integrated_gradients'))} | {pse_txt} | {t:.0f} ({c:.0f}) | {ratio} |"
        )
    return lines


def relu_table(task: dict) -> list[str]:
    rows = []
    for method, ev in task["eval"].items():
        for name in ("er", "mse"):
            if f"{name}_surrogate" in ev:
                rows.append(
                    f"| {METHOD_NAMES[method]} | {name.upper()} | {_pm(_pk(ev, name + '_direct'))} | "
                    f"{_pm(_pk(ev, name + '_surrogate'))} | {_pm(_pk(ev, name))} | "
                    f"{_f((ev[name].get('surrogate_wins') or {}).get('mean'), 2)} |"
                )
    if not rows:
        return []
    return [
        "| Model | Attack | direct P@k | Softplus-surrogate P@k | per-image worse (reported) | share where the surrogate was worse |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


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


def curve_tables(task: dict) -> list[str]:
    evals = task["eval"]
    out: list[str] = []
    first = next(iter(evals.values()))
    if first.get("eps_curve"):
        eps = [row["eps"] for row in first["eps_curve"]]
        out += [
            f"P@k vs eps (ERAttack, {task['config']['eval']['eps_curve_steps']} steps; in brackets uniform noise of the same "
            f"budget), first {first['sizes']['eps_curve']} images:",
            "",
            "| Method | " + " | ".join(f"{e * 255:.3g}/255" for e in eps) + " |",
            "|---|" + "---|" * len(eps),
        ]
        for method, ev in evals.items():
            cells = [f"{_f(r['er']['mean'])} ({_f(r['noise']['mean'])})" for r in ev["eps_curve"]]
            out.append(f"| {METHOD_NAMES[method]} | " + " | ".join(cells) + " |")
        out.append("")
    if first.get("steps_curve"):
        steps = [row["steps"] for row in first["steps_curve"]]
        out += [
            f"P@k vs ERAttack steps (eps {task['config']['eval']['eps'] * 255:.3g}/255), first "
            f"{first['sizes']['steps_curve']} images:",
            "",
            "| Method | " + " | ".join(str(s) for s in steps) + " |",
            "|---|" + "---|" * len(steps),
        ]
        for method, ev in evals.items():
            out.append(f"| {METHOD_NAMES[method]} | " + " | ".join(_f(r["er"]["mean"]) for r in ev["steps_curve"]) + " |")
        out.append("")
    return out


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


# ------------------------------------------------------------------------------------- checks
def ordering_check(task: dict) -> list[str]:
    """Plain statements of whether R2ET beats each baseline in ER P@k (2 SE rule) and its cost vs AT."""
    ev, sel, runs = task["eval"], task["selection"], task["runs"]
    if "r2et" not in ev:
        return []
    r = _pk(ev["r2et"], "er")
    r_acc = ev["r2et"]["test_acc"]
    lines = []
    for base in ORDER_BASELINES:
        if base not in ev:
            continue
        b = _pk(ev[base], "er")
        diff = r["mean"] - b["mean"]
        se = math.sqrt((r.get("se") or 0.0) ** 2 + (b.get("se") or 0.0) ** 2)
        if diff > 2 * se:
            verdict = "**holds** (R2ET higher by more than 2 SE)"
        elif diff < -2 * se:
            verdict = "**does not hold: R2ET is lower** (by more than 2 SE)"
        else:
            verdict = "**not resolved**: the difference is within 2 SE (noise)"
        acc_diff = 100 * (r_acc - ev[base]["test_acc"])
        lines.append(
            f"- R2ET vs {METHOD_NAMES[base]}: ER P@k {_f(r['mean'])} vs {_f(b['mean'])} "
            f"(diff {diff:+.3f}, 2 SE = {2 * se:.3f}) -> {verdict}; test accuracy difference {acc_diff:+.1f} points."
        )
        mse_r, mse_b = _pk(ev["r2et"], "mse"), _pk(ev[base], "mse")
        if mse_r and mse_b:
            lines[-1] += f" Under the MSE attack: {_f(mse_r['mean'])} vs {_f(mse_b['mean'])}."
    if "at" in sel and "r2et" in sel:
        t_at, t_r = _cost(runs[sel["at"]["run"]]), _cost(runs[sel["r2et"]["run"]])
        a = _pk(ev["at"], "er")
        lines.append(
            f"- Cost vs AT (CPU s on CPU, wall s on GPU): R2ET fine-tune {t_r:.0f} s, AT {t_at:.0f} s (AT / R2ET = {t_at / max(t_r, 1e-9):.2f}); "
            f"ER P@k R2ET {_f(r['mean'])} vs AT {_f(a['mean'])}. "
            + ("AT is **not** far more expensive here: its training attack has only "
               f"{task['config']['at_steps']} steps." if t_at < 2 * t_r else "AT is the more expensive one, as expected.")
        )
    return lines


# ------------------------------------------------------------------------------------- plots
def make_plots(results: dict, out_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for task_name, task in results["tasks"].items():
        ev = task["eval"]
        prefix = f"{task_name}_"
        # P@k vs accuracy
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for method, e in ev.items():
            er, mse = _pk(e, "er"), _pk(e, "mse")
            acc = 100 * e["test_acc"]
            bars = ax.errorbar(acc, er["mean"], yerr=er.get("se") or 0, fmt="o", capsize=3, label=f"{METHOD_NAMES[method]}")
            color = bars[0].get_color()
            if mse:
                ax.plot(acc, mse["mean"], marker="s", mfc="none", color=color, ls="none")
            ax.annotate(METHOD_NAMES[method], (acc, er["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("test accuracy (%)")
        ax.set_ylabel("P@k after attack (o ERAttack, □ MSE)")
        ax.set_title(f"{task_name}: ranking robustness vs accuracy")
        ax.grid(alpha=0.3)
        files[prefix + "pk_vs_acc"] = _save(fig, out_dir / f"{prefix}pk_vs_acc.png")
        # P@k vs steps
        if all(e.get("steps_curve") for e in ev.values()):
            fig, ax = plt.subplots(figsize=(6, 4.5))
            for method, e in ev.items():
                xs = [0] + [r["steps"] for r in e["steps_curve"]]
                ys = [1.0] + [r["er"]["mean"] for r in e["steps_curve"]]
                ax.plot(xs, ys, marker="o", label=METHOD_NAMES[method])
            ax.set_xlabel("ERAttack steps")
            ax.set_ylabel("P@k")
            ax.set_title(f"{task_name}: P@k vs attack steps")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            files[prefix + "pk_vs_steps"] = _save(fig, out_dir / f"{prefix}pk_vs_steps.png")
        # thickness vs P@k
        if all(e.get("thickness") for e in ev.values()):
            fig, ax = plt.subplots(figsize=(6, 4.5))
            for method, e in ev.items():
                th, er = e["thickness"], _pk(e, "er")
                ax.errorbar(th["mean"], er["mean"], xerr=th.get("se") or 0, yerr=er.get("se") or 0, fmt="o", capsize=3)
                ax.annotate(METHOD_NAMES[method], (th["mean"], er["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax.set_xlabel("top-k thickness (Monte-Carlo)")
            ax.set_ylabel("ERAttack P@k")
            ax.set_title(f"{task_name}: thickness vs P@k")
            ax.grid(alpha=0.3)
            files[prefix + "thickness_vs_pk"] = _save(fig, out_dir / f"{prefix}thickness_vs_pk.png")
        # P@k vs eps
        if all(e.get("eps_curve") for e in ev.values()):
            fig, ax = plt.subplots(figsize=(6, 4.5))
            for method, e in ev.items():
                xs = [r["eps"] * 255 for r in e["eps_curve"]]
                line = ax.plot(xs, [r["er"]["mean"] for r in e["eps_curve"]], marker="o", label=METHOD_NAMES[method])[0]
                ax.plot(xs, [r["noise"]["mean"] for r in e["eps_curve"]], ls="--", color=line.get_color(), alpha=0.5)
            ax.set_xlabel("eps (x 1/255)")
            ax.set_ylabel("P@k (solid ERAttack, dashed uniform noise)")
            ax.set_title(f"{task_name}: P@k vs budget")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            files[prefix + "pk_vs_eps"] = _save(fig, out_dir / f"{prefix}pk_vs_eps.png")
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
        "- **Workflow.** One vanilla ReLU model is pretrained (SGD + Nesterov, cosine schedule, weight decay), "
        "then every method is fine-tuned from that checkpoint with `RobustClassifier(init_from=...)` for the "
        "same number of epochs on the same images, with the same optimizer (SGD lr as below, no weight decay "
        "except for WD). Training runs through `lightning.Trainer` on the project's DataModules.",
        "- **Activations.** Vanilla and WD keep ReLU. SP swaps ReLU for Softplus(beta) and trains with CE. "
        "Every regularizer (Est-H, Grad-norm, R2ET\\H, R2ET, R2ET-mm) and AT fine-tune the same Softplus "
        "network, as the paper fine-tunes R2ET with Softplus; so SP is the control for the activation swap.",
        "- **Weights.** R2ET family and Est-H: adaptive weights `lambda = w (CE + 1) / |R|`; Grad-norm: "
        "`w ||g||^2`; WD: the optimizer's weight decay; SP: beta; AT: the training attack's eps. "
        "Each value is chosen on the validation split (sweep table below): the highest val P@k under a short "
        "ERAttack among the values whose val accuracy is at most the floor below vanilla's.",
        "- **Evaluation.** Fixed class-balanced test subset, model in eval mode, explained scalar = CE with "
        "the true label, all images counted. P@k = overlap of the clean and attacked top-k sets. ERAttack and "
        "the MSE attack keep the prediction (a sample whose class flips keeps its last unflipped iterate). "
        "For ReLU models the attacks listed in `relu_surrogate` are also run through a Softplus copy "
        "(`surrogate_beta`) and each image keeps the worse result (second table). `±` is one standard error "
        "over images (sampling noise of the subset, not training noise).",
    ]
    for task_name, cfg in pre["tasks_cfg"].items():
        e = cfg["eval"]
        lines.append(
            f"- **{task_name} preset numbers.** {cfg['backbone']} {cfg['backbone_kwargs']} at {cfg['image_size']} px"
            f"{', saliency pooled ' + str(cfg['pool']) + 'x' + str(cfg['pool']) if cfg['pool'] else ''}, k = {cfg['k']}; "
            f"pretrain {cfg['pretrain_epochs']} epochs on {cfg['train_size']} train images (lr {cfg['pretrain_lr']}); "
            f"fine-tune {cfg['finetune_epochs']} epoch(s) on {cfg['finetune_size'] or cfg['train_size']} of them "
            f"(lr {cfg['finetune_lr']}), batch {cfg['batch_size']}; val accuracy on {cfg['val_size']} images, "
            + (f"sweep P@k on {cfg['sweep_eval_size']} val images with a {cfg['sweep_attack_steps']}-step ERAttack; "
               if cfg["sweep_eval_size"] else "no sweep P@k; ")
            + f"floor {cfg['accuracy_floor']} points; Softplus beta {cfg['softplus_beta']:g}. Evaluation: {e['size']} test images, eps {e['eps'] * 255:.3g}/255, "
            f"{e['attack_steps']}-step ERAttack and MSE attack; thickness {e['thickness_samples']} x "
            f"{e['thickness_points']} points on {e['thickness_size']} images; "
            + (f"SmoothGrad ({e['smoothgrad_samples']} samples, sigma {e['smoothgrad_noise']}) and IG ({e['ig_steps']} "
               f"steps) attacked with {e['explainer_steps']}-step ERAttack on {e['explainer_size']} images; "
               if e["explainer_size"] else "no SmoothGrad/IG attacks; ")
            + f"PSE: {e['pse_steps']}-step "
            f"targeted PGD (random target), {e['pse_group_size']} px groups, {e['pse_size']} images; test "
            f"accuracy on {e['test_acc_size']} images. ReLU models: {', '.join(e['relu_surrogate']) or 'no'} attack(s) "
            f"also through Softplus({e['surrogate_beta']:g}). AT trains with a {cfg['at_steps']}-step ERAttack."
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
        f"{hw['platform']}. Load average at start {hw['load_start']}, at end {hw.get('load_end', '–')} "
        "(other processes on the machine slow every timing down).",
        f"- Seed {results['seed']}. Wall time of this invocation {results['wall_seconds']:.0f} s; compute time of "
        f"all stages (training + sweep + evaluation, from the stage records, also those reused from an "
        f"earlier invocation) {results['stage_seconds']:.0f} s.",
    ]
    if results.get("overrides"):
        md.append(f"- Overrides of the preset: `{' '.join(results['overrides'])}`")
    md += ["", "### Protocol", "", *_protocol(results), ""]

    for task_name, task in results["tasks"].items():
        md += [f"## {TASK_TITLES.get(task_name, task_name)}", ""]
        pre_run = task["pretrain"]
        swap = pre_run.get("swap_val_acc") or {}
        swap_txt = (
            " Its val accuracy with every ReLU swapped for Softplus(beta), before any fine-tuning: "
            + ", ".join(f"beta {float(b):g}: {_f(a)}" for b, a in swap.items())
            + f" (the Softplus fine-tunes use beta {task['config']['softplus_beta']:g})."
        ) if swap else ""
        md += [
            f"Pretrained vanilla model: val accuracy {_f(pre_run['sweep']['val_acc'])}, "
            f"{pre_run['train_seconds']:.0f} s of training ({pre_run['train_cpu_seconds']:.0f} CPU s).{swap_txt}",
            "",
            *main_table(task),
            "",
            "Columns: *Chosen* = the selected weight; *ER/MSE P@k* under the main attacks; *ER Spearman* = "
            "rank correlation on the union of both top-k sets; *Thickness* = Monte-Carlo top-k thickness; "
            "*SmoothGrad/IG P@k* = ERAttack on that explanation, P@k of the same explanation; *PSE* = shares "
            "of successful targeted-PGD perturbations that are suppression-dominated / balanced / "
            "promotion-dominated; *Fine-tune s* = wall-clock training time of the selected run (process CPU "
            "seconds in brackets); *× vanilla* = cost ratio to the vanilla fine-tune (CPU seconds on CPU, "
            "wall seconds on GPU).",
            "",
        ]
        if pre_run is not None and any(p.startswith(task_name + "_") for p in plot_files):
            for key in ("pk_vs_acc", "pk_vs_steps", "thickness_vs_pk", "pk_vs_eps"):
                path = plot_files.get(f"{task_name}_{key}")
                if path:
                    md.append(f"![{task_name} {key}]({rel(path)})")
            md.append("")
        check = ordering_check(task)
        if check:
            md += ["### Expected ordering (automatic check, ERAttack P@k)", "", *check, ""]
        relu = relu_table(task)
        if relu:
            md += ["### ReLU models: direct vs Softplus-surrogate attack", "", *relu, ""]
        md += ["### Weight selection on the validation split", "", *sweep_table(task), ""]
        curves = curve_tables(task)
        if curves:
            md += ["### Curves", "", *curves]
        pse = pse_table(task)
        if pse:
            md += ["### Promotion-suppression effect (targeted PGD)", "", *pse, ""]
        md += ["### Evaluation cost (seconds per model)", "", *timing_table(task), ""]

    notes = NOTES_DIR / f"{pre['name']}.md"
    md += ["## Analysis", ""]
    if notes.is_file():
        md += [notes.read_text().strip(), ""]
    else:
        md += [f"*No analysis notes yet (`benchmarks/reproduce/notes/{pre['name']}.md`).*", ""]
    md += [
        "## Noise",
        "",
        "The `±` columns are standard errors over the evaluation images. Training noise (another seed) is "
        "not in them. To measure it, rerun into another folder (same seed: run-to-run noise; `--seed 1`: "
        "training-seed noise) and render with `--compare <other results JSON>`, which adds the table below.",
        "",
    ]
    if others:
        md += ["### Rerun comparison", "", *compare_section(results, others)]
    return "\n".join(md)


def compare_section(results: dict, others: list[dict]) -> list[str]:
    """Rerun noise: the headline numbers of this run next to those of other runs (``--compare``)."""
    lines: list[str] = []
    metrics = (("test acc", lambda e: e["test_acc"]), ("ER P@k", lambda e: _pk(e, "er")["mean"]),
               ("MSE P@k", lambda e: _pk(e, "mse")["mean"]),
               ("thickness", lambda e: (e.get("thickness") or {}).get("mean")))
    for task_name, task in results["tasks"].items():
        runs = [o for o in others if task_name in o.get("tasks", {})]
        if not runs:
            continue
        head = " | ".join(f"{name}: this / other(s) / max abs diff" for name, _ in metrics)
        lines += [f"**{task_name}**. This run: {_run_label(results)}. Other runs: "
                  + "; ".join(_run_label(o) for o in runs) + ".", "",
                  f"| Method | {head} |", "|---|" + "---|" * len(metrics)]
        worst = {name: 0.0 for name, _ in metrics}
        for method, ev in task["eval"].items():
            cells = []
            for name, get in metrics:
                mine = get(ev)
                theirs = [get(o["tasks"][task_name]["eval"][method]) for o in runs if method in o["tasks"][task_name]["eval"]]
                diffs = [abs(mine - t) for t in theirs if mine is not None and t is not None]
                if diffs:
                    worst[name] = max(worst[name], max(diffs))
                cells.append(f"{_f(mine)} / {' '.join(_f(t) for t in theirs)} / {_f(max(diffs) if diffs else None)}")
            lines.append(f"| {METHOD_NAMES[method]} | " + " | ".join(cells) + " |")
        lines += ["", "Largest difference over methods: " + ", ".join(f"{n} {_f(v)}" for n, v in worst.items()) + ".", ""]
        lines += _ordering_across_runs(task_name, [results, *runs])
    return lines


def _run_label(results: dict) -> str:
    """seed, torch threads and version, and where the results JSON is."""
    hw = results.get("hardware", {})
    where = results.get("_source") or results.get("json_path")
    return (f"seed {results.get('seed')}, {hw.get('threads', '?')} torch thread(s), "
            f"torch {hw.get('torch', '?')}, `{where}`")


def _ordering_across_runs(task_name: str, runs: list[dict]) -> list[str]:
    """R2ET minus each baseline in ER P@k, run by run: does the sign survive a rerun?"""
    evals = [r["tasks"][task_name]["eval"] for r in runs]
    if not all("r2et" in ev for ev in evals):
        return []
    lines = ["R2ET minus each baseline in ER P@k, run by run (this run first):", "",
             "| Baseline | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " | mean | min | max |",
             "|---|" + "---|" * (len(runs) + 3)]
    for base in ORDER_BASELINES:
        diffs = [_pk(ev["r2et"], "er")["mean"] - _pk(ev[base], "er")["mean"] for ev in evals if base in ev]
        if len(diffs) != len(evals):
            continue
        lines.append(f"| {METHOD_NAMES[base]} | " + " | ".join(f"{d:+.3f}" for d in diffs)
                     + f" | {sum(diffs) / len(diffs):+.3f} | {min(diffs):+.3f} | {max(diffs):+.3f} |")
    return lines + [""]


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


def write_report(results: dict, out_dir: Path, doc_path: Path, others: list[dict] | None = None) -> Path:
    """Plots into ``out_dir`` and the markdown at ``doc_path`` (``others``: results of reruns)."""
    plots = make_plots(results, out_dir)
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text(render_markdown(results, plots, doc_path, others))
    return doc_path
