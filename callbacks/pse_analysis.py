"""PSEAnalysis: per-epoch promotion-suppression analysis of targeted adversarial perturbations.

Every ``every_n_epochs`` epochs (and always after the last epoch of ``fit``, on every ``validate``
run, and on ``test`` runs with the test set) the callback attacks a fixed, seeded evaluation subset
(the same images and the same random targets every epoch; sharded across ranks without
duplicates, ``callbacks/_eval_subset.py``) with targeted PGD on the C&W margin and sorts each
perturbation by its promotion-suppression effect (DESIGN §6, ``explanations.pse``; definitions and
every setting in docs/pse.md). It logs, under ``pse/``:

=======================================  =========================================================
``frac_suppression|balanced|promotion``  category shares of the counted samples (successful
``frac_ineffective``                     attacks; failed ones too with ``include_failed``)
``attack_success_rate``, ``num_failed``  over analysed samples (correctly classified ones with
``num_analysed``, ``num_success``        ``only_correct``); failed attacks are always counted
``num_misclassified``, ``clean_acc``     and reported, never dropped silently
``mean_phi``, ``mean_S``, ``mean_P``     sample level (phi over samples where it is defined)
``mean_steps``, ``mean_norm``            PGD iterations used and ||delta||_p
``group/frac_<cat>``, ``group/energy_``  group level: share of g x g groups / of energy per category
``cam_true|cam_target/share_<cat>``      image level: share of <cat>-group energy inside the top
``cam_true|cam_target/share_all``        ``cam_quantile`` CAM region of the true / target class
``units/frac_promoted|frac_suppressed``  network level, at ``unit_layer``
``units/mean_abs_change``
=======================================  =========================================================

On rank zero with a ``WandbLogger`` it also logs ``pse/samples`` (a ``wandb.Table`` with one row
per sample of all ranks, with a uint8 thumbnail of the clean image) and ``pse/category_shares_chart`` (a line series of the four category
shares over the epochs analysed so far). With ``out_dir`` set, rank zero writes
``pse_<stage>_epoch<N>.json`` (settings, numbers, history) and ``pse_<stage>_epoch<N>.png`` (example
perturbations per category, from rank zero's shard).

Reduction: every rank computes sum statistics (``explanations.pse.batch_sums``), one all-reduce
(``trainer.strategy.reduce``, sum) combines them, and every rank derives the same numbers, so a DDP
run logs what one process would. Per-sample randomness (the ``random`` target rule) is keyed by
(seed, dataset index).

The analysis runs with the classifier (``pl_module.model`` if present) in eval mode (restored)
inside ``torch.enable_grad()``; Lightning's ``inference_mode=True`` blocks input gradients, so the
callback refuses it with a clear message. The sanity check is skipped.

Standalone on a trained checkpoint::

    python benchmarks/pse_report.py --ckpt CKPT --out pse_report -c configs/default.yaml
    python train.py validate -c configs/default.yaml --ckpt_path CKPT   # with PSEAnalysis(out_dir=...)
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor, nn

from callbacks._eval_subset import EvalSubset
from callbacks.base import EvaluationCallback, line_series
from explanations.evaluation import pse_target_uniform
from explanations.files import file_sha256
from explanations.plots import uint8_image
from explanations.pse import (
    CATEGORIES,
    PSEBatch,
    PSESettings,
    add_sums,
    analyze_batch,
    batch_sums,
    flatten_sums,
    groups_to_pixels,
    per_sample_rows,
    summarize,
    unflatten_sums,
)

log = logging.getLogger(__name__)

PREFIX = "pse/"


# ------------------------------------------------------------------------------------------------
# The analysis over a subset (Lightning-free; shared by the callback and the standalone report)
# ------------------------------------------------------------------------------------------------


class ExampleCollector:
    """Keeps up to ``per_category`` counted samples of each sample category (CPU tensors)."""

    def __init__(self, per_category: int) -> None:
        self.per_category = per_category
        self.items: dict[str, list[dict[str, Any]]] = {name: [] for name in CATEGORIES}

    def add(self, result: PSEBatch, group_size: int) -> None:
        if self.per_category < 1:
            return
        height, width = result.x.shape[-2:]
        pixel_groups = groups_to_pixels(result.group.category, height, width, group_size)
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


def run_analysis(
    model: nn.Module,
    subset: EvalSubset,
    settings: PSESettings,
    device: torch.device | str,
    seed: int = 0,
    collector: ExampleCollector | None = None,
) -> tuple[dict[str, Tensor] | None, list[str], Tensor | None]:
    """Analyse every batch of ``subset``: (sums, per-sample columns, rows (N, F) with ``id`` first).

    ``sums`` is None when the shard is empty. The model is put in eval mode by the analysis
    helpers (modes restored) and the work runs inside ``torch.enable_grad()``.
    """
    params = next(iter(model.parameters()), None)
    dtype = params.dtype if params is not None and params.is_floating_point() else torch.float32
    sums, rows, columns = None, [], ["id"]
    with torch.enable_grad():
        for batch in subset:
            batch = batch.to(device, dtype)
            uniform = pse_target_uniform(batch.ids, seed)
            result = analyze_batch(model, batch.x, batch.y, settings, uniform=uniform)
            sums = add_sums(sums, {k: v.to(device) for k, v in batch_sums(result, settings).items()})
            names, values = per_sample_rows(result)
            columns = ["id", *names]
            rows.append(torch.cat([batch.ids.double()[:, None].to(values.device), values], 1).cpu())
            if collector is not None:
                collector.add(result, settings.group_size)
    return sums, columns, (torch.cat(rows) if rows else None)


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


def write_report(
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


# ------------------------------------------------------------------------------------------------
# The callback
# ------------------------------------------------------------------------------------------------


class PSEAnalysis(EvaluationCallback):
    """Promotion-suppression analysis of targeted adversarial perturbations, every n epochs.

    Args:
        every_n_epochs: analyse after every n-th training epoch (and after the last one).
        num_samples: size of the evaluation subset over all ranks; batch_size: per forward pass.
        seed: picks the subset and the ``random`` targets (fixed across epochs).
        eps, steps, step_size, norm, target_rule, kappa, rand_init, early_stop: the targeted PGD
            (``explanations.targeted_pgd``; step_size null = 2.5 eps / steps).
        cutoffs: phi cut-offs (lo, hi) of the categories.
        only_correct: analyse correctly classified samples only; include_failed: count failed
            attacks in the category shares (they are always counted and reported).
        group_size, group_chunk_size: g x g groups; images per batched forward pass.
        cam_method (gradcam/cam), cam_layer (null: default per model), cam_quantile (region = top
            fraction of pixels), unit_layer (null: the CAM layer), unit_threshold (tau).
        log_table: log the per-sample W&B table; log_chart: the category-share line series.
        out_dir: also write a JSON of the numbers and a PNG of examples (rank zero) each time;
            num_examples: examples per category in the PNG.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_samples: int = 64,
        batch_size: int = 64,
        seed: int = 0,
        eps: float = 8 / 255,
        steps: int = 10,
        step_size: float | None = None,
        norm: Literal["linf", "l2"] = "linf",
        target_rule: Literal["random", "least_likely", "second_likely"] = "random",
        kappa: float = 0.0,
        rand_init: bool = False,
        early_stop: bool = True,
        cutoffs: tuple[float, float] = (1 / 3, 2 / 3),
        only_correct: bool = True,
        include_failed: bool = False,
        group_size: int = 8,
        group_chunk_size: int = 256,
        cam_method: Literal["gradcam", "cam"] = "gradcam",
        cam_layer: str | None = None,
        cam_quantile: float = 0.2,
        unit_layer: str | None = None,
        unit_threshold: float = 0.2,
        log_table: bool = True,
        log_chart: bool = True,
        out_dir: str | None = None,
        num_examples: int = 2,
    ) -> None:
        super().__init__(every_n_epochs, num_samples, batch_size, seed)
        self.settings = PSESettings(  # validates every setting (explanations.validation)
            eps=eps, steps=steps, step_size=step_size, norm=norm, target_rule=target_rule,
            kappa=kappa, rand_init=rand_init, early_stop=early_stop, cutoffs=tuple(cutoffs),
            only_correct=only_correct, include_failed=include_failed, group_size=group_size,
            group_chunk_size=group_chunk_size, cam_method=cam_method, cam_layer=cam_layer,
            cam_quantile=cam_quantile, unit_layer=unit_layer, unit_threshold=unit_threshold,
        )
        self.log_table, self.log_chart = log_table, log_chart
        self.out_dir, self.num_examples = out_dir, num_examples
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ work
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, loop: str) -> None:
        start = time.perf_counter()
        model = self.classifier(pl_module)
        subset = self.eval_subset(trainer, loop)
        collector = ExampleCollector(self.num_examples) if self.out_dir and trainer.is_global_zero else None
        sums, columns, rows = run_analysis(model, subset, self.settings, pl_module.device, self.seed, collector)
        if sums is None:
            raise RuntimeError(
                f"PSEAnalysis: rank {trainer.global_rank} got no usable sample of the evaluation subset"
            )
        vector, layout = flatten_sums(sums)
        vector = trainer.strategy.reduce(vector, reduce_op="sum")
        values = summarize(unflatten_sums(vector, layout), self.settings)
        for name, value in values.items():
            pl_module.log(PREFIX + name, float(value), on_step=False, on_epoch=True, sync_dist=True)
        self.last_values = {PREFIX + n: float(v) for n, v in values.items()}
        gathered = self._gather_rows(trainer, pl_module, rows)
        seconds = time.perf_counter() - start
        if trainer.is_global_zero:
            self.history.append({"epoch": trainer.current_epoch, "stage": loop,
                                 **{c: values[f"frac_{c}"] for c in CATEGORIES}})
            class_names = getattr(getattr(trainer, "datamodule", None), "class_names", None)
            self._log_wandb(trainer, columns, gathered, class_names)
            if self.out_dir:
                stem = f"pse_{loop}_epoch{trainer.current_epoch}"
                write_report(
                    self.out_dir, stem, values, self.settings, collector,
                    extra=dict(stage=loop, epoch=trainer.current_epoch, global_step=trainer.global_step,
                               num_samples=self.num_samples, seed=self.seed, history=self.history,
                               seconds=seconds),
                    class_names=class_names,
                )

    def _gather_rows(self, trainer: L.Trainer, pl_module: L.LightningModule, rows: Tensor | None) -> Tensor:
        """Every rank's per-sample rows (padded to equal shard sizes, pads dropped): (N, F)."""
        if trainer.world_size == 1:
            return rows
        size = math.ceil(min(self.num_samples, len(self._subset.dataset)) / trainer.world_size)
        padded = torch.full((size, rows.shape[1] + 1), float("nan"), dtype=torch.float64)
        padded[: rows.shape[0], :-1] = rows
        padded[: rows.shape[0], -1] = 1.0
        gathered = pl_module.all_gather(padded.to(pl_module.device)).reshape(-1, rows.shape[1] + 1).cpu()
        return gathered[gathered[:, -1] == 1.0][:, :-1]

    def _thumbnails(self, wandb, ids: list[int]) -> list[Any]:
        """uint8 wandb.Image thumbnails (>= 32 px) of the clean images with these dataset ids."""
        dataset = self._subset.dataset
        return [wandb.Image(uint8_image(dataset[i][0], min_side=32)) for i in ids]

    def _log_wandb(self, trainer: L.Trainer, columns: list[str], rows: Tensor, class_names) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not (self.log_table or self.log_chart):
            return
        import wandb

        for logger in loggers:
            try:
                if self.log_table:
                    data = table_data(columns, rows, class_names)
                    thumbs = self._thumbnails(wandb, [int(r[0]) for r in data])
                    logger.log_table(key=PREFIX + "samples", columns=[columns[0], "image", *columns[1:]],
                                     data=[[r[0], t, *r[1:]] for r, t in zip(data, thumbs)], step=trainer.global_step)
                if self.log_chart and self.history:
                    chart = line_series(
                        wandb, [h["epoch"] for h in self.history], [[h[c] for h in self.history] for c in CATEGORIES],
                        list(CATEGORIES), title="PSE category shares", xname="epoch",
                    )
                    logger.log_metrics({PREFIX + "category_shares_chart": chart}, step=trainer.global_step)
            except Exception as exc:  # a dashboard extra must never kill a run
                log.warning("PSEAnalysis: could not log to W&B: %s", exc)


# ------------------------------------------------------------------------------------------------
# Standalone analysis of a trained checkpoint
# ------------------------------------------------------------------------------------------------


def _load_yaml(path: str | Path) -> dict:
    import yaml

    with open(path) as f:
        return yaml.safe_load(f) or {}


def build_datamodule(configs: list[str | Path]) -> L.LightningDataModule:
    """The datamodule of LightningCLI config files (their ``data:`` sections, later files win)."""
    import importlib

    spec: dict[str, Any] = {}
    for path in configs:
        data = _load_yaml(path).get("data")
        if not data:
            continue
        if "class_path" in data and data["class_path"] != spec.get("class_path"):
            spec = {"class_path": data["class_path"], "init_args": {}}
        spec.setdefault("init_args", {}).update(data.get("init_args") or {})
    if "class_path" not in spec:
        raise ValueError(f"no `data: class_path:` section in {list(map(str, configs))}")
    module_name, _, class_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**spec["init_args"])


def analyze_checkpoint(
    ckpt: str | Path,
    out_dir: str | Path,
    configs: list[str | Path] | None = None,
    datamodule: L.LightningDataModule | None = None,
    split: Literal["val", "test"] = "test",
    num_samples: int = 256,
    batch_size: int = 64,
    seed: int = 0,
    num_examples: int = 3,
    device: str = "cpu",
    settings: PSESettings | None = None,
) -> dict[str, float]:
    """PSE analysis of a RobustClassifier checkpoint; writes ``pse_<split>.json`` and ``.png``.

    The data comes from ``datamodule`` or the ``data:`` section of the config files (default
    configs/default.yaml). Returns the numbers (without the ``pse/`` prefix).
    """
    from lightning_modules.classifier import RobustClassifier

    from lightning_modules.reliability import ensure_writable_dir

    ensure_writable_dir(out_dir, "PSE report folder", "--out")  # a bad --out fails now, not after the attacks
    settings = settings or PSESettings()
    module = RobustClassifier.load_from_checkpoint(
        str(ckpt), map_location=device, init_from=None, pretrained=False, weights_file=None
    )
    model = module.model.to(device)
    if datamodule is None:
        datamodule = build_datamodule(list(configs or ["configs/default.yaml"]))
    datamodule.prepare_data()
    datamodule.setup("test" if split == "test" else "validate")
    dataset = getattr(datamodule, f"{split}_dataset", None)
    if dataset is None:
        dataset = (datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()).dataset
    subset = EvalSubset(dataset, num_samples, seed, 0, 1, batch_size)
    collector = ExampleCollector(num_examples)
    start = time.perf_counter()
    sums, _, _ = run_analysis(model, subset, settings, device, seed, collector)
    if sums is None:
        raise RuntimeError("no usable sample in the evaluation subset")
    values = summarize(sums, settings)
    write_report(
        out_dir, f"pse_{split}", values, settings, collector,
        extra=dict(checkpoint=str(ckpt), checkpoint_sha256=file_sha256(ckpt), split=split,
                   data=f"{type(datamodule).__qualname__}: " + (datamodule.describe_split(split)
                        if hasattr(datamodule, "describe_split") else "provenance not stated"),
                   num_samples=num_samples, seed=seed, seconds=time.perf_counter() - start),
        class_names=getattr(datamodule, "class_names", None),
    )
    return values
