"""Loggers: Weights & Biases that falls back to offline mode when no account is configured."""

from __future__ import annotations

import netrc
import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from lightning_modules.reliability import ensure_writable_dir


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


def wandb_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """(reachable, reason): can a TCP connection to the W&B server (``WANDB_BASE_URL``) be opened?

    Runs in a daemon thread with a hard ``timeout`` (name resolution itself can hang).
    """
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host = url.hostname or "api.wandb.ai"
    port = url.port or (80 if url.scheme == "http" else 443)
    result: list[str] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append("")
        except OSError as exc:
            result.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if not result:
        return False, f"no answer from {host}:{port} within {timeout:g} s"
    return result[0] == "", result[0] and f"{host}:{port}: {result[0]}"


class RobustWandbLogger(WandbLogger):
    """``WandbLogger`` that runs offline with a one-line notice instead of failing.

    Offline (one notice, training continues) when no W&B credentials exist, when the W&B server
    cannot be reached, or when starting the online run fails. ``WANDB_MODE`` (online/offline/
    disabled) set by the user wins over the automatic choice. Models are not uploaded unless
    ``log_model`` is set. The API key is never logged or saved with the config.
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
        self._offline_notice_given = False
        if not offline and mode not in ("online", "offline", "disabled", "dryrun"):
            if not wandb_credentials_available():
                offline = True
                self._notice_offline(save_dir, "no API key found")
            else:
                reachable, reason = wandb_reachable()
                if not reachable:
                    offline = True
                    self._notice_offline(save_dir, f"server not reachable ({reason})")
        if mode in ("offline", "dryrun"):
            offline = True
        ensure_writable_dir(save_dir, "W&B save_dir")
        super().__init__(
            project=project, entity=entity, name=name, save_dir=save_dir, offline=offline,
            log_model=log_model, tags=tags, **kwargs,
        )

    def _notice_offline(self, save_dir: str, why: str) -> None:
        if self._offline_notice_given:
            return
        self._offline_notice_given = True
        rank_zero_info(
            f"W&B: {why}, logging offline to {save_dir}/wandb "
            "(run `wandb login` then `wandb sync` to upload)"
        )

    @property
    @rank_zero_experiment
    def experiment(self):
        """The wandb run; if starting it online fails (network, auth), an offline run instead."""
        try:
            return WandbLogger.experiment.fget(self)
        except Exception as exc:  # wandb raises CommError/UsageError/AuthenticationError/timeouts
            if self._offline or self._experiment is not None:
                raise
            import wandb

            if wandb.run is not None:
                wandb.finish(exit_code=1, quiet=True)
            self._notice_offline(self._save_dir or ".", f"starting the online run failed ({type(exc).__name__})")
            self._offline = True
            self._wandb_init["mode"] = "offline"
            return WandbLogger.experiment.fget(self)
