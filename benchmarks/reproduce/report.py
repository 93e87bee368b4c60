"""docs/results.md and its plots, from the frontier study's results JSON (nothing typed in by hand).

The markdown holds: the setup (preset, hardware, the exact command, the data split), the
findings (generated from the matched rows: every sentence names its table row and interval),
the matched comparisons per budget (1/255 and 2/255 first, then 8/255, the paper protocol and
4/255), the frontier table (seed means with their ranges, the seed count on every column), every
model, AT's measured training perturbation, the plan (matched accuracies and near settings), the
thickness rank correlation across models and the cost. The plots (matplotlib, Agg backend; P@k
against validation accuracy with intervals, one per budget) are written next to the JSON.
Hand-written analysis is read from ``benchmarks/reproduce/notes/<preset>.md`` when that file
exists, under its own heading. :func:`summary` is the compact machine-readable block stored in
the results JSON.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from benchmarks.reproduce.presets import METHOD_NAMES

NOTES_DIR = Path(__file__).resolve().parent / "notes"
PAPER = "paper"
#: What the gap term's own effect is read from (a minus b differ only by the gap term).
GAP_PAIRS = {("r2et", "est_h"): "the gap term added to the curvature term",
             ("r2et_noh", "sp"): "the gap term alone, on the SP network"}


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def _d(x: Any) -> str:
    return "–" if x is None else f"{x:+.3f}"


def budget_order(budgets: list[str]) -> list[str]:
    """The report's order: 1/255 and 2/255 (nearest the reference threat model) first, then 8/255
    (the large-budget check), the paper protocol, then the rest."""
    first = [b for b in ("1/255", "2/255", "8/255", PAPER) if b in budgets]
    return first + [b for b in budgets if b not in first]


def _budget_name(b: str) -> str:
    return "the paper protocol" if b == PAPER else b


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def _over_seeds(values: list[float | None], digits: int = 3) -> str:
    """Mean over training seeds with [min, max]."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return _f(mean, digits)
    return f"{_f(mean, digits)} [{_f(min(values), digits)}, {_f(max(values), digits)}]"


def _pair_name(key: str) -> tuple[str, str]:
    a, b = key.split("_vs_")
    return METHOD_NAMES[a], METHOD_NAMES[b]


def _budgets(task: dict) -> list[str]:
    for block in task["frontier"].values():
        for seeds in block["settings"].values():
            for row in seeds.values():
                return list(row["p_at_k_worst"]) + ([PAPER] if row.get("p_at_k_paper") is not None else [])
    return []


def _value(row: dict, budget: str) -> float | None:
    return row["p_at_k_paper"] if budget == PAPER else row["p_at_k_worst"].get(budget)


# ------------------------------------------------------------------------------------- verdicts
def dominance(rows: list[dict], a: str, b: str) -> str:
    """Which curve is above over the matched accuracies both reach, from the rows' intervals:
    "a above b at every matched accuracy" needs every interval above 0, and so on."""
    if not rows:
        return "no matched accuracy that both curves reach"
    signs = [r["sign"] for r in rows]
    agree = all(r["seeds_agree"] for r in rows)
    n = len(rows)
    where = "its accuracy" if n == 1 else f"all {n} compared accuracies"
    if all(s == 1 for s in signs):
        return f"{a} above {b} at {where}" + (" (every seed too)" if agree else " (not in every seed)")
    if all(s == -1 for s in signs):
        return f"{b} above {a} at {where}" + (" (every seed too)" if agree else " (not in every seed)")
    if all(s == 0 for s in signs):
        return f"not resolved at {where} (every interval contains 0)"
    parts = [f"{a} above at {sum(s == 1 for s in signs)}", f"{b} above at {sum(s == -1 for s in signs)}",
             f"not resolved at {sum(s == 0 for s in signs)}"]
    return "mixed: " + ", ".join(parts) + f" of {n} compared accuracies"


def _row_text(r: dict) -> str:
    star = "*" if r["seeds_agree"] else ""
    where = f" ({r['at_setting']})" if r.get("at_setting") else ""
    return f"{_d(r['paired_diff'])} [{_d(r['ci_low'])}, {_d(r['ci_high'])}]{star} at {_f(r['accuracy'], 4)}{where}"


# ------------------------------------------------------------------------------------- summary
def summary(task: dict) -> dict[str, Any]:
    """The machine-readable block of a task: per method and setting the seed means of
    ``val_acc``, ``test_acc``, ``p_at_k_worst`` (by budget) and ``p_at_k_paper`` with the seed
    count; per matched pair and budget the rows (``accuracy``, ``paired_diff``, ``ci_low``,
    ``ci_high``, ``seeds_agree``) and the ``verdict`` (:func:`dominance`)."""
    methods: dict[str, Any] = {}
    for method, block in task["frontier"].items():
        methods[method] = {}
        for label, seeds in block["settings"].items():
            rows = list(seeds.values())
            methods[method][label] = {
                "seeds": len(rows), "val_acc": _mean([r["val_acc"] for r in rows]),
                "test_acc": _mean([r["test_acc"] for r in rows]),
                "p_at_k_worst": {b: _mean([r["p_at_k_worst"][b] for r in rows]) for b in rows[0]["p_at_k_worst"]},
                "p_at_k_paper": _mean([r["p_at_k_paper"] for r in rows]),
            }
    matched: dict[str, Any] = {}
    for key, pair in task["matched"].items():
        a, b = _pair_name(key)
        matched[key] = {budget: {"rows": [{k: r[k] for k in ("accuracy", "paired_diff", "ci_low", "ci_high", "seeds_agree")}
                                          for r in block["rows"]],
                                 "verdict": dominance(block["rows"], a, b)}
                        for budget, block in pair["by_budget"].items()}
    return {"methods": methods, "matched": matched, "plan": task.get("plan"),
            "thickness_correlation": task.get("thickness_correlation")}


# ------------------------------------------------------------------------------------- findings
def findings(task: dict) -> list[str]:
    """Every sentence from a matched row (with its interval) or a frontier row."""
    budgets = budget_order(_budgets(task))
    head = [b for b in budgets if b in ("1/255", "2/255", "8/255", PAPER)]
    plan = task.get("plan") or {}
    lines = [
        f"Differences are a minus b in mean worst-case P@{task['config']['k']} on the same "
        f"{task['split']['attack']} test images, at the same validation accuracy (interpolated on each curve), with "
        "95% intervals from a bootstrap over images and training seeds; `*`: every seed's own interval excludes 0 on "
        "the same side. \"Above\" means more robust explanations.",
    ]
    for key, pair in task["matched"].items():
        a, b = _pair_name(key)
        gap = GAP_PAIRS.get((pair["a"], pair["b"]))
        what = f" ({gap})" if gap else (" (at the anchor's own accuracy)" if pair["anchor"] else "")
        parts = []
        for budget in head:
            block = pair["by_budget"].get(budget)
            if block is None:
                continue
            rows = block["rows"]
            nums = "; ".join(_row_text(r) for r in rows) if rows else "–"
            parts.append(f"{_budget_name(budget)}: {dominance(rows, a, b)} ({nums})")
        lines.append(f"- **{a} − {b}**{what}. " + ". ".join(parts) + ".")
    gap_lines = []
    for (a_m, b_m), what in GAP_PAIRS.items():
        pair = task["matched"].get(f"{a_m}_vs_{b_m}")
        if not pair:
            continue
        for budget in ("1/255", "2/255"):
            rows = (pair["by_budget"].get(budget) or {}).get("rows") or []
            if not rows:
                continue
            mid = rows[len(rows) // 2]
            sign = {1: "raises", -1: "lowers", 0: "does not resolvably change"}[mid["sign"]]
            gap_lines.append(
                f"{what} ({METHOD_NAMES[a_m]} − {METHOD_NAMES[b_m]}) {sign} worst-case P@k at {budget}: "
                f"{_row_text(mid)} (the middle matched accuracy)")
    if gap_lines:
        lines.append("- **The gap term's own effect.** " + "; ".join(gap_lines) + ".")
    at = task["frontier"].get("at")
    if at:
        first = next(iter(at["settings"].values()))
        l2 = _mean([r["attack_l2"] for r in first.values()])
        linf = _mean([r["attack_linf"] for r in first.values()])
        flipped = _mean([r["attack_flipped"] for r in first.values()])
        lines.append(
            f"- **AT at the reference strength** ({at['order'][0]} normalised units, one step): its kept training "
            f"perturbations measure pixel l2 {_f(l2)} and l_inf {_f(None if linf is None else linf * 255, 2)}/255 on "
            f"average over the last epoch, {_f(None if flipped is None else 100 * flipped, 1)}% of its training "
            "attacks flipped the prediction (the AT table).")
    tc = task.get("thickness_correlation") or {}
    if tc.get("models"):
        lines.append(f"- **Thickness and robustness.** Across the {tc['models']} evaluated models (every training seed "
                     f"of every setting, each one model), Spearman's rank correlation of boundary thickness and "
                     f"worst-case P@k at {tc['eps']} is {_f(tc['boundary'])} (all-pairs thickness {_f(tc['all_pairs'])}).")
    if plan.get("accuracies"):
        lines.append(f"- The matched accuracies ({', '.join(_f(x, 4) for x in plan['accuracies'])}) are "
                     f"{', '.join(f'{d:g}' for d in plan['drops_points'])} points below the seed-mean validation "
                     f"accuracy of {METHOD_NAMES[plan['reference_method']]}'s weakest setting ({_f(plan['reference'], 4)}), "
                     "chosen from validation accuracies only.")
    return lines


# ------------------------------------------------------------------------------------- tables
def matched_table(task: dict, budget: str) -> list[str]:
    lines = ["| a − b | val accuracy | where | a (seed-mean curve) | b (seed-mean curve) | a − b (seed-mean curves) "
             "[95% interval, images and seeds] | per-seed intervals (each seed's own curves) | seeds agree | "
             "replicates kept |", "|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for key, pair in task["matched"].items():
        a, b = _pair_name(key)
        block = pair["by_budget"].get(budget)
        if block is None:
            continue
        for r in block["rows"]:
            seeds = "; ".join(f"s{s}: [{_d(d['ci_low'])}, {_d(d['ci_high'])}]" for s, d in sorted(r["per_seed"].items()))
            where = f"{b} {r['at_setting']}" if r.get("at_setting") else "matched grid"
            lines.append(f"| {a} − {b} | {_f(r['accuracy'], 4)} | {where} | {_f(r['value_a'])} | {_f(r['value_b'])} | "
                         f"{_d(r['paired_diff'])} [{_d(r['ci_low'])}, {_d(r['ci_high'])}] | {seeds or '–'} | "
                         f"{'yes' if r['seeds_agree'] else 'no'} | {_f(r['defined'], 2)} |")
        missing = block["out_of_range"]
        verdicts.append(f"- {a} − {b}: {dominance(block['rows'], a, b)}"
                        + (f"; not reached by a curve: {', '.join(m if isinstance(m, str) else _f(m, 4) for m in missing)}"
                           if missing else "") + ".")
    return lines + [""] + verdicts


def frontier_table(task: dict) -> list[str]:
    budgets = budget_order(_budgets(task))
    lines = ["| Method | Setting | seeds | val acc (seed mean [min, max]) | test acc (seed mean [min, max]) | "
             + " | ".join(f"worst P@k {b} (seed mean [min, max])" if b != PAPER else "paper-protocol P@k (seed mean [min, max])"
                          for b in budgets)
             + " | thickness, boundary (seed mean) | fine-tune s (seed mean) |",
             "|---|---|---|---|---|" + "---|" * len(budgets) + "---|---|"]
    for method, block in task["frontier"].items():
        if block.get("start"):
            lines.append(f"| {METHOD_NAMES[method]} | w = 0: the {block['start']} run | | | | " + " | " * len(budgets) + " | |")
        for label in block["order"]:
            rows = list(block["settings"][label].values())
            lines.append(
                f"| {METHOD_NAMES[method]} | {label} | {len(rows)} | {_over_seeds([r['val_acc'] for r in rows], 4)} | "
                f"{_over_seeds([r['test_acc'] for r in rows], 4)} | "
                + " | ".join(_over_seeds([_value(r, b) for r in rows]) for b in budgets)
                + f" | {_f(_mean([r['thickness_boundary'] for r in rows]), 4)} | {_f(_mean([r['train_seconds'] for r in rows]), 0)} |")
    return lines


def models_table(task: dict) -> list[str]:
    budgets = budget_order(_budgets(task))
    lines = ["| Method | Setting | training seed | val acc | test acc | "
             + " | ".join(f"worst P@k {b}" if b != PAPER else "paper P@k" for b in budgets) + " |",
             "|---|---|---|---|---|" + "---|" * len(budgets)]
    for method, block in task["frontier"].items():
        for label in block["order"]:
            for seed, r in sorted(block["settings"][label].items(), key=lambda kv: int(kv[0])):
                lines.append(f"| {METHOD_NAMES[method]} | {label} | {seed} | {_f(r['val_acc'], 4)} | {_f(r['test_acc'], 4)} | "
                             + " | ".join(_f(_value(r, b)) for b in budgets) + " |")
    return lines


def at_table(task: dict) -> list[str]:
    at = task["frontier"].get("at")
    if not at:
        return []
    lines = ["| AT setting (normalised units) | seeds | pixel l2 of the training perturbation | pixel l_inf (/255) | "
             "share of training attacks that flipped | fine-tune s |", "|---|---|---|---|---|---|"]
    for label in at["order"]:
        rows = list(at["settings"][label].values())
        linf = [None if r["attack_linf"] is None else r["attack_linf"] * 255 for r in rows]
        lines.append(f"| {label} | {len(rows)} | {_over_seeds([r['attack_l2'] for r in rows])} | {_over_seeds(linf, 2)} | "
                     f"{_over_seeds([r['attack_flipped'] for r in rows])} | {_f(_mean([r['train_seconds'] for r in rows]), 0)} |")
    return lines + ["", "Perturbation sizes are the AT objective's logged `attack_l2` / `attack_linf` of x_adv - x "
                        "(mean over the last epoch's batches of the batch means; seed mean [min, max]); a flipped "
                        "attack trains on the clean image (zero travel)."]


def plan_lines(task: dict) -> list[str]:
    plan = task.get("plan") or {}
    if not plan.get("near"):
        return []
    near = "; ".join(f"{METHOD_NAMES[m]}: {', '.join(_label(task, m, v) for v in vs)}" for m, vs in plan["near"].items())
    short = ", ".join(METHOD_NAMES[m] for m in plan.get("short", []))
    return [f"Near settings (trained with {task['config']['near_seeds']} seeds; the others with {task['config']['seeds']}): "
            f"{near}. A setting is near when it is one end of the first segment of its method's seed-mean curve "
            "(first seeds, validation accuracy) that brackets a matched accuracy; anchors are near, and so is every "
            "setting of a curve that brackets fewer than two matched accuracies (short: "
            f"{short or 'none'}), which is also compared at each of its own settings' accuracies."]


def _label(task: dict, method: str, value) -> str:
    from benchmarks.reproduce.pipeline import setting_label

    return setting_label(method, value)


def cost_lines(results: dict, task: dict) -> list[str]:
    est = task.get("estimate_seconds") or {}
    train = sum(r["train_seconds"] for r in task["runs"].values()) + task["pretrain"]["train_seconds"]
    ev = sum(e.get("eval_seconds", 0.0) for e in task["eval"].values())
    return [f"- Cost model before the run (`presets.estimate`, near seeds at their upper bound): "
            f"{_f(est.get('total', 0) / 3600, 2)} h. Measured: training {train:.0f} s, evaluation {ev:.0f} s, "
            f"all stages {results['stage_seconds']:.0f} s; this invocation {results['wall_seconds']:.0f} s wall."]


# ------------------------------------------------------------------------------------- plots
def make_plots(results: dict, out_dir: Path) -> dict[str, str]:
    """One plot per budget: worst-case (or paper-protocol) P@k against validation accuracy, one
    line per method through its settings' seed means in order of strength (a regularizer's line
    starts at the SP run it shares), error bars: 95% interval of the seed-mean P@k over images
    (1.96 SE of the per-image seed means, vertical) and the seeds' accuracy range (horizontal)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for task_name, task in results["tasks"].items():
        budgets = budget_order(_budgets(task))
        for budget in budgets:
            fig, ax = plt.subplots(figsize=(7, 5))
            for i, (method, block) in enumerate(task["frontier"].items()):
                xs, ys, xerr, yerr = [], [], [], []
                labels = ([("sp", block["start"].split(" ", 1)[1])] if block.get("start") else []) + \
                    [(method, label) for label in block["order"]]
                for m, label in labels:
                    seeds = task["frontier"][m]["settings"].get(label)
                    if not seeds:
                        continue
                    rows = list(seeds.values())
                    accs = [r["val_acc"] for r in rows]
                    xs.append(100 * sum(accs) / len(accs))
                    xerr.append(50 * (max(accs) - min(accs)))
                    per_image = _seed_mean_per_image(task, [r["run"] for r in rows], budget)
                    ys.append(sum(per_image) / len(per_image))
                    yerr.append(1.96 * _se(per_image))
                style = "-o" if len(xs) > 1 else "s"
                ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt=style, capsize=2, color=f"C{i % 10}",
                            label=METHOD_NAMES[method], alpha=0.9, ms=4)
            for acc in (task.get("plan") or {}).get("accuracies", []):
                ax.axvline(100 * acc, color="grey", ls=":", lw=0.8)
            ax.set_xlabel("validation accuracy (%), seed mean (bars: seed range)")
            what = "paper-protocol P@k" if budget == PAPER else f"worst-case P@k at {budget}"
            ax.set_ylabel(f"{what} (seed mean, 95% interval over images)")
            ax.set_title(f"{task_name}: {what} against accuracy (dotted: matched accuracies)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            key = f"{task_name}_frontier_{budget.replace('/', '_')}"
            files[key] = _save(fig, out_dir / f"{key}.png")
    return files


def _seed_mean_per_image(task: dict, runs: list[str], budget: str) -> list[float]:
    from explanations.evaluation import eps_tag

    key = "paper" if budget == PAPER else f"worst/{eps_tag(float(budget.split('/')[0]) / 255)}"
    lists = [task["eval"][run]["per_image"][key] for run in runs]
    return [sum(v) / len(v) for v in zip(*lists)]


def _se(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return 0.0
    m = sum(values) / n
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)


# ------------------------------------------------------------------------------------- document
def _protocol(results: dict, task: dict) -> list[str]:
    cfg = task["config"]
    e, split = cfg["eval"], task["split"]
    start = ("the published weights adapted by " if cfg["pretrained"] else "a model pretrained for ") + \
        f"{cfg['pretrain_epochs']} vanilla epoch(s) on {cfg['train_size']} train images (lr {cfg['pretrain_lr']})"
    return [
        f"- **Data split.** Validation and test images both come from the {split['source']} ({split['images']} images), "
        f"which the published weights and every training stage never saw: {split['val']} class-balanced images "
        f"(seed {split['seed']}) for validation (the accuracy axis and every choice), the other {split['test']} for "
        f"testing (test accuracy on {split['test_acc']}, attacks on the first {split['attack']}; disjoint from the "
        "validation images). Training uses CIFAR-10's train split only.",
        f"- **Start.** {start}; every fine-tune starts from it: {cfg['finetune_epochs']} epoch(s) on "
        f"{cfg['finetune_size'] or cfg['train_size']} train images, SGD + Nesterov, lr {cfg['finetune_lr']}, cosine "
        f"schedule, batch {cfg['batch_size']}, no weight decay except WD, the same for every method.",
        "- **Frontiers.** Vanilla and WD keep ReLU (anchors, one setting). SP swaps ReLU for Softplus(beta), swept "
        f"over beta. Est-H, Grad-norm, R2ET\\H, R2ET and AT fine-tune the Softplus({cfg['softplus_beta']:g}) network; "
        f"weight 0 of each is the SP beta = {cfg['softplus_beta']:g} run, which starts their curves. R2ET family and "
        "Est-H: adaptive weights `lambda = w (CE + 1) / |R|`; Grad-norm: `w ||g||^2`; AT: one l2 step of the R2ET "
        "reference attack of the given length in the model's normalised units (1 = the reference's strength), then CE "
        "on the attacked image. Settings: "
        + "; ".join(f"{METHOD_NAMES[m]} {', '.join(b['order'])}" for m, b in task["frontier"].items())
        + f". Training seeds: {cfg['seeds']} per setting, {cfg['near_seeds']} for the near settings.",
        f"- **Evaluation** (`explanations.evaluation.EvaluationProtocol`): eval mode, explained scalar = CE with the "
        f"true label, k = {cfg['k']}, all images counted. Per image and budget the *worst case* is the lowest P@k over "
        "the ensemble (ERAttack, ERAttack through a Softplus(10) surrogate on ReLU models, MSE attack, uniform noise) "
        f"and every smaller budget, {e['steps']} steps per attack and budget (APGD schedule, best iterate, the "
        f"prediction kept), at {', '.join(f'{x * 255:.3g}' for x in e['eps_list'])} /255. Paper protocol "
        f"(`PaperERAttack`: {e['paper_steps']} l2 steps of {e['paper_step_size']} normalised units, first flip) on the "
        f"first {e['paper_size']} attack images; an image whose first step flips the prediction has no unflipped "
        "iterate (the reference code's evaluation would index an empty list) and counts here as the clean image, "
        "P@k 1. Thickness "
        + (f"{e['thickness_samples']} x {e['thickness_points']} points at {e['eps'] * 255:.3g}/255." if e["thickness_samples"]
           else "off."),
        "- **Matched comparisons** (`explanations.statistics.matched_bootstrap`): each curve (settings in order of "
        "strength) is interpolated per image, linearly between the two settings of its first segment that brackets "
        "the accuracy; the interval is a percentile bootstrap (resamples: "
        f"{cfg['matched_resamples']}) that redraws the training seeds of every setting and the images (paired); an "
        "anchor is compared at its own accuracy. Verdicts need every interval on one side.",
    ]


def render_markdown(results: dict, plot_files: dict[str, str], doc_path: Path) -> str:
    pre = results["preset"]
    hw = results["hardware"]
    rel = lambda p: os.path.relpath(p, doc_path.parent)  # noqa: E731
    md = [
        "# Robustness-accuracy frontiers: does R2ET give more robust explanations at the same accuracy?",
        "",
        f"*Generated by `benchmarks/reproduce` (preset `{pre['name']}`); every number below comes from "
        f"`{rel(results['json_path'])}`. Do not edit by hand: rerun the command. The earlier one-point-per-method "
        "study is [results_resnet20_points.md](results_resnet20_points.md).*",
        "",
        "## Setup",
        "",
        f"- Preset `{pre['name']}`: {pre['description']}.",
        f"- Command: `{results['command']}`",
        f"- Hardware: {hw['cpu']} ({hw['cores']} cores visible, torch threads {hw['threads']}); "
        f"GPU: {hw['gpu'] or 'none'}; torch {hw['torch']}, lightning {hw['lightning']}, timm {hw['timm']}; "
        f"{hw['platform']}. Load average at start {hw['load_start']}, at end {hw.get('load_end', '–')}.",
        f"- Seed {results['seed']}.",
    ]
    if results.get("overrides"):
        md.append(f"- Overrides of the preset: `{' '.join(results['overrides'])}`")
    for task_name, task in results["tasks"].items():
        budgets = budget_order(_budgets(task))
        md += cost_lines(results, task)
        md += ["", "### Protocol", "", *_protocol(results, task), ""]
        md += ["## Findings", "", *findings(task), ""]
        notes = NOTES_DIR / f"{pre['name']}.md"
        if notes.is_file():
            md += ["## Analysis (hand-written, `benchmarks/reproduce/notes/" + notes.name + "`)", "", notes.read_text().strip(), ""]
        pre_run = task["pretrain"]
        pub = pre_run.get("published") or {}
        start = []
        if pub:
            start.append(f"Published weights (`{Path(pub['weights_file']).name}`): test accuracy {_f(pub['test_acc'], 4)}, "
                         f"val accuracy {_f(pub['val_acc'], 4)} before the adaptation; ")
        start.append(f"start of every fine-tune: test accuracy {_f(pre_run['test_acc'], 4)} ({pre_run['test_size']} "
                     f"images), val accuracy {_f(pre_run['sweep']['val_acc'], 4)}.")
        swap = pre_run.get("swap_val_acc") or {}
        if swap:
            start.append(" Its val accuracy with every ReLU swapped for Softplus(beta), before any fine-tuning: "
                         + ", ".join(f"beta {float(b):g}: {_f(a, 4)}" for b, a in swap.items()) + ".")
        md += ["## The start", "", "".join(start), ""]
        md += ["## Matched comparisons", ""]
        for budget in budgets:
            title = "Paper protocol" if budget == PAPER else f"Worst case at {budget}"
            md += [f"### {title}", "", *matched_table(task, budget), ""]
            path = plot_files.get(f"{task_name}_frontier_{budget.replace('/', '_')}")
            if path:
                md += [f"![{task_name} {budget}]({rel(path)})", ""]
        md += ["Columns: *a*, *b* = each curve's interpolated mean P@k; per-seed intervals: each training seed's own "
               "curve (settings with that seed) interpolated, image bootstrap; *replicates kept* = share of bootstrap "
               "replicates in which both curves reach the accuracy.", ""]
        md += ["## Frontiers", "", *frontier_table(task), "", *plan_lines(task), ""]
        at = at_table(task)
        if at:
            md += ["## AT's training perturbation", "", *at, ""]
        md += ["## Every model", "", *models_table(task), ""]
    return "\n".join(md)


def write_study_report(results: dict, out_dir: Path, doc_path: Path) -> Path:
    """Plots into ``out_dir`` and the markdown at ``doc_path``."""
    plots = make_plots(results, out_dir)
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text(render_markdown(results, plots, doc_path))
    return doc_path
