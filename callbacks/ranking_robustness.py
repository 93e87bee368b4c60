"""RankingRobustness: the evaluation protocol (``explanations.evaluation``) as a callback (DESIGN §5).

Every ``every_n_epochs`` epochs (and always at the last epoch of ``fit``, on every ``validate``
run, and on ``test`` runs with the test set) the callback takes a fixed, seeded, class-balanced
evaluation subset (the same images every epoch; sharded across ranks without duplicates), runs
:class:`explanations.evaluation.EvaluationProtocol` on it (an attack ensemble at each eps, the
per-image worst case) and logs, for each explanation method, attack ``<src>`` (the ensemble
members, ``noise``, and ``worst``) and budget (``eps_8`` = 8/255):

=====================================================  ============================================
``robustness/p_at_k/<src>/<method>/eps_<v>``           P@k
``robustness/spearman|kendall/<src>/<method>/eps_<v>`` rank correlation on the union of the top-k
``robustness/flip_rate/<src>/<method>/eps_<v>``        share of returned images whose prediction
                                                       changed (0 for the attacks; noise may flip)
``robustness/localization/<src>/<method>/eps_<v>``     top-k share inside the ground-truth mask
``robustness/localization/clean/<method>``             (datasets with masks)
``robustness/thickness/all_pairs|boundary/<method>``   top-k thickness at ``thickness_eps``
``robustness/accuracy``                                clean accuracy of the evaluation subset
=====================================================  ============================================

On rank zero with a ``WandbLogger``: a P@k-vs-eps line plot per method and epoch
(``robustness/p_at_k_vs_eps/<method>``), the same numbers as a table, and a uint8 image grid per
method (rows: samples; columns: clean image, clean saliency, worst-case attacked image at the
largest eps, its saliency) under ``robustness/saliency/<method>``.

With ``report: true`` (``configs/evaluate.yaml``) each evaluation also writes
``robustness_report.json``, ``robustness_report.md`` and PNG plots into ``report_dir`` (default:
the run's log folder) and uploads the plots to W&B: the standalone evaluation
``python train.py validate|test -c configs/evaluate.yaml ...`` (README, "Evaluate any model").

Values are per-image sums and counts (float64), all-reduced once, so a 2-process DDP run logs
what one process would. Per-sample randomness is keyed by (seed, dataset index).

Settings are checked when the callback is built and in ``setup`` (before any epoch): eps, attack
names and kwargs, methods, and k / pool against the data's number of features. ``k``,
``pair_set``, ``target`` and ``pool`` default (``null``) to the LightningModule's ``hparams`` (else
0.1, ``boundary``, ``loss``, no pooling); ``pool: 1`` forces no pooling.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from callbacks.base import EvaluationCallback
from explanations.evaluation import (
    DEFAULT_EPS,
    WORST,
    EvaluationProtocol,
    eps_label,
    means_from_sums,
    saliency_grid,
    summary,
    sums_and_counts,
    write_report,
)

log = logging.getLogger(__name__)

PREFIX = "robustness/"


class RankingRobustness(EvaluationCallback):
    """Run the evaluation protocol on a fixed validation (or test) subset and log the results.

    Args:
        every_n_epochs, num_samples, batch_size, seed: see ``callbacks.base.EvaluationCallback``.
        eps: l_inf budget(s) in pixel units (default 1, 2, 4, 8 /255).
        attacks: ensemble members (names or ``{name, attack, kwargs}``); null = ERAttack,
            ERAttack with ``surrogate_beta: auto``, MSEAttack, noise (``explanations.evaluation``).
        noise_baseline: include uniform noise of each eps (attack ``noise``).
        methods, method_kwargs: explanation methods and their options.
        steps: attack steps; step_size, step, random_start: passed to every attack when set.
        k, pair_set, target, pool: see the module docstring (null = the LightningModule's).
        correlations, localization, thickness, thickness_samples, thickness_points,
            thickness_eps: metrics (see ``EvaluationProtocol``).
        log_images, num_images: W&B saliency grids. report, report_dir: write the report files.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_samples: int = 64,
        batch_size: int = 64,
        seed: int = 0,
        eps: float | list[float] = list(DEFAULT_EPS),
        attacks: list[str | dict[str, Any]] | None = None,
        noise_baseline: bool = True,
        methods: list[str] | None = None,
        method_kwargs: dict[str, dict[str, Any]] | None = None,
        steps: int = 10,
        step_size: float | None = None,
        step: str | None = None,
        random_start: bool | None = None,
        k: int | float | None = None,
        pair_set: str | None = None,
        target: str | None = None,
        pool: int | None = None,
        correlations: bool = True,
        localization: bool = True,
        thickness: bool = True,
        thickness_samples: int = 2,
        thickness_points: int = 4,
        thickness_eps: float | None = None,
        log_images: bool = True,
        num_images: int = 8,
        report: bool = False,
        report_dir: str | None = None,
    ) -> None:
        super().__init__(every_n_epochs, num_samples, batch_size, seed)
        attack_kwargs = {n: v for n, v in (("step_size", step_size), ("step", step), ("random_start", random_start))
                         if v is not None}
        self.protocol_args = dict(
            eps=eps, attacks=attacks, noise=noise_baseline, methods=list(methods or ["gradient"]),
            method_kwargs=method_kwargs, seed=self.seed, steps=steps, attack_kwargs=attack_kwargs,
            correlations=correlations, localization=localization, thickness=thickness,
            thickness_samples=thickness_samples, thickness_points=thickness_points, thickness_eps=thickness_eps,
        )
        self.k, self.pair_set, self.target, self.pool = k, pair_set, target, pool
        # validate everything that does not need the model now (k/pool: in setup, against the data)
        self.protocol = EvaluationProtocol(**self.protocol_args, **self._model_settings(None))
        if not isinstance(num_images, int) or num_images < 0:
            raise ValueError(f"num_images={num_images!r} must be a non-negative integer")
        self.log_images, self.num_images = log_images, num_images
        self.report, self.report_dir = report, report_dir
        self.history: list[dict[str, Any]] = []
        self.last_report: dict[str, Any] | None = None
        self.last_report_paths: list[Path] = []
        self.evaluated_epochs: list[int] = []
        self._config_logged = False

    # ------------------------------------------------------------------ settings
    def _model_settings(self, pl_module: L.LightningModule | None) -> dict[str, Any]:
        hparams = getattr(pl_module, "hparams", {}) or {}

        def get(name: str, default: Any) -> Any:
            value = getattr(self, name)
            if value is not None:
                return value
            return hparams.get(name, default) if hasattr(hparams, "get") else default

        pool = get("pool", None)
        return dict(k=get("k", 0.1), pair_set=get("pair_set", "boundary"), target=get("target", "loss"),
                    pool=None if pool is None or pool <= 1 else int(pool))

    def check_settings(self, trainer: L.Trainer, pl_module: L.LightningModule, loop: str) -> None:
        """Rebuild the protocol with the module's k/target/pool and check it against the data."""
        self.protocol = EvaluationProtocol(**self.protocol_args, **self._model_settings(pl_module))
        try:
            dataset = self.dataset(trainer, loop)
        except RuntimeError:
            return  # the datamodule sets its datasets up later; checked when the evaluation runs
        item = dataset[0]
        x = item[0] if isinstance(item, (tuple, list)) else item
        try:
            self.protocol.check_data(*x.shape[-2:])
        except ValueError as exc:
            raise ValueError(f"RankingRobustness: {exc} (images {tuple(x.shape)})") from None
        model = self.classifier(pl_module)
        params = next(iter(model.parameters()), None)
        example = x.unsqueeze(0).to(params.device if params is not None else "cpu",
                                    params.dtype if params is not None and params.is_floating_point() else torch.float32)
        _, notes = self.protocol.prepare(model, example)
        if trainer.is_global_zero:
            for note in notes:
                log.warning("RankingRobustness: %s", note)

    def settings(self) -> dict[str, Any]:
        """The evaluation settings (for run configs and reports)."""
        return dict(every_n_epochs=self.every_n_epochs, num_samples=self.num_samples, batch_size=self.batch_size,
                    **self.protocol.settings())

    # ------------------------------------------------------------------ the evaluation
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, loop: str) -> None:
        model = self.classifier(pl_module)
        subset = self.eval_subset(trainer, loop)
        protocol = self.protocol
        batches = list(subset)
        if batches:
            specs, notes = protocol.prepare(model, batches[0].x[:1].to(pl_module.device))
        else:  # an empty shard still takes part in the reduction
            specs, notes = protocol.prepare(model, subset.dataset[0][0].unsqueeze(0).to(pl_module.device))
        keys = protocol.keys(specs, subset.has_mask)
        bar = self.progress(trainer, len(subset), f"RankingRobustness ({loop})")
        keep = self.num_images if (trainer.is_global_zero and (self.log_images or self.report)) else 0
        result = None
        try:
            if batches:
                result = protocol.evaluate(
                    model, batches, pl_module.device, keep_images=keep,
                    progress=None if bar is None else (lambda i, done: bar.update(done - bar.n)),
                )
        finally:
            if bar is not None:
                bar.close()
        total, count = sums_and_counts(result.values if result is not None else {}, keys)
        reduced = self.reduce_sum(trainer, torch.cat([total, count]), pl_module.device)
        means = means_from_sums(keys, reduced[: len(keys)], reduced[len(keys):])
        num_images = int(round(float(reduced[len(keys) + keys.index("accuracy")])))
        for name, value in means.items():
            pl_module.log(PREFIX + name, value, on_step=False, on_epoch=True, sync_dist=False)
        self.last_values = {PREFIX + n: v for n, v in means.items()}
        self.evaluated_epochs.append(trainer.current_epoch)
        report = summary(protocol, means, num_images, notes)
        report.update(stage=loop, epoch=trainer.current_epoch, global_step=trainer.global_step)
        self.last_report = report
        if not trainer.is_global_zero:
            return
        self.history.append({"epoch": trainer.current_epoch, "p_at_k": report["methods"]})
        images = result.images if result is not None else {}
        if self.report:
            out = Path(self.report_dir or trainer.log_dir or trainer.default_root_dir)
            self.last_report_paths = write_report(report, out, images)
            log.warning("RankingRobustness: wrote %s", ", ".join(str(p) for p in self.last_report_paths))
        self._log_wandb(trainer, report, images if self.log_images else {})

    # ------------------------------------------------------------------ W&B
    def _log_wandb(self, trainer: L.Trainer, report: dict[str, Any], images: dict[str, dict[str, Any]]) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        import wandb

        step = trainer.global_step
        payload: dict[str, Any] = {}
        eps = report["eps"]
        xs = [float(e.split("/")[0]) for e in eps]
        for method, block in report["methods"].items():
            table = block["p_at_k"]
            srcs = list(table)
            ys = [[0.0 if table[s][e] is None or math.isnan(table[s][e]) else table[s][e] for e in eps] for s in srcs]
            payload[f"{PREFIX}p_at_k_vs_eps/{method}"] = wandb.plot.line_series(
                xs=xs, ys=ys, keys=srcs, title=f"P@k vs eps ({method}, epoch {trainer.current_epoch})",
                xname="eps x 255",
            )
            payload[f"{PREFIX}p_at_k_table/{method}"] = wandb.Table(
                columns=["attack", *eps], data=[[s, *row] for s, row in zip(srcs, ys)]
            )
        for method, item in images.items():
            grid = saliency_grid(item).permute(1, 2, 0).numpy()  # uint8 HWC: wandb writes it as is
            caption = (f"epoch {trainer.current_epoch}: clean | clean saliency | worst attack at "
                       f"{eps_label(item['eps'])} ({', '.join(item['source'])}) | its saliency")
            payload[f"{PREFIX}saliency/{method}"] = wandb.Image(grid, caption=caption)
        for path in self.last_report_paths:
            if path.suffix == ".png":
                payload[f"{PREFIX}report/{path.stem}"] = wandb.Image(str(path))
        for logger in loggers:
            try:
                if not self._config_logged:  # the evaluation settings in the run config, once
                    logger.experiment.config.update({"callbacks/RankingRobustness": self.settings()},
                                                    allow_val_change=True)
                logger.experiment.log({**payload, "trainer/global_step": step})
            except Exception as exc:  # a dashboard extra must never kill a run
                log.warning("RankingRobustness: could not log to W&B: %s", exc)
        self._config_logged = True


__all__ = ["RankingRobustness", "WORST"]
