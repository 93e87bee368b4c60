"""Run-level safety checks: writable output folders, checkpoint compatibility, ``ckpt_path: last``.

- :func:`ensure_writable_dir` creates a folder and writes (then removes) a probe file, so an
  unwritable or full log folder fails before training with the path and the OS reason, instead of
  a traceback from deep inside a logger after the first epoch.
- :func:`disk_full_message` turns an ``ENOSPC``/``EDQUOT`` raised mid-run into one clear line.
- :func:`find_last_checkpoint` resolves ``--ckpt_path last`` with versioned loggers: Lightning looks
  for ``last.ckpt`` only in the *new* run's folder (``logs/csv/version_{N+1}/checkpoints``), which
  is empty, and silently starts from scratch; this looks in every version folder.
- :func:`batchnorm_state` / :func:`restore_state`: undo the BatchNorm statistics update of a
  training forward whose loss turned out NaN/inf (the batch is then refused or skipped cleanly).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import signal
import threading
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_modules.checkpoints import (  # noqa: F401  (their home; imported here for old callers)
    ARCHITECTURE_KEYS,
    architecture_differences,
    format_differences,
    state_dict_differences,
)

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class UnwritableDirError(OSError):
    """An output folder (logs, checkpoints) cannot be created or written; the message says why."""

    def __init__(self, message: str, path: str, os_errno: int | None = None) -> None:
        super().__init__(message)
        self.message, self.path, self.os_errno = message, path, os_errno

    def __str__(self) -> str:
        return self.message


def _reason(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno, "") if exc.errno is not None else ""
    text = exc.strerror or str(exc)
    return f"{text} ({code})" if code else text


DEFAULT_SETTINGS = "e.g. the loggers' save_dir, ModelCheckpoint's dirpath or --trainer.default_root_dir"


def ensure_writable_dir(path: str | os.PathLike, what: str = "output folder", setting: str | None = None) -> Path:
    """Create ``path`` if needed and check that a file can be written there (probe, removed).

    Raises :class:`UnwritableDirError` naming ``what``, the path and the OS reason (permission
    denied, read-only file system, no space left, a file in the way, ...).
    """
    path = Path(path)
    probe = path / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        hint = "free some disk space" if exc.errno in _DISK_FULL else "choose a writable folder"
        raise UnwritableDirError(
            f"cannot write to the {what} {str(path)!r}: {_reason(exc)}. Fix its permissions or {hint} "
            f"({setting or DEFAULT_SETTINGS})",
            str(path), exc.errno,
        ) from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return path


def output_dirs(trainer: Any) -> list[tuple[str, str]]:
    """(folder, description) of everything a fit writes to: loggers, checkpoints, the root dir."""
    dirs: dict[str, str] = {}
    for logger in getattr(trainer, "loggers", []) or []:
        save_dir = getattr(logger, "save_dir", None)
        if save_dir:
            dirs.setdefault(str(save_dir), f"{type(logger).__name__} save_dir")
    for callback in getattr(trainer, "checkpoint_callbacks", []) or []:
        dirpath = getattr(callback, "dirpath", None)
        if dirpath:
            dirs.setdefault(str(dirpath), "ModelCheckpoint dirpath")
    root = getattr(trainer, "default_root_dir", None)
    if root and not dirs:
        dirs[str(root)] = "trainer.default_root_dir"
    return list(dirs.items())


def _as_dict(value: Any) -> Any:
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return value


def config_output_dirs(trainer_config: Any) -> list[tuple[str, str]]:
    """(folder, description) from a parsed (not yet instantiated) ``trainer`` config section:
    logger ``save_dir``s, ModelCheckpoint ``dirpath``s and ``default_root_dir``."""
    cfg = _as_dict(trainer_config) or {}
    dirs: dict[str, str] = {}
    loggers = cfg.get("logger")
    for entry in loggers if isinstance(loggers, list) else [loggers]:
        entry = _as_dict(entry)
        if isinstance(entry, dict):
            args = entry.get("init_args") or {}
            save_dir = args.get("save_dir") or args.get("dir")
            if save_dir:
                dirs.setdefault(str(save_dir), f"{str(entry.get('class_path', 'logger')).rsplit('.', 1)[-1]} save_dir")
    callbacks = cfg.get("callbacks")
    for entry in callbacks if isinstance(callbacks, list) else [callbacks]:
        entry = _as_dict(entry)
        if isinstance(entry, dict) and str(entry.get("class_path", "")).endswith("ModelCheckpoint"):
            dirpath = (entry.get("init_args") or {}).get("dirpath")
            if dirpath:
                dirs.setdefault(str(dirpath), "ModelCheckpoint dirpath")
    if cfg.get("default_root_dir"):
        dirs.setdefault(str(cfg["default_root_dir"]), "trainer.default_root_dir")
    return list(dirs.items())


def check_output_dirs(trainer: Any) -> None:
    """:func:`ensure_writable_dir` on every folder of :func:`output_dirs`, or of
    :func:`config_output_dirs` when given a parsed trainer config instead of a Trainer."""
    dirs = output_dirs(trainer) if hasattr(trainer, "loggers") else config_output_dirs(trainer)
    for path, what in dirs:
        ensure_writable_dir(path, what)


def disk_full_message(exc: BaseException) -> str | None:
    """One line for a disk-full error raised while writing logs/checkpoints, else ``None``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            where = f" while writing {exc.filename!r}" if exc.filename else ""
            disk = _disk_of(exc.filename)
            return (
                f"error: the disk is full{where}{disk}: {_reason(exc)}. Free space (or point the loggers and "
                "checkpoints to another disk) and resume with --ckpt_path last; checkpoints are written "
                "atomically, so the last complete one is intact."
            )
        exc = exc.__cause__ or exc.__context__
    return None


def _disk_of(filename: Any) -> str:
    """`` (file system mounted at /x, N MiB free)`` for the folder of ``filename``, or ``""``."""
    if not filename:
        return ""
    folder = Path(str(filename)).resolve().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    mount = folder
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return f" (file system mounted at {mount})"
    return f" (file system mounted at {mount}, {free / 2**20:.0f} MiB free)"


def batchnorm_state(model: Any) -> list[tuple[Any, Any]]:
    """(buffer, copy) for every running statistic of the model's BatchNorm layers.

    A training forward moves them before the loss is known; :func:`restore_state` undoes that when
    the batch turns out to be non-finite, so a skipped or failing batch leaves no NaN behind.
    """
    saved = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buf = getattr(module, name, None)
                if isinstance(buf, torch.Tensor):
                    saved.append((buf, buf.detach().clone()))
    return saved


def restore_state(saved: list[tuple[Any, Any]]) -> None:
    """Copy the values saved by :func:`batchnorm_state` back in place."""
    with torch.no_grad():
        for buf, copy in saved:
            buf.copy_(copy)


def checkpoint_dirs(trainer: Any) -> list[str]:
    """Folders where this trainer's checkpoint callbacks write, over *all* logger versions."""
    dirs: list[str] = []
    for callback in getattr(trainer, "checkpoint_callbacks", []) or []:
        if getattr(callback, "dirpath", None):
            dirs.append(str(callback.dirpath))
            continue
        loggers = getattr(trainer, "loggers", []) or []
        if loggers:
            save_dir = loggers[0].save_dir or trainer.default_root_dir
            pattern = os.path.join(glob.escape(str(save_dir)), glob.escape(str(loggers[0].name)), "*", "checkpoints")
            dirs.extend(sorted(glob.glob(pattern)))
        else:
            dirs.append(os.path.join(trainer.default_root_dir, "checkpoints"))
    return list(dict.fromkeys(dirs))


def find_last_checkpoint(trainer: Any) -> str | None:
    """The most recently written ``last*.ckpt`` (else any ``*.ckpt``) in :func:`checkpoint_dirs`."""
    lasts, others = [], []
    for d in checkpoint_dirs(trainer):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if name.endswith(".ckpt"):
                (lasts if name.startswith("last") else others).append(os.path.join(d, name))
    candidates = lasts or others
    if not candidates:
        return None
    return max(candidates, key=lambda p: (os.path.getmtime(p), p))


@contextlib.contextmanager
def raise_on_sigterm(make_exception: Callable[[], BaseException]) -> Iterator[None]:
    """While the block runs, SIGTERM raises ``make_exception()`` at once, between two Python
    operations, after calling the handler installed before (Lightning's records the signal and
    stops its launcher's children): a long step or evaluation ends within seconds instead of at
    the end of the step. Nested blocks: the innermost wins (it knows what was interrupted). Main
    thread only; the previous handler is restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        if callable(previous):
            try:
                previous(signum, frame)
            except BaseException:  # an outer block's own stop: this one says more
                pass
        raise make_exception()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
