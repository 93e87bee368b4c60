"""What the PSE analysis writes out: per-sample table rows, a figure of examples, the report files.

- :func:`table_data`: the per-sample rows of :func:`explanations.pse.run_analysis` as table rows
  (integers, category and class names, NaN as None), sorted by dataset id (the W&B table).
- :class:`ExampleCollector` keeps a few counted samples per category during the analysis and
  :func:`plot_examples` draws them (matplotlib's Agg canvas, no display): per example the clean
  image, the amplified perturbation, the adversarial image, the group categories and the CAMs of
  the true and the target class.
- :func:`write_pse_report`: ``<stem>.json`` (the settings, every number, what was analysed) and
  ``<stem>.png`` (the examples), as the callback (``out_dir``) and ``benchmarks/pse_report.py``
  write them.

Framework-free (torch, matplotlib); definitions in :mod:`explanations.pse` and docs/pse.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import Tensor

from explanations.pse import CATEGORIES, PSEBatch, PSESettings, groups_to_pixels


class ExampleCollector:
    """Keeps up to ``per_category`` counted samples of each sample category (CPU tensors) for
    :func:`plot_examples`; ``add`` takes each :class:`~explanations.pse.PSEBatch` of the analysis
    (``run_analysis(..., on_batch=collector.add)``), whose groups are ``group_size`` pixels wide."""

    def __init__(self, per_category: int, group_size: int) -> None:
        self.per_category, self.group_size = per_category, group_size
        self.items: dict[str, list[dict[str, Any]]] = {name: [] for name in CATEGORIES}

    def add(self, result: PSEBatch) -> None:
        if self.per_category < 1:
            return
        height, width = result.x.shape[-2:]
        pixel_groups = groups_to_pixels(result.group.category, height, width, self.group_size)
        for code, name in enumerate(CATEGORIES):  # loop over the four categories, not samples
            room = self.per_category - len(self.items[name])
            if room <= 0:
                continue
            picked = ((result.category == code) & result.counted).nonzero().squeeze(1)[:room]
            for i in picked.tolist():
                self.items[name].append(dict(
                    x=result.x[i].detach().cpu(), delta=result.delta[i].detach().cpu(),
                    groups=pixel_groups[i].cpu(), cams=result.cams[i].detach().cpu(),
                    label=int(result.labels[i]), target=int(result.targets[i]),
                    S=float(result.S[i]), P=float(result.P[i]), phi=float(result.phi[i]),
                ))


def table_data(columns: list[str], rows: Tensor, class_names: list[str] | None = None) -> list[list[Any]]:
    """Rows (N, F) as table rows: integers, category names, NaN -> None, sorted by ``id``."""
    rows = rows[rows[:, 0].argsort()]
    ints = {"id", "label", "target", "pred_clean", "pred_adv", "steps"} | {c for c in columns if c.startswith("groups_")}
    bools = {"correct", "success", "counted"}
    classes = {"label", "target", "pred_clean", "pred_adv"}
    data = []
    for row in rows.tolist():  # formatting for the table, after the batched analysis
        out: list[Any] = []
        for name, value in zip(columns, row):
            if name == "category":
                out.append(CATEGORIES[int(value)])
            elif name in bools:
                out.append(bool(value))
            elif name in ints:
                value = int(value)
                out.append(class_names[value] if class_names and name in classes and value < len(class_names) else value)
            else:
                out.append(None if math.isnan(value) else float(value))
        data.append(out)
    return data


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _image(t: Tensor):
    """(C, H, W) -> an (H, W, 3) or (H, W) numpy image for imshow."""
    t = t.float().clamp(0, 1)
    return t[0].numpy() if t.shape[0] == 1 else t[:3].permute(1, 2, 0).numpy()


def plot_examples(
    collector: ExampleCollector, path: str | Path, title: str = "", class_names: list[str] | None = None
) -> Path:
    """Figure of example perturbations per category (matplotlib Agg, no pyplot state).

    One row per example, grouped by category; columns: clean image (label), perturbation
    (amplified to the full range), adversarial image (target), group categories, CAM of the true
    class, CAM of the target class.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    def name(c: int) -> str:
        return class_names[c] if class_names and c < len(class_names) else str(c)

    rows = [(cat, item) for cat in CATEGORIES for item in (collector.items[cat] or [None])]
    cols = ["clean", "perturbation (amplified)", "adversarial", "group categories", "CAM true", "CAM target"]
    height = 2.2 * len(rows) + 0.8
    fig = Figure(figsize=(2.2 * len(cols), height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    cmap = ListedColormap(["tab:blue", "tab:gray", "tab:red", "white"])
    for r, (cat, item) in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=8)
        axes[r][0].set_ylabel(cat, fontsize=9)
        if item is None:
            axes[r][0].text(0.5, 0.5, "no example", ha="center", va="center", fontsize=8)
            continue
        x, delta = item["x"], item["delta"]
        scale = float(delta.abs().max()) or 1.0
        axes[r][0].imshow(_image(x), cmap="gray")
        axes[r][0].set_xlabel(f"y={name(item['label'])}", fontsize=7)
        axes[r][1].imshow(_image(0.5 + delta / (2 * scale)), cmap="gray")
        axes[r][1].set_xlabel(f"S={item['S']:.2f} P={item['P']:.2f} phi={item['phi']:.2f}", fontsize=7)
        axes[r][2].imshow(_image(x + delta), cmap="gray")
        axes[r][2].set_xlabel(f"t={name(item['target'])}", fontsize=7)
        axes[r][3].imshow(item["groups"].numpy(), cmap=cmap, vmin=-0.5, vmax=3.5, interpolation="nearest")
        for k in range(2):
            axes[r][4 + k].imshow(_image(x), cmap="gray")
            axes[r][4 + k].imshow(item["cams"][k].clamp_min(0).numpy(), cmap="jet", alpha=0.5)
    fig.suptitle(
        (title + "\n" if title else "") + "group colours: blue suppression, grey balanced, red promotion, "
        "white ineffective",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / height))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def write_pse_report(
    out_dir: str | Path,
    stem: str,
    metrics: dict[str, float],
    settings: PSESettings,
    collector: ExampleCollector | None,
    extra: dict[str, Any] | None = None,
    class_names: list[str] | None = None,
) -> tuple[Path, Path | None]:
    """Write ``<stem>.json`` (settings, numbers, extra) and ``<stem>.png`` (examples) to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{stem}.json"
    payload = {"metrics": metrics, "settings": asdict(settings), **(extra or {})}
    json_path.write_text(json.dumps(_jsonable(payload), indent=2, sort_keys=True))
    png_path = None
    if collector is not None:
        title = " ".join(f"{c}={metrics.get(f'frac_{c}', float('nan')):.2f}" for c in CATEGORIES)
        png_path = plot_examples(collector, out / f"{stem}.png", title=title, class_names=class_names)
    return json_path, png_path
