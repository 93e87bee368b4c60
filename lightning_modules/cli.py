"""The command line: LightningCLI over RobustClassifier and any LightningDataModule.

``python train.py fit -c configs/default.yaml`` trains; ``validate``/``test`` evaluate a checkpoint
(``--ckpt_path``); ``--print_config`` shows the merged configuration. Config files compose:
later ``-c`` files override earlier ones (e.g. trainer/, data/, model/ pieces).
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from lightning_modules.classifier import RobustClassifier


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


def main(args=None) -> RobustCLI:
    """Entry point used by train.py (and by tests, with ``args``)."""
    return RobustCLI(
        RobustClassifier,
        LightningDataModule,
        subclass_mode_data=True,
        trainer_defaults={"inference_mode": False},
        save_config_kwargs={"overwrite": True},
        args=args,
    )
