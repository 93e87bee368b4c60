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
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.base import EvaluationCallback, line_series
from explanations.attacks import ATTACKS
from explanations.evaluation import (
    WORST,
    EvaluationProtocol,
    EvaluationResult,
    EvaluationStopped,
    ProtocolSettings,
    eps_label,
    means_from_sums,
    moment_sums,
    standard_errors,
)
from explanations.plots import saliency_grid
from explanations.report import (
    PER_IMAGE_FILE,
    PerImageLog,
    build_report,
    result_from_rows,
    rows_of,
    save_report,
)
from lightning_modules.reliability import ensure_writable_dir

log = logging.getLogger(__name__)

PREFIX = "robustness/"


class RankingRobustness(EvaluationCallback):
    """Run the evaluation protocol on a fixed validation (or test) subset and log the results.

    Args:
        every_n_epochs, num_samples, batch_size: see ``callbacks.base.EvaluationCallback``.
        protocol: the evaluation settings, :class:`explanations.evaluation.ProtocolSettings`
            (budgets, ensemble, steps, k, ...; its ``seed`` also picks the images); k, target,
            pool and pair_set left null are the LightningModule's (``hparams``).
        log_images, num_images: W&B saliency grids. report, report_dir: write the report files.

    Examples:
        ``{class_path: callbacks.RankingRobustness, init_args: {num_samples: 64, protocol: {eps:
        [0.0078431, 0.0313725], steps: 10}}}``; a flag: ``--trainer.callbacks.protocol.steps=100``.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_samples: int = 64,
        batch_size: int = 64,
        protocol: ProtocolSettings | None = None,
        log_images: bool = True,
        num_images: int = 8,
        report: bool = False,
        report_dir: str | None = None,
    ) -> None:
        self.config = protocol if protocol is not None else ProtocolSettings()
        super().__init__(every_n_epochs, num_samples, batch_size, self.config.seed)
        self.protocol = EvaluationProtocol(self.config)  # the model's defaults replace it in setup
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
    def check_settings(self, trainer: L.Trainer, pl_module: L.LightningModule, loop: str) -> None:
        """The protocol with the module's k/target/pool/pair_set, checked against the data."""
        self.protocol = EvaluationProtocol(self.config.for_model(getattr(pl_module, "hparams", {}) or {}))
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
        if self.report and self.report_dir:  # an unwritable report folder fails now, not after the attacks
            ensure_writable_dir(self.report_dir, "RankingRobustness report_dir", "--trainer.callbacks.report_dir")

    def settings(self) -> dict[str, Any]:
        """The evaluation settings (for run configs and reports)."""
        return dict(every_n_epochs=self.every_n_epochs, num_samples=self.num_samples, batch_size=self.batch_size,
                    **self.protocol.settings())

    # ------------------------------------------------------------------ the evaluation
    def _report_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.report_dir or trainer.log_dir or trainer.default_root_dir)

    def measured(self, trainer: L.Trainer, pl_module: L.LightningModule, loop: str, specs, seconds: float,
                 resumed: int) -> dict[str, Any]:
        """The report's ``measured`` block: :meth:`describe` plus the protocol as run and the time."""
        protocol = self.protocol
        out = self.describe(trainer, pl_module, loop)
        restarts = {}
        for spec in specs:
            if "restarts" in ATTACKS[spec.attack].options:  # the optimisers (not the noise baseline)
                restarts[spec.name] = int({**protocol.attack_kwargs, **spec.kwargs}.get("restarts", 1))
        out["protocol"] = {"k": protocol.k_count, "features": protocol.num_features, "steps": protocol.steps,
                           "restarts": restarts, "seed": protocol.seed, "eps": [eps_label(e) for e in protocol.eps]}
        out["time"] = {"seconds": round(seconds, 2), "resumed_images": resumed}
        return out

    def _per_image_log(self, trainer: L.Trainer, pl_module: L.LightningModule, loop: str, subset, keys):
        """The per-image record of this rank (``report: true`` only) and the rows it resumes from."""
        folder = self._report_dir(trainer)
        described = self.describe(trainer, pl_module, loop)
        data = {k: v for k, v in described["data"].items() if k != "data_dir"}
        ids = subset.indices.tolist()
        model = dict(described["model"], weights={k: v for k, v in described["model"]["weights"].items() if k != "path"})
        fingerprint = {"protocol": self.protocol.settings(), "model": model, "data": data, "images": ids}
        record = PerImageLog(folder / f"{Path(PER_IMAGE_FILE).stem}.part-{trainer.global_rank}.jsonl", fingerprint, keys)
        resumable = trainer.state.fn != TrainerFn.FITTING  # a fit's model changes between evaluations
        earlier = []
        if resumable:
            complete = folder / PER_IMAGE_FILE
            earlier = ([complete] if complete.is_file() else []) + sorted(folder.glob(f"{Path(PER_IMAGE_FILE).stem}.part-*.jsonl"))
        done = record.start(earlier, set(subset.shard.tolist()))
        return record, done

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, loop: str) -> None:
        model = self.classifier(pl_module)
        subset = self.eval_subset(trainer, loop)
        protocol = self.protocol
        start = time.perf_counter()
        batches = list(subset)
        example = batches[0].x[:1] if batches else subset.dataset[0][0].unsqueeze(0)  # an empty shard still reduces
        specs, notes = protocol.prepare(model, example.to(pl_module.device))
        keys = protocol.keys(specs, subset.has_mask)
        record, done = self._per_image_log(trainer, pl_module, loop, subset, keys) if self.report else (None, {})
        if done:
            batches = [b.select(~torch.isin(b.ids, torch.tensor(sorted(done), dtype=torch.long))) for b in batches]
            batches = [b for b in batches if b.ids.numel()]
            log.warning("RankingRobustness: %d of %d images of this evaluation were done already (%s): resuming",
                        len(done), len(subset), record.path.parent)
        bar = self.progress(trainer, len(subset), f"RankingRobustness ({loop})")
        if bar is not None:
            bar.update(len(done))
        keep = self.num_images if (trainer.is_global_zero and (self.log_images or self.report)) else 0
        parts: list[EvaluationResult] = []
        try:
            if batches:
                new = protocol.evaluate(
                    model, batches, pl_module.device, keep_images=keep,
                    progress=None if bar is None else (lambda i, n: bar.update(len(done) + n - bar.n)),
                    should_stop=lambda: self.stop_requested(trainer),
                    on_batch=None if record is None else record.append,
                )
                parts.append(new)
        except (EvaluationStopped, SIGTERMException, KeyboardInterrupt) as exc:
            kept = (f"; the finished batches are kept in {record.path}: rerun the same command with "
                    f"--trainer.callbacks.report_dir {record.path.parent} to resume") if record is not None else ""
            message = f"RankingRobustness: evaluation stopped ({'SIGINT' if isinstance(exc, KeyboardInterrupt) else 'SIGTERM'}){kept}"
            if isinstance(exc, KeyboardInterrupt):
                log.warning(message)
                raise
            raise SIGTERMException(f"error: {message}") from None
        finally:
            if bar is not None:
                bar.close()
        if done:
            parts.insert(0, result_from_rows(done, keys))
        result = EvaluationResult.cat(parts) if parts else None
        if result is not None and parts[-1].images:
            result.images = parts[-1].images
        total, count, squares = moment_sums(result.values if result is not None else {}, keys)
        reduced = self.reduce_sum(trainer, torch.cat([total, count, squares]), pl_module.device)
        n = len(keys)
        means = means_from_sums(keys, reduced[:n], reduced[n : 2 * n])
        errors = standard_errors(keys, reduced[:n], reduced[n : 2 * n], reduced[2 * n :])
        num_images = int(round(float(reduced[n + keys.index("accuracy")])))
        for name, value in means.items():
            pl_module.log(PREFIX + name, value, on_step=False, on_epoch=True, sync_dist=False)
        self.last_values = {PREFIX + name: v for name, v in means.items()}
        self.evaluated_epochs.append(trainer.current_epoch)
        rows = None
        if record is not None:  # every rank takes part in the gather
            mine = rows_of(result, keys) if result is not None else {}
            rows = self._gather_per_image(trainer, mine, len(keys))
        measured = self.measured(trainer, pl_module, loop, specs, time.perf_counter() - start, len(done))
        report = build_report(protocol, means, num_images, notes, se=errors, measured=measured)
        report.update(stage=loop, epoch=trainer.current_epoch, global_step=trainer.global_step)
        self.last_report = report
        if not trainer.is_global_zero:
            return
        self.history.append({"epoch": trainer.current_epoch, "p_at_k": report["methods"]})
        images = result.images if result is not None else {}
        if self.report:
            out = self._report_dir(trainer)
            record.write_complete(out / PER_IMAGE_FILE, rows)
            for part in out.glob(f"{Path(PER_IMAGE_FILE).stem}.part-*.jsonl"):
                part.unlink(missing_ok=True)
            class_names = getattr(getattr(trainer, "datamodule", None), "class_names", None)
            self.last_report_paths = save_report(report, out, images, class_names, log=log.error)
            self.last_report_paths.append(out / PER_IMAGE_FILE)
            log.warning("RankingRobustness: wrote %s", ", ".join(str(p) for p in self.last_report_paths))
        self._log_wandb(trainer, report, images if self.log_images else {})

    def _gather_per_image(self, trainer: L.Trainer, rows: dict, width: int) -> dict:
        """Every rank's per-image rows on every rank: {id: (label, values)}."""
        if trainer.world_size == 1:
            return rows
        nan = float("nan")
        matrix = torch.tensor([[float(i), float(-1 if lab is None else lab), *[nan if v is None else v for v in vals]]
                               for i, (lab, vals) in sorted(rows.items())], dtype=torch.float64).reshape(-1, width + 2)
        gathered = self.gather_rows(trainer, matrix)
        return {int(r[0]): (None if r[1] < 0 else int(r[1]), [None if math.isnan(v) else v for v in r[2:].tolist()])
                for r in gathered}

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
            ys = [[table[s][e] for e in eps] for s in srcs]  # None where undefined (not drawn, not 0)
            payload[f"{PREFIX}p_at_k_vs_eps/{method}"] = line_series(
                wandb, xs, ys, srcs, title=f"P@k vs eps ({method}, epoch {trainer.current_epoch})", xname="eps x 255",
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
                # what was measured (model, weights and hash, data, split, time): in the run summary
                logger.experiment.summary[f"{PREFIX}measured"] = report.get("measured", {})
                logger.experiment.log({**payload, "trainer/global_step": step})
            except Exception as exc:  # a dashboard extra must never kill a run
                log.warning("RankingRobustness: could not log to W&B: %s", exc)
        self._config_logged = True


__all__ = ["RankingRobustness", "WORST"]
