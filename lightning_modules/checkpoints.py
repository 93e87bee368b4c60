"""Checkpoint and weight-file I/O: reading (weights_only, errors naming the file), atomic writing,
and comparing a checkpoint's settings with the run's.

- :func:`read_checkpoint`: ``torch.load(weights_only=True)`` whose errors name the file and say
  what it is not (missing, not a checkpoint, a pickle with arbitrary objects).
- :class:`AtomicCheckpointIO`: Lightning's checkpoint writer, but the bytes go to a temporary file
  in the destination folder, are fsynced, then renamed over the destination: a full disk or a
  crash leaves the previous checkpoint and no partial file; the error names the file and disk.
- :func:`load_backbone_weights` (``model.weights_file``: a local state dict, .pth or
  .safetensors, prefix detected) and :func:`load_model_weights` (``model.init_from``: a project
  checkpoint), with one classifier-prefix heuristic (:func:`classifier_prefixes`): a classifier
  of another shape keeps its fresh initialisation, any other mismatch is refused with the keys.
- :func:`architecture_differences` / :func:`missing_hparams` / :func:`state_dict_differences` /
  :func:`format_differences`: why a checkpoint does not fit a model (including the
  architecture hyper-parameters a checkpoint does not record, so the run used its own values).
- :func:`hparams_differences`: ``{key: (checkpoint, run)}`` for the model settings that differ,
  used by the CLI to refuse an explicit ``--ckpt_path`` whose settings disagree with the flags and
  a ``--ckpt_path last`` that belongs to another run.
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import Tensor, nn

from explanations.files import atomic_write

log = logging.getLogger(__name__)

#: Hyper-parameters of RobustClassifier that change the parameter set of the network.
ARCHITECTURE_KEYS: tuple[str, ...] = (
    "backbone", "num_classes", "in_chans", "activation", "cifar_stem", "backbone_kwargs", "output_key",
)

#: Hyper-parameters added after checkpoints were first written, with the value a checkpoint that
#: lacks one was trained with (compared as that value, not reported as missing).
LATER_KEYS: dict[str, Any] = {"output_key": None}

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


def checkpoint_progress(path: str | os.PathLike) -> dict[str, int]:
    """``{"epoch", "global_step"}`` a Lightning checkpoint was saved at (empty for a plain state dict)."""
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict):
        return {}
    return {k: int(checkpoint[k]) for k in ("epoch", "global_step") if isinstance(checkpoint.get(k), int)}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints atomically (``explanations.files.atomic_write``: a temporary file, fsync, ``os.replace``).

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
        atomic_write(path, lambda f: torch.save(checkpoint, f))


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


# ------------------------------------------------------------------ architecture differences
def _normalize(key: str, value: Any) -> Any:
    if key == "backbone_kwargs":
        return dict(value or {})
    return value


def architecture_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], keys: Iterable[str] = ARCHITECTURE_KEYS
) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved, current)}`` for the architecture hyper-parameters that differ.

    Keys absent from ``saved`` (checkpoints of other code, see :func:`missing_hparams`) are not
    compared, except the :data:`LATER_KEYS`, compared as the value they had before they existed.
    """
    out = {}
    for key in keys:
        if key not in saved and key not in LATER_KEYS:
            continue
        saved_value = saved.get(key, LATER_KEYS.get(key))
        a, b = _normalize(key, saved_value), _normalize(key, current.get(key))
        if a != b:
            out[key] = (saved_value, current.get(key))
    return out


def missing_hparams(
    saved: Mapping[str, Any], current: Mapping[str, Any], keys: Iterable[str] = ARCHITECTURE_KEYS
) -> dict[str, Any]:
    """``{key: run value}`` for the architecture hyper-parameters that the checkpoint does not
    record (saved by hand or by older code) but the run has: the model was built with the run's
    value, often the default, which may not be the one the weights were trained with."""
    return {key: _plain(current[key]) for key in keys
            if key not in saved and key not in LATER_KEYS and key in current}


def state_dict_differences(saved: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, list[str]]:
    """Missing, unexpected and shape-mismatched keys of ``saved`` w.r.t. ``own`` (sorted lists)."""
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in saved.items()
        if k in own and hasattr(v, "shape") and hasattr(own[k], "shape") and tuple(v.shape) != tuple(own[k].shape)
    ]
    return {
        "missing": sorted(set(own) - set(saved)),
        "unexpected": sorted(set(saved) - set(own)),
        "shape": sorted(shapes),
    }


def format_differences(
    arch: Mapping[str, tuple[Any, Any]], keys: Mapping[str, list[str]], limit: int = 10,
    missing: Mapping[str, Any] | None = None,
) -> str:
    """Human-readable summary of :func:`missing_hparams` (first: the likely cause),
    :func:`architecture_differences` and :func:`state_dict_differences`."""
    parts = []
    if missing:
        names = ", ".join(repr(k) for k in missing)
        used = ", ".join(f"{k}={v!r}" for k, v in missing.items())
        flags = " ".join(f"--model.{k} <value>" for k in missing)
        parts.append(
            f"the checkpoint does not record the hyper-parameter(s) {names} (saved by hand or by older code), "
            f"so this model was built with {used}; give the value(s) the weights were trained with "
            f"({flags}, or under model: in the config)"
        )
    if arch:
        parts.append("hyper-parameters (checkpoint -> this run): " + ", ".join(
            f"{k}: {a!r} -> {b!r}" for k, (a, b) in arch.items()))
    for label, name in (("missing keys", "missing"), ("unexpected keys", "unexpected"), ("shape mismatches", "shape")):
        items = keys.get(name) or []
        if items:
            more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{label} ({len(items)}): {items[:limit]}{more}")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Local weights
# --------------------------------------------------------------------------------------------

_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")
_WRAPPER_INFIXES = ("_orig_mod.",)  # torch.compile


def _read_weights_file(path: Path) -> Mapping[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ImportError(
                f"Reading {path} needs the 'safetensors' package (pip install safetensors), "
                "or save the weights as .pth with torch.save(model.state_dict(), path)."
            ) from exc
        return load_file(str(path), device="cpu")
    try:
        obj = read_checkpoint(path, "weights file")
    except CheckpointReadError as exc:
        raise CheckpointReadError(
            f"{exc}. Save a plain state dict instead, e.g. torch.save(model.state_dict(), path)."
        ) from None
    # unwrap containers: Lightning checkpoints ("state_dict"), timm/DeiT-style ("model"), ...
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            for key in _CONTAINER_KEYS:
                if isinstance(obj.get(key), Mapping):
                    obj = obj[key]
                    break
            else:
                break
        else:
            break
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"Weights file {path} does not hold a state dict (a mapping of parameter names to "
            f"tensors, or a dict with one under one of {list(_CONTAINER_KEYS)})."
        )
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _best_prefix(keys: Sequence[str], model_keys: set[str]) -> str:
    """The key prefix (ending in '.') whose stripping makes most keys match ``model_keys``."""
    counts: dict[str, int] = {}
    for key in keys:
        if key in model_keys:
            counts[""] = counts.get("", 0) + 1
        for i, ch in enumerate(key):
            if ch == "." and key[i + 1 :] in model_keys:
                counts[key[: i + 1]] = counts.get(key[: i + 1], 0) + 1
    if not counts:
        return ""
    # most matches first, then the shortest prefix
    return max(counts, key=lambda p: (counts[p], -len(p)))


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict key prefixes of the classifier head: the one heuristic for every loader.

    The timm model's ``pretrained_cfg["classifier"]`` names (else the module that
    ``get_classifier()`` returns); for a wrapper with a ``.backbone`` (NormalizedClassifier) the
    names are prefixed with ``backbone.``. Returns e.g. ``("fc.",)`` or ``("backbone.head.fc.",)``.
    """
    inner = getattr(model, "backbone", None)
    if isinstance(inner, nn.Module) and inner is not model:
        return tuple("backbone." + p for p in classifier_prefixes(inner))
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(names, str):
        names = (names,)
    names = tuple(names or ())
    if not names and hasattr(model, "get_classifier"):
        head = model.get_classifier()
        names = tuple(n for n, m in model.named_modules() if m is head and n)
    return tuple(n + "." for n in names)


def _summarize(keys: Sequence[str], limit: int = 10) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in total)" if len(keys) > limit else "")


def load_backbone_weights(model: nn.Module, weights_file: str | Path, name: str | None = None) -> nn.Module:
    """Load a local state dict into the bare timm ``model`` (in place) and return it.

    Accepts ``.pth/.pt/.bin`` (``torch.load(weights_only=True)``) or ``.safetensors`` files
    holding a state dict of the bare model, of a :class:`NormalizedClassifier` (``backbone.``
    prefix), or a Lightning checkpoint (``state_dict`` with ``model.backbone.`` prefix); the
    prefix is detected. A model that defines ``checkpoint_filter_fn(state_dict, model) ->
    state_dict`` (the timm convention) gets the file's state dict through it first (key remapping
    of foreign weights). Classifier weights of another shape (another ``num_classes``) are
    dropped with a warning and the fresh classifier kept. Any other mismatch raises ValueError.
    """
    arch = name or type(model).__name__
    path = Path(weights_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights_file not found: {str(path)!r}")
    raw = _read_weights_file(path)
    filter_fn = getattr(model, "checkpoint_filter_fn", None)
    if callable(filter_fn):  # timm convention: remap a foreign state dict to this model's keys
        raw = filter_fn(dict(raw), model)

    target = model.state_dict()
    model_keys = set(target)
    keys = {}
    for key, value in raw.items():
        for infix in _WRAPPER_INFIXES:
            key = key.replace(infix, "")
        keys[key] = value
    prefix = _best_prefix(list(keys), model_keys)
    if prefix:
        file_sd = {k[len(prefix) :]: v for k, v in keys.items() if k.startswith(prefix)}
        outer = prefix
        while outer.endswith("backbone."):  # "model.backbone." or, with output_key, "model.backbone.backbone."
            outer = outer[: -len("backbone.")]
            if f"{outer}normalize.mean" in keys:
                _check_file_normalization(model, keys, outer, path)
                break
    else:
        file_sd = keys

    cls_prefixes = classifier_prefixes(model)

    def is_cls(k: str) -> bool:
        return any(k.startswith(p) for p in cls_prefixes)

    missing = [k for k in target if k not in file_sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in file_sd if k not in target]
    mismatched = [
        k for k in file_sd if k in target and tuple(file_sd[k].shape) != tuple(target[k].shape)
    ]

    dropped_cls: list[str] = []
    cls_mismatch = [k for k in mismatched if is_cls(k)]
    cls_missing = [k for k in missing if is_cls(k)]
    cls_unexpected = [k for k in unexpected if is_cls(k)]
    other_problems = (
        [k for k in missing if not is_cls(k)]
        + [k for k in unexpected if not is_cls(k)]
        + [k for k in mismatched if not is_cls(k)]
    )
    if not other_problems and (cls_mismatch or cls_missing or cls_unexpected):
        dropped_cls = sorted(set(k for k in file_sd if is_cls(k)))
        for k in dropped_cls:
            file_sd.pop(k)
        warnings.warn(
            f"Classifier weights in {path} do not fit {arch!r} "
            f"(num_classes={getattr(model, 'num_classes', '?')}): keeping the freshly initialised "
            f"classifier and loading all other weights.",
            UserWarning,
            stacklevel=3,
        )
        missing = [k for k in missing if not is_cls(k)]
    elif other_problems:
        parts = []
        if missing:
            parts.append(f"missing keys: {_summarize(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_summarize(unexpected)}")
        if mismatched:
            shapes = [
                f"{k} (file {tuple(file_sd[k].shape)} vs model {tuple(target[k].shape)})"
                for k in mismatched
            ]
            parts.append(f"shape mismatches: {_summarize(shapes)}")
        raise ValueError(
            f"Weights file {str(path)!r} does not fit architecture {arch!r}"
            + (f" (after stripping key prefix {prefix!r})" if prefix else "")
            + ": "
            + "; ".join(parts)
        )

    result = model.load_state_dict(file_sd, strict=False)
    leftover = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    leftover = [k for k in leftover if k not in dropped_cls and not is_cls(k)]
    if leftover or result.unexpected_keys:  # pragma: no cover - guarded by the checks above
        raise ValueError(
            f"Weights file {str(path)!r} does not fit architecture {arch!r}: missing "
            f"{_summarize(leftover)}; unexpected {_summarize(result.unexpected_keys)}"
        )
    return model


def _check_file_normalization(model: nn.Module, keys: Mapping[str, torch.Tensor], outer: str, path: Path) -> None:
    """Remember normalization stats stored next to the backbone (checked in build_backbone)."""
    stats = {s: keys.get(f"{outer}normalize.{s}") for s in ("mean", "std")}
    if all(isinstance(v, torch.Tensor) for v in stats.values()):
        model._file_normalization = (  # type: ignore[attr-defined]
            tuple(stats["mean"].flatten().tolist()),
            tuple(stats["std"].flatten().tolist()),
            str(path),
        )


# ------------------------------------------------------------------ project checkpoints (init_from)
def _strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_model_weights(model: nn.Module, path: str | Path, expected_hparams: dict[str, Any] | None = None) -> None:
    """Load a RobustClassifier checkpoint's ``model.*`` weights into ``model`` (weights_only).

    A classifier whose shape differs (other num_classes) keeps its fresh initialisation; any other
    difference is refused with the keys listed (and, given ``expected_hparams``, the architecture
    hyper-parameters of the checkpoint that differ).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from={str(path)!r}: no such checkpoint file")
    checkpoint = read_checkpoint(path, "init_from checkpoint")
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"init_from={str(path)!r} holds no state dict")
    if any(k.startswith("model.") for k in state):
        state = _strip_prefix(state, "model.")
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    own = model.state_dict()
    classifier = classifier_prefixes(model)
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    head_only = mismatched and all(k.startswith(classifier) for k in mismatched)
    if head_only:
        log.warning("init_from: classifier shape differs (%s); it keeps its fresh initialisation", mismatched)
        state = {k: v for k, v in state.items() if k not in mismatched}
        state.update({k: own[k] for k in mismatched})
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in mismatched if not head_only]
    if missing or unexpected or wrong:
        saved_hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
        arch = architecture_differences(saved_hparams or {}, expected_hparams or {}) if expected_hparams else {}
        missing_keys = missing_hparams(saved_hparams or {}, expected_hparams) if expected_hparams else {}
        differing = f"; {format_differences(arch, {}, missing=missing_keys)}" if arch or missing_keys else ""
        raise ValueError(
            f"init_from={str(path)!r} does not fit this model: missing keys {missing[:10]}, "
            f"unexpected keys {unexpected[:10]}, shape mismatches {wrong[:10]}{differing}"
        )
    model.load_state_dict(state)
    log.info("init_from: loaded %d tensors from %s%s", len(state), path,
             f" (classifier {sorted({k.rsplit('.', 1)[0] for k in mismatched})} kept fresh)" if head_only else "")
    print(f"init_from: loaded {len(state) - (len(mismatched) if head_only else 0)} of {len(own)} tensors from {path}"
          + (f"; classifier kept fresh (shape differs: {mismatched})" if head_only else ""))
