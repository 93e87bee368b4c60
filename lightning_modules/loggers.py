"""Loggers: Weights & Biases that falls back to offline mode when no account is configured."""

from __future__ import annotations

import netrc
import os
import shutil
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from lightning_modules.reliability import ensure_writable_dir


#: Name of the uploaded LightningCLI configuration in the W&B run's files.
CONFIG_FILE = "lightning_config.yaml"


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

    # ---- what the run shows: full config, resumed runs, nothing left by a failed setup
    @property
    def run_id(self) -> str | None:
        """The W&B run id once the run exists (stored in checkpoints for resuming), else None."""
        return getattr(self._experiment, "id", None) if self._experiment is not None else None

    def resume_run(self, run_id: str) -> None:
        """Continue the W&B run ``run_id`` (``resume="allow"``) instead of starting a new one.

        Must be called before the run starts (the CLI does so for ``fit --ckpt_path``).
        """
        if self._experiment is not None:
            if self._experiment.id != run_id:
                rank_zero_info(f"W&B: run {self._experiment.id} already started; cannot continue run {run_id}")
            return
        self._wandb_init.update(id=run_id, resume="allow")
        self._id = run_id
        rank_zero_info(f"W&B: continuing run {run_id} of the checkpoint")

    def log_config(self, config: dict[str, Any], path: str | None = None) -> None:
        """Put the full resolved configuration in the run config and upload ``path`` (config.yaml)."""
        run = self.experiment
        if not hasattr(run, "config"):  # rank > 0 (DummyExperiment) or disabled
            return
        run.config.update({"cli": config, "seed_everything": config.get("seed_everything")}, allow_val_change=True)
        if path and os.path.isfile(path) and os.path.isdir(getattr(run, "dir", None) or ""):
            # under its own name: W&B keeps the run config in files/config.yaml
            target = os.path.join(run.dir, CONFIG_FILE)
            shutil.copyfile(path, target)
            run.save(target, base_path=run.dir, policy="now")

    def log_metrics(self, metrics, step=None) -> None:
        self._logged_metrics = True
        super().log_metrics(metrics, step)

    def finalize(self, status: str) -> None:
        """On a run that failed before logging any metric (setup errors), remove its W&B run.

        Offline runs are deleted from ``save_dir/wandb``; an online run is finished as failed.
        """
        if (status == "failed" and not getattr(self, "_logged_metrics", False) and self._experiment is not None
                and getattr(self, "_created_run", False)):
            run = self._experiment
            run_dir = Path(getattr(run, "dir", "") or "").parent if getattr(run, "dir", None) else None
            offline = bool(getattr(getattr(run, "settings", None), "_offline", self._offline))
            try:
                run.finish(exit_code=1)
            except Exception:  # the run is being removed: a failure to close it changes nothing
                pass
            self._experiment = None
            if offline and run_dir is not None and run_dir.name.startswith("offline-run-"):
                shutil.rmtree(run_dir, ignore_errors=True)
                rank_zero_info(f"W&B: the run failed before logging anything; removed its offline folder {run_dir}")
            return
        super().finalize(status)

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
        if self._experiment is None and not getattr(self, "_created_run", False):
            import wandb

            self._created_run = wandb.run is None  # else the logger reuses the process's open run
        try:
            return WandbLogger.experiment.fget(self)
        except Exception as exc:  # wandb raises CommError/UsageError/AuthenticationError/timeouts
            if self._offline or self._experiment is not None:
                raise
            import wandb

            if wandb.run is not None:
                wandb.finish(exit_code=1)
            self._notice_offline(self._save_dir or ".", f"starting the online run failed ({type(exc).__name__})")
            self._offline = True
            self._wandb_init["mode"] = "offline"
            return WandbLogger.experiment.fget(self)
