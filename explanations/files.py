"""File helpers shared by every writer of results: atomic writes and content hashes.

- :func:`atomic_write`: write to ``<dir>/.<name>.tmp-*``, fsync, then ``os.replace`` onto the
  destination, so a reader sees the previous complete file or the new complete file, never a
  half-written one (an interrupted run leaves nothing that looks complete). On an ``OSError`` the
  temporary file is removed and the error names the destination.
- :func:`file_sha256`: the sha256 of a file's bytes (weights and checkpoint provenance).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "file_sha256"]


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[IO[bytes]], None]) -> Path:
    """Write ``data`` (text, bytes, or ``writer(binary_file)``) to ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _unlink(tmp)
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    except BaseException:
        _unlink(tmp)
        raise
    return path


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of the file's bytes (cached by path, size and modification time)."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]
