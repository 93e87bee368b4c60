"""The command line: LightningCLI over RobustClassifier and any LightningDataModule.

``python train.py fit -c configs/default.yaml`` trains; ``validate``/``test`` evaluate a checkpoint
(``--ckpt_path``); ``--print_config`` shows the merged configuration. Config files compose:
later ``-c`` files override earlier ones (e.g. trainer/, data/, model/ pieces).
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_modules.classifier import FP16_PRECISIONS, RobustClassifier
from lightning_modules.reliability import (
    UnwritableDirError,
    check_output_dirs,
    checkpoint_dirs,
    disk_full_message,
    find_last_checkpoint,
)


class RobustCLI(LightningCLI):
    """LightningCLI with the project's defaults and early configuration checks."""

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        trainer = config.get("trainer", {})
        objective = config.get("model", {}).get("objective", "vanilla")
        if objective != "vanilla" and objective is not None and trainer.get("sync_batchnorm"):
            raise SystemExit(
                f"error: trainer.sync_batchnorm=true cannot be used with model.objective={objective!r}: "
                "SyncBatchNorm does not support double backward; set trainer.sync_batchnorm: false"
            )
        if self.subcommand == "fit":
            check_output_dirs(trainer)  # before the loggers exist: their constructors may write
        precision = trainer.get("precision")
        if objective != "vanilla" and objective is not None and str(precision) in FP16_PRECISIONS:
            raise SystemExit(
                f"error: trainer.precision={precision!r} (fp16) cannot be used with model.objective={objective!r}: "
                "its double backprop needs the input gradient unscaled, which fp16 loss scaling does not "
                "protect from underflow; use trainer.precision: bf16-mixed or 32-true"
            )

    # ---- reliability (see README "Reliability"): safe loading, writable outputs, `ckpt_path: last`
    def before_fit(self) -> None:
        check_output_dirs(self.trainer)  # unwritable/full log or checkpoint folder: fail now, clearly
        self._resolve_checkpoint_args()

    def before_validate(self) -> None:
        self._resolve_checkpoint_args()

    def before_test(self) -> None:
        self._resolve_checkpoint_args()

    def _resolve_checkpoint_args(self) -> None:
        kwargs = self.config_init[self.subcommand]
        if "weights_only" in kwargs and kwargs["weights_only"] is None:
            kwargs["weights_only"] = True  # never unpickle arbitrary objects from a checkpoint
        if kwargs.get("ckpt_path") == "last":
            found = find_last_checkpoint(self.trainer)
            if found is not None:
                rank_zero_info(f"--ckpt_path last: resuming from {found}")
                kwargs["ckpt_path"] = found
            else:
                rank_zero_warn(
                    f"--ckpt_path last: no checkpoint found in {checkpoint_dirs(self.trainer) or 'any checkpoint folder'}; "
                    "starting from scratch"
                )
                kwargs["ckpt_path"] = None


def main(args=None) -> RobustCLI:
    """Entry point used by train.py (and by tests, with ``args``).

    An unwritable output folder or a full disk ends the run with one clear line (exit status 1).
    """
    try:
        return RobustCLI(
            RobustClassifier,
            LightningDataModule,
            subclass_mode_data=True,
            trainer_defaults={"inference_mode": False},
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except UnwritableDirError as exc:
        raise SystemExit(f"error: {exc}") from None
    except OSError as exc:
        message = disk_full_message(exc)
        if message is None:
            raise
        raise SystemExit(message) from exc
