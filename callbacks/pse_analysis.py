"""PSEAnalysis: per-epoch promotion-suppression analysis of targeted adversarial perturbations.

Every ``every_n_epochs`` epochs (and always after the last epoch of ``fit``, on every ``validate``
run, and on ``test`` runs with the test set) the callback attacks a fixed, seeded evaluation subset
(the same images and the same random targets every epoch; sharded across ranks without
duplicates, ``callbacks/_eval_subset.py``) with targeted PGD on the C&W margin and sorts each
perturbation by its promotion-suppression effect (DESIGN §6, ``explanations.pse``; definitions in
docs/pse.md). The analysis settings are one ``explanations.pse.PSESettings``, given whole
(``settings: {eps: 0.125, steps: 10}`` in YAML; its field docs are the help text). It logs, under
``pse/``:

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
per sample of all ranks, with a uint8 thumbnail of the clean image) and
``pse/category_shares_chart`` (a line series of the four category shares over the epochs analysed
so far). With ``out_dir`` set, rank zero writes
``pse_<stage>_epoch<N>.json`` (settings, numbers, history) and ``pse_<stage>_epoch<N>.png`` (example
perturbations per category, from rank zero's shard).

Reduction: every rank computes sum statistics (``explanations.pse.batch_sums``), one all-reduce
(``trainer.strategy.reduce``, sum) combines them, and every rank derives the same numbers, so a DDP
run logs what one process would. Per-sample randomness (the ``random`` target rule) is keyed by
(seed, dataset index).

The analysis runs with the classifier (``pl_module.model`` if present) in eval mode (restored)
inside ``torch.enable_grad()``; Lightning's ``inference_mode=True`` blocks input gradients, so the
callback refuses it with a clear message. The sanity check is skipped.

A trained checkpoint: ``python benchmarks/pse_report.py --ckpt CKPT --out DIR -c CONFIG``, or
``python train.py validate -c CONFIG --ckpt_path CKPT`` with this callback (``out_dir: DIR``).

The analysis itself is framework-free (``explanations.pse.run_analysis``; tables, figure and
report files in ``explanations.pse_report``); this module is its Lightning callback.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

from callbacks.base import EvaluationCallback, line_series
from explanations.plots import uint8_image
from explanations.pse import CATEGORIES, PSESettings, flatten_sums, run_analysis, summarize, unflatten_sums
from explanations.pse_report import ExampleCollector, table_data, write_pse_report

log = logging.getLogger(__name__)

PREFIX = "pse/"


class PSEAnalysis(EvaluationCallback):
    """Promotion-suppression analysis of targeted adversarial perturbations, every n epochs.

    Args:
        every_n_epochs: analyse after every n-th training epoch (and after the last one)
        num_samples: size of the fixed evaluation subset over all ranks
        batch_size: images per batch of the analysis
        seed: picks the subset and the ``random`` targets (fixed across epochs)
        settings: the analysis (attack, categories, population, group / image / network levels);
            see explanations.pse.PSESettings
        log_table: log the per-sample W&B table
        log_chart: log the category-share line series
        out_dir: also write a JSON of the numbers and a PNG of examples (rank zero) each time
        num_examples: examples per category in the PNG
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_samples: int = 64,
        batch_size: int = 64,
        seed: int = 0,
        settings: PSESettings = PSESettings(),
        log_table: bool = True,
        log_chart: bool = True,
        out_dir: str | None = None,
        num_examples: int = 2,
    ) -> None:
        super().__init__(every_n_epochs, num_samples, batch_size, seed)
        if not isinstance(settings, PSESettings):
            raise TypeError(f"PSEAnalysis settings={settings!r} must be an explanations.pse.PSESettings "
                            "(in YAML: a mapping of its fields, e.g. settings: {eps: 0.125, steps: 10})")
        self.settings = settings
        self.log_table, self.log_chart = log_table, log_chart
        self.out_dir, self.num_examples = out_dir, num_examples
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ work
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, loop: str) -> None:
        start = time.perf_counter()
        model = self.classifier(pl_module)
        subset = self.eval_subset(trainer, loop)
        collector = (ExampleCollector(self.num_examples, self.settings.group_size)
                     if self.out_dir and trainer.is_global_zero else None)
        sums, columns, rows = run_analysis(model, subset, self.settings, pl_module.device, self.seed,
                                           on_batch=collector.add if collector is not None else None)
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
                write_pse_report(
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
