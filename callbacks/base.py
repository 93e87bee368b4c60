"""EvaluationCallback: what the per-epoch evaluation callbacks share.

- Schedule: after every ``every_n_epochs``-th training epoch and always after the last one
  (``fit``), once per ``validate`` run, and once per ``test`` run (on the test set); never in the
  sanity check, never twice in one epoch.
- Data: the loop's dataset (``datamodule.<val|test>_dataset`` or the loop's dataloader's
  ``.dataset``), a fixed seeded class-balanced subset (``callbacks/_eval_subset.py``), sharded
  across ranks without duplicates.
- Exact DDP reduction: per-sample values are summed per rank and all-reduced (sum) by
  :meth:`reduce_sum`, so every rank derives what one process would.
- Inference-mode guard: input gradients need ``trainer.inference_mode: false``; refused in
  ``setup`` (before any epoch) and again when the evaluation runs.
- Progress: a tqdm bar (rank zero, when the trainer shows a progress bar) and an INFO log line
  per evaluation.
- Stop: SIGTERM raises inside the evaluation at once (``lightning_modules.reliability.raise_on_sigterm``;
  Lightning's handler still records it), so a ``validate`` with a long evaluation ends within seconds.
- What was measured: :meth:`describe` (model and weights source with its sha256, data, split and
  its provenance, the subset), stated in every report.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor, nn

from callbacks._eval_subset import EvalSubset
from explanations.evaluation import EvaluationStopped
from explanations.files import file_sha256
from lightning_modules.checkpoints import checkpoint_progress
from lightning_modules.reliability import raise_on_sigterm

log = logging.getLogger(__name__)

LOOPS = ("validate", "test")


def check_grad_enabled(trainer: L.Trainer, owner: str, stage: str | None = None) -> None:
    """Refuse Lightning's inference mode where the evaluation runs: input gradients need it off.

    ``stage`` (``fit``/``validate``/``test``) checks the loop that stage will use before it runs
    (Lightning validates under ``no_grad`` inside ``fit``, which ``torch.enable_grad()`` lifts, but
    under the Trainer's ``inference_mode`` in ``validate``/``test``); without it, the current grad
    mode is checked.
    """
    loop = None
    if stage == "fit":
        loop = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "val_loop", None)
    elif stage in LOOPS:
        loop = getattr(trainer, f"{stage}_loop", None)
    if getattr(loop, "inference_mode", False) or torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{owner} needs input gradients during {stage or 'evaluation'}, but the Trainer runs it under "
            "torch.inference_mode. Set `trainer.inference_mode: false` in the config "
            "(or Trainer(inference_mode=False))."
        )


class EvaluationCallback(L.Callback):
    """Base of the evaluation callbacks (see the module docstring).

    Args:
        every_n_epochs: evaluate after every n-th training epoch (and after the last one).
        num_samples: size of the evaluation subset over all ranks. batch_size: per forward pass.
        seed: picks the subset and keys all per-sample randomness.
    """

    def __init__(self, every_n_epochs: int = 1, num_samples: int = 64, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        for name, value in (("every_n_epochs", every_n_epochs), ("num_samples", num_samples),
                            ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__} {name}={value!r} must be an integer >= 1")
        self.every_n_epochs, self.num_samples, self.batch_size, self.seed = every_n_epochs, num_samples, batch_size, int(seed)
        self._subset: EvalSubset | None = None
        self._subset_key: tuple | None = None
        self._last_epoch: int | None = None
        self.last_duration_s = 0.0
        self.total_duration_s = 0.0
        self.last_values: dict[str, float] = {}

    @property
    def owner(self) -> str:
        return type(self).__name__

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage in ("fit", *LOOPS):
            check_grad_enabled(trainer, self.owner, stage)
            self.check_settings(trainer, pl_module, "test" if stage == "test" else "validate")

    def check_settings(self, trainer: L.Trainer, pl_module: L.LightningModule, loop: str) -> None:
        """Check the settings against the model and data before any work (subclasses)."""

    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != TrainerFn.FITTING:
            return trainer.state.fn in (TrainerFn.VALIDATING, TrainerFn.TESTING)
        epoch = trainer.current_epoch
        if self._last_epoch == epoch:  # validation ran more than once this epoch
            return False
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch + 1 >= trainer.max_epochs
        return (epoch + 1) % self.every_n_epochs == 0 or last

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._due(trainer):
            self._timed_run(trainer, pl_module, "validate")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._due(trainer):
            self._timed_run(trainer, pl_module, "test")

    def _timed_run(self, trainer: L.Trainer, pl_module: L.LightningModule, loop: str) -> None:
        check_grad_enabled(trainer, self.owner)
        self._last_epoch = trainer.current_epoch if trainer.state.fn == TrainerFn.FITTING else None
        start = time.perf_counter()
        try:
            with raise_on_sigterm(lambda: EvaluationStopped("SIGTERM")):
                self.run(trainer, pl_module, loop)
        except EvaluationStopped:
            raise SIGTERMException(f"error: {self.owner}: evaluation stopped (SIGTERM)") from None
        self.last_duration_s = time.perf_counter() - start
        self.total_duration_s += self.last_duration_s
        if trainer.is_global_zero:
            log.info("%s: %s evaluation of epoch %d took %.1f s", self.owner, loop, trainer.current_epoch,
                     self.last_duration_s)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, loop: str) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared pieces
    @staticmethod
    def classifier(pl_module: L.LightningModule) -> nn.Module:
        """The network evaluated: ``pl_module.model`` if present, else the module itself."""
        return getattr(pl_module, "model", pl_module)

    def dataset(self, trainer: L.Trainer, loop: str):
        split = "test" if loop == "test" else "val"
        datamodule = getattr(trainer, "datamodule", None)
        dataset = getattr(datamodule, f"{split}_dataset", None) if datamodule is not None else None
        if dataset is None:
            loaders = trainer.test_dataloaders if loop == "test" else trainer.val_dataloaders
            loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
            dataset = getattr(loader, "dataset", None)
        if dataset is None:
            raise RuntimeError(
                f"{self.owner} needs a {split} dataset: a datamodule with `{split}_dataset` (after setup) "
                f"or a {split} dataloader with a `.dataset`"
            )
        return dataset

    def eval_subset(self, trainer: L.Trainer, loop: str) -> EvalSubset:
        """This rank's shard of the fixed evaluation subset of the loop's dataset (cached)."""
        dataset = self.dataset(trainer, loop)
        if len(dataset) >= trainer.world_size and self.num_samples < trainer.world_size:
            raise ValueError(
                f"{self.owner} num_samples={self.num_samples} is smaller than the {trainer.world_size} "
                "ranks; give every rank at least one sample"
            )
        key = (id(dataset), trainer.global_rank, trainer.world_size)
        if self._subset is None or self._subset_key != key:
            self._subset = EvalSubset(
                dataset, self.num_samples, self.seed, trainer.global_rank, trainer.world_size, self.batch_size
            )
            self._subset_key = key
        return self._subset

    @staticmethod
    def stop_requested(trainer: L.Trainer) -> bool:
        """Whether the process received SIGTERM (Lightning's signal connector records it)."""
        return bool(getattr(trainer, "received_sigterm", False))

    def describe(self, trainer: L.Trainer, pl_module: L.LightningModule, loop: str) -> dict[str, Any]:
        """What this evaluation measures: ``{"model": {...}, "data": {...}}`` (see module docstring)."""
        model = self.classifier(pl_module)
        hparams = dict(getattr(pl_module, "hparams", {}) or {})
        backbone = hparams.get("backbone", type(model).__name__)
        if isinstance(backbone, dict):
            backbone = backbone.get("class_path", str(backbone))
        described = {
            "model": {"backbone": str(backbone), "parameters": sum(p.numel() for p in model.parameters()),
                      "weights": weights_source(trainer, hparams)},
        }
        split = "test" if loop == "test" else "val"
        dataset = self.dataset(trainer, loop)
        datamodule = getattr(trainer, "datamodule", None)
        data: dict[str, Any] = {"split": split, "split_size": len(dataset)}
        if datamodule is not None:
            dm_hparams = dict(getattr(datamodule, "hparams", {}) or {})
            data["datamodule"] = f"{type(datamodule).__module__}.{type(datamodule).__qualname__}"
            if dm_hparams.get("data_dir"):
                data["data_dir"] = os.path.abspath(str(dm_hparams["data_dir"]))
            describe = getattr(datamodule, "describe_split", None)
            data["provenance"] = describe(split) if callable(describe) else "not stated by the DataModule"
            held_out = getattr(datamodule, "held_out", None)
            data["held_out"] = bool(held_out(split)) if callable(held_out) else None
        else:
            data.update(datamodule=None, provenance=f"the trainer's {split} dataloader (not stated)", held_out=None)
        subset = self._subset
        if subset is not None:
            data["subset"] = (f"{int(subset.indices.numel())} of {len(dataset)} images, "
                              f"{'class-balanced' if subset.balanced else 'first of a permutation'}, seed {self.seed}")
        described["data"] = data
        return described

    @staticmethod
    def gather_rows(trainer: L.Trainer, matrix: Tensor) -> Tensor:
        """All ranks' rows (R_r, C) float64 on rank order (padded rows dropped): (sum R_r, C).

        A row whose first entry is negative is padding (shards differ in size by at most one)."""
        if trainer.world_size == 1:
            return matrix
        size = torch.tensor([float(matrix.shape[0])], dtype=torch.float64)
        longest = int(trainer.strategy.reduce(size.to(trainer.strategy.root_device), reduce_op="max").item())
        padded = torch.full((longest, matrix.shape[1]), -1.0, dtype=torch.float64)
        padded[: matrix.shape[0]] = matrix
        gathered = trainer.strategy.all_gather(padded.to(trainer.strategy.root_device)).cpu().reshape(-1, matrix.shape[1])
        return gathered[gathered[:, 0] >= 0]

    @staticmethod
    def reduce_sum(trainer: L.Trainer, vector: Tensor, device: torch.device | str) -> Tensor:
        """Sum of ``vector`` over all ranks (float64 on ``device`` for the collective), on the CPU."""
        if trainer.world_size == 1:
            return vector
        return trainer.strategy.reduce(vector.to(device), reduce_op="sum").cpu()

    def progress(self, trainer: L.Trainer, total: int, desc: str | None = None) -> Any:
        """A tqdm bar over ``total`` images on rank zero when the trainer shows progress, else None."""
        if not trainer.is_global_zero or getattr(trainer, "progress_bar_callback", None) is None:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm ships with lightning
            return None
        return tqdm(total=total, desc=desc or self.owner, leave=False, unit="img", dynamic_ncols=True)


def weights_source(trainer: L.Trainer, hparams: dict[str, Any]) -> dict[str, Any]:
    """Where the evaluated weights come from: this run's training, ``--ckpt_path``, ``init_from``,
    ``weights_file``, ``pretrained`` (timm hub) or a random initialisation; files with their sha256."""
    def file(kind: str, path: Any) -> dict[str, Any]:
        path = os.path.abspath(str(path))
        return {"source": kind, "path": path, "sha256": file_sha256(path) if os.path.isfile(path) else None}

    if trainer.state.fn == TrainerFn.FITTING:
        return {"source": "trained in this run", "epoch": trainer.current_epoch, "global_step": trainer.global_step}
    if getattr(trainer, "ckpt_path", None):
        return {**file("checkpoint", trainer.ckpt_path), **checkpoint_progress(trainer.ckpt_path)}
    if hparams.get("init_from"):
        return file("init_from", hparams["init_from"])
    if hparams.get("weights_file"):
        return file("weights_file", hparams["weights_file"])
    if hparams.get("pretrained"):
        return {"source": "pretrained", "name": f"timm hub weights of {hparams.get('backbone')}"}
    return {"source": "random initialisation (no checkpoint, weights_file or pretrained weights)"}


def line_series(wandb: Any, xs: list[float], ys: list[list[float | None]], keys: list[str], **kwargs: Any) -> Any:
    """``wandb.plot.line_series`` with undefined points (None/NaN) left out of each series, not drawn as 0."""
    def defined(v: float | None) -> bool:
        return v is not None and not math.isnan(v)

    series_x = [[x for x, v in zip(xs, row) if defined(v)] for row in ys]
    series_y = [[v for v in row if defined(v)] for row in ys]
    return wandb.plot.line_series(xs=series_x, ys=series_y, keys=keys, **kwargs)
