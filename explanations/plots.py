"""Figures of an evaluation report (PNG via matplotlib's Agg canvas; no display needed).

- :func:`uint8_image`: an image (C, H, W) in [0, 1] as uint8 (H, W, 3) in its real colours (W&B
  writes uint8 arrays as they are; a float array would be written unscaled, i.e. black).
- :func:`saliency_grid`: rows of clean image | clean saliency | worst-case attacked image | its
  saliency, as one uint8 tensor (3, H', W').
- :func:`plot_report`: ``p_at_k_vs_eps.png`` (worst case, each attack, noise; with standard-error
  bars when the report has them), ``thickness.png`` and ``saliency_<method>.png`` (the grid with
  each row's label, prediction, attack and P@k).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from explanations.evaluation import NOISE, WORST, eps_label
from explanations.files import atomic_write

__all__ = ["plot_report", "saliency_grid", "uint8_image"]


def _heat(s: Tensor, size: tuple[int, int]) -> Tensor:
    """Saliency (N, n) -> heat maps (N, H, W) in [0, 1], each scaled by its max (nearest upsampling)."""
    h, w = size
    side_h = int(round((s.shape[1] * h / w) ** 0.5))
    side_w = s.shape[1] // max(side_h, 1)
    maps = s.reshape(-1, 1, side_h, side_w).float()
    maps = maps / maps.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    if (side_h, side_w) != (h, w):
        maps = torch.nn.functional.interpolate(maps, size=(h, w), mode="nearest")
    return maps[:, 0]


def uint8_image(x: Tensor, min_side: int = 0):
    """An image (C, H, W) in [0, 1] as a uint8 numpy array (H, W, 3) in its real colours (grey
    images repeated), nearest-upsampled to at least ``min_side`` pixels."""
    x = x.detach().float().cpu()
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    scale = max(1, -(-min_side // max(x.shape[-2:]))) if min_side else 1
    if scale > 1:
        x = torch.nn.functional.interpolate(x[None], scale_factor=scale, mode="nearest")[0]
    return (x[:3].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def saliency_grid(item: dict[str, Any], min_side: int = 64) -> Tensor:
    """uint8 image grid (3, H', W') in real colours: per row clean image | clean saliency |
    attacked image | attacked saliency (saliency as grey heat maps). ``item``: from
    ``EvaluationResult.images``."""
    from torchvision.utils import make_grid

    x, x_adv = item["x"].float(), item["x_adv"].float()
    size = tuple(x.shape[-2:])
    if x.shape[1] == 1:
        x, x_adv = x.expand(-1, 3, -1, -1), x_adv.expand(-1, 3, -1, -1)
    heat = lambda s: _heat(s, size).unsqueeze(1).expand(-1, 3, -1, -1)  # noqa: E731
    tiles = torch.stack([x[:, :3], heat(item["s"]), x_adv[:, :3], heat(item["s_adv"])], 1).flatten(0, 1)
    scale = max(1, min_side // max(size))
    if scale > 1:
        tiles = torch.nn.functional.interpolate(tiles, scale_factor=scale, mode="nearest")
    grid = make_grid(tiles.clamp(0, 1), nrow=4, padding=2, pad_value=1.0)
    return (grid * 255).round().to(torch.uint8)


def row_captions(item: dict[str, Any], class_names: list[str] | None = None) -> list[str]:
    """One caption per grid row: image id, label, clean prediction, worst attack and its P@k."""
    def name(c: int) -> str:
        return class_names[c] if class_names and 0 <= c < len(class_names) else str(c)

    n = len(item["source"])
    out = []
    for i in range(n):
        parts = [f"id {int(item['ids'][i])}"]
        if item.get("label") is not None:
            parts.append(f"label {name(int(item['label'][i]))}")
        if item.get("pred") is not None:
            parts.append(f"pred {name(int(item['pred'][i]))}")
        attack = f"worst: {item['source'][i]}"
        if item.get("p_at_k") is not None:
            attack += f", P@k {float(item['p_at_k'][i]):.2f}"
        out.append(", ".join(parts[:2]) + "\n" + ", ".join(parts[2:] + [attack]))
    return out


def _save(fig, path: Path, **kwargs: Any) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png", **kwargs))
    return path


def plot_report(report: dict[str, Any], out_dir: str | Path, images: dict[str, dict[str, Any]] | None = None,
                class_names: list[str] | None = None) -> list[Path]:
    """Write the PNG plots of a report (see the module docstring) into ``out_dir``; returns the paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out_dir)
    paths = []
    eps_labels = report["eps"]
    xs = [float(e.split("/")[0]) for e in eps_labels]
    se_table = (report.get("se") or {}).get("p_at_k", {})
    fig = Figure(figsize=(5.4, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for src, row in report["p_at_k"].items():
        ys = [float("nan") if row[e] is None else row[e] for e in eps_labels]
        errs = [float("nan") if (se_table.get(src) or {}).get(e) is None else se_table[src][e] for e in eps_labels]
        style = dict(lw=2.5, color="black") if src == WORST else dict(ls="--", color="grey") if src == NOISE else {}
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=src, **style)
    ax.set_xlabel("eps (x / 255, l_inf)")
    ax.set_ylabel(f"P@{report['k']} (mean ± s.e.)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"P@k vs eps ({report['method']}, {report['num_images']} images)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, out / "p_at_k_vs_eps.png"))
    if report.get("thickness"):
        fig = Figure(figsize=(4.4, 3.2))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        names = list(report["thickness"])
        vals = [report["thickness"][n] for n in names]
        se = (report.get("se") or {}).get("thickness", {})
        heights = [0.0 if v is None else v for v in vals]
        errs = [se.get(n) or 0.0 for n in names]
        ax.bar(names, heights, yerr=errs, capsize=4, color=["tab:blue", "tab:orange"][: len(names)])
        for i, v in enumerate(vals):
            ax.text(i, heights[i] + 0.02, "n/a" if v is None else f"{v:.4f}", ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, 1.1)  # the full [0, 1] range: a cut axis exaggerates small differences
        ax.set_ylabel("top-k thickness (1 = ranking never changes)")
        ax.set_title(f"top-k thickness at eps {report['settings']['thickness_eps']}", fontsize=10)
        fig.tight_layout()
        paths.append(_save(fig, out / "thickness.png"))
    for method, item in (images or {}).items():
        grid = saliency_grid(item)
        rows = len(item["source"])
        fig = Figure(figsize=(6.5, 1.6 * rows + 0.7))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ax.imshow(grid.permute(1, 2, 0).numpy())
        ax.set_xticks([])
        row_height = grid.shape[1] / rows
        ax.set_yticks([row_height * (i + 0.5) for i in range(rows)])
        ax.set_yticklabels(row_captions(item, class_names), fontsize=7)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_title(f"{method}: clean | clean saliency | worst attack at {eps_label(item['eps'])} | its saliency",
                     fontsize=8)
        fig.tight_layout()
        paths.append(_save(fig, out / f"saliency_{method}.png", bbox_inches="tight"))
    return paths
