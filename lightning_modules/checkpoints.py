"""Checkpoint and weight-file I/O: reading (weights_only, errors naming the file), atomic writing,
and comparing a checkpoint's settings with the run's.

- :func:`read_checkpoint`: ``torch.load(weights_only=True)`` whose errors name the file and say
  what it is not (missing, not a checkpoint, a pickle with arbitrary objects).
- :class:`AtomicCheckpointIO`: Lightning's checkpoint writer, but the bytes go to a temporary file
  in the destination folder, are fsynced, then renamed over the destination: a full disk or a
  crash leaves the previous checkpoint and no partial file; the error names the file and disk.
- :func:`hparams_differences`: ``{key: (checkpoint, run)}`` for the model settings that differ,
  used by the CLI to refuse an explicit ``--ckpt_path`` whose settings disagree with the flags and
  a ``--ckpt_path last`` that belongs to another run.
"""

from __future__ import annotations

import os
import uuid
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

#: Settings that do not change what a checkpoint means (how the step runs, where it starts from):
#: a run may set them differently from the checkpoint it loads, and the run's value is used.
RUNTIME_KEYS: tuple[str, ...] = (
    "compile", "fast_batchnorm", "lean_layers", "nonfinite", "init_from", "pretrained", "weights_file",
)


class CheckpointReadError(ValueError):
    """A checkpoint or weight file cannot be read; the message names the file and why."""


def read_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that name ``path``.

    Raises:
        FileNotFoundError: no such file.
        CheckpointReadError: not a torch checkpoint (e.g. a text file), or it holds pickled
            objects other than tensors and containers (refused: unpickling can run code).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        text = str(exc)
        with open(path, "rb") as f:
            head = f.read(4)
        looks_like_torch = zipfile.is_zipfile(path) or head[:1] == b"\x80"  # zip archive or legacy pickle
        if looks_like_torch and ("Weights only load failed" in text or "weights_only" in text):
            reason = ("it holds pickled Python objects other than tensors, refused by "
                      "torch.load(weights_only=True): unpickling them can run arbitrary code")
        else:
            reason = f"it is not a PyTorch checkpoint or it is truncated ({type(exc).__name__}: {text.splitlines()[0][:160] if text else ''})"
        raise CheckpointReadError(f"cannot read the {what} {str(path)!r}: {reason}") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to ``<dir>/.<name>.tmp-*``, fsync, then ``os.replace`` onto ``<dir>/<name>``.

    The rename is atomic on one file system, so the destination is either the previous complete
    file or the new complete file; on any error the temporary file is removed and the ``OSError``
    carries the destination as its ``filename`` (so the disk-full message names it).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint got storage_options={storage_options!r}, which it does "
                "not support; remove them"
            )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            _unlink(tmp)
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        except BaseException:
            _unlink(tmp)
            raise


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _plain(value: Any) -> Any:
    """Namespaces/dicts/lists to plain comparable values (jsonargparse Namespace has as_dict)."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _same(a: Any, b: Any) -> bool:
    a, b = _plain(a), _plain(b)
    if a is None and b == {} or a == {} and b is None:  # backbone_kwargs / objective_kwargs
        return True
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return a == b and isinstance(a, float) == isinstance(b, float)
    return a == b


def hparams_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], keys: Iterable[str] | None = None,
    ignore: Iterable[str] = RUNTIME_KEYS,
) -> dict[str, tuple[Any, Any]]:
    """``{key: (checkpoint value, run value)}`` for the keys present in both that differ.

    ``keys`` defaults to every key of ``saved``; ``ignore`` (default :data:`RUNTIME_KEYS`) and
    keys starting with ``_`` are skipped. ``None`` and ``{}`` count as equal; ``1`` and ``1.0`` do
    not (``k`` is a count as int, a fraction as float).
    """
    skip = set(ignore)
    out = {}
    for key in (keys if keys is not None else saved.keys()):
        if key in skip or str(key).startswith("_") or key not in saved or key not in current:
            continue
        if not _same(saved[key], current[key]):
            out[key] = (_plain(saved[key]), _plain(current[key]))
    return out


def format_hparams_differences(diff: Mapping[str, tuple[Any, Any]]) -> str:
    """``"k: 100 (checkpoint) vs 7 (this run), objective: ..."``."""
    return ", ".join(f"{k}: {a!r} (checkpoint) vs {b!r} (this run)" for k, (a, b) in diff.items())
