"""Loggers: Weights & Biases that falls back to offline mode when no account is configured."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info


def wandb_credentials_available() -> bool:
    """True when an API key is set in the environment or stored by ``wandb login`` (netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc_path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        hosts = netrc.netrc(str(netrc_path)).hosts if netrc_path.is_file() else {}
    except (netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in hosts)


class RobustWandbLogger(WandbLogger):
    """``WandbLogger`` that runs offline with a one-line notice when no W&B credentials exist.

    ``WANDB_MODE`` (online/offline/disabled) set by the user always wins. Models are not uploaded
    unless ``log_model`` is set. The API key is never logged or saved with the config.
    """

    def __init__(
        self,
        project: str = "robust-explainers",
        entity: str | None = None,
        name: str | None = None,
        save_dir: str = "logs",
        offline: bool = False,
        log_model: bool | str = False,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        mode = os.environ.get("WANDB_MODE", "").lower()
        if not offline and mode not in ("online", "offline", "disabled", "dryrun") and not wandb_credentials_available():
            offline = True
            rank_zero_info(
                "W&B: no API key found, logging offline to "
                f"{save_dir}/wandb (run `wandb login` then `wandb sync` to upload)"
            )
        if mode in ("offline", "dryrun"):
            offline = True
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(
            project=project, entity=entity, name=name, save_dir=save_dir, offline=offline,
            log_model=log_model, tags=tags, **kwargs,
        )
