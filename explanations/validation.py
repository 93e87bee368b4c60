"""The input contract of the core API and the CLI: one home for the checks users see.

- images: a float tensor (B, C, H, W) with every value finite and in [0, 1] (the project's
  models normalise inside); :func:`check_images` costs one ``torch.aminmax`` pass (finiteness is
  read from the min and max: a NaN or an inf makes one of them non-finite) and runs once per
  public call (an attack, an explanation, a thickness estimate), never inside an attack's loop.
- budgets: ``eps`` in (0, 1] in pixel units of [0, 1] (l_inf; e.g. 8/255 = 0.0314); an l2
  radius must be positive and finite (:func:`check_eps`). eps = 0 is no attack and is refused.
- counts: ``steps`` >= 1 (:func:`check_steps`; 0 steps would return the clean images, P@k 1.0),
  other counts >= 1 (:func:`check_positive_int`), ``pool`` null or >= 1 (:func:`check_pool`),
  ``k`` a count >= 1 or a fraction in (0, 1) (:func:`check_k`), positive finite numbers
  (:func:`check_positive`).

Every error names the setting, the value and what is valid. No tolerance is applied to the
[0, 1] range: the project's data pipelines (``ToTensor``) and projections (``clamp(0, 1)``) give
exact bounds, and float16/bfloat16 rounding of a value in [0, 1] stays in [0, 1].
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

#: The l_inf budgets of the project are pixel units of images in [0, 1].
EPS_HINT = "pixel units of images in [0, 1], e.g. 8/255 = 0.0314"
#: Channel counts that make a last dimension look like channels (grey, RGB, RGBA).
_CHANNELS = (1, 3, 4)


def check_images(x: Any, name: str = "images") -> None:
    """Refuse anything but a float tensor (B, C, H, W) with finite values in [0, 1].

    One ``torch.aminmax`` pass (a NaN or an inf shows in the min or max) and one host sync;
    the non-finite values are counted only when there are some.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, H, W) with floats in [0, 1], got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(
            f"{name} have dtype {x.dtype}; the project's models take float images in [0, 1]: "
            "convert with x.float() / 255"
        )
    shape = tuple(x.shape)
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W) (4-D), got {shape} ({x.dim()}-D)")
    if shape[-1] in _CHANNELS and shape[1] not in _CHANNELS:
        raise ValueError(
            f"{name} of shape {shape} look channels-last (B, H, W, C); the models take (B, C, H, W): "
            "use x.permute(0, 3, 1, 2)"
        )
    if x.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(x.detach())).tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int((~torch.isfinite(x.detach())).sum())
        raise ValueError(
            f"{name} have {bad} non-finite value(s) (NaN or inf) of {x.numel()}; the models take finite "
            "float images in [0, 1]"
        )
    if lo < 0.0 or hi > 1.0:
        hint = " (divide by 255)" if hi > 1.0 and lo >= 0.0 and hi <= 255.0 else ""
        raise ValueError(
            f"{name} have values in [{lo:.4g}, {hi:.4g}]; the project's models take float images in [0, 1]{hint}"
        )


def _number(value: Any, name: str, valid: str) -> float:
    """``value`` as a float (ints, floats, numpy or 0-d tensor scalars); bools and text are refused."""
    if isinstance(value, (bool, str)):
        raise ValueError(f"{name}={value!r} is not a number; valid: {valid}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a number; valid: {valid}") from None


def check_eps(eps: Any, name: str = "eps", norm: str = "linf") -> float:
    """``eps`` as a float: in (0, 1] for l_inf (pixel units of [0, 1]); positive and finite for l2.

    eps = 0 is refused (no attack); an l_inf eps in (1, 255] is named with its /255 form.
    """
    valid = f"(0, 1] ({EPS_HINT})" if norm == "linf" else "a positive finite l2 radius (pixel units of [0, 1])"
    value = _number(eps, name, valid)
    if value == 0.0:
        raise ValueError(f"{name}=0 is no attack: give a budget in {valid}")
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"{name}={eps!r} is not valid; valid: {valid}")
    if norm == "linf" and value > 1.0:
        guess = f"; did you mean {value:g}/255 = {value / 255:.4f}?" if value <= 255.0 else ";"
        raise ValueError(f"{name}={eps!r} is in pixel units of [0, 1]{guess} valid: {valid}")
    return value


def check_steps(steps: Any, name: str = "steps") -> int:
    """``steps`` as an int >= 1 (0 steps is no attack: the clean images would come back, P@k 1.0)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(
            f"{name}={steps!r} must be an integer >= 1 (0 steps is no attack: the clean images come back "
            "and read as robust, P@k 1.0)"
        )
    return steps


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as an int >= 1, else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")
    return value


def check_positive(value: Any, name: str) -> float:
    """``value`` as a positive finite float, else ValueError naming ``name``."""
    number = _number(value, name, "a positive finite number")
    if not number > 0 or math.isinf(number):
        raise ValueError(f"{name}={value!r} must be a positive finite number")
    return number


def check_pool(pool: Any, name: str = "pool") -> int | None:
    """``pool`` as None (no pooling) or an int >= 1 (the side of the average-pooling window)."""
    if pool is not None and (isinstance(pool, bool) or not isinstance(pool, int) or pool < 1):
        raise ValueError(f"{name}={pool!r} is not valid: give null (no pooling) or an integer >= 1 that divides the image size")
    return pool


def check_k(k: Any, name: str = "k") -> None:
    """One rule for ``k``: an int >= 1 is a count of features, a float in (0, 1) a fraction of them.

    A float that is a whole number (``1.0``, ``100.0``) is refused: it reads as "all features" to
    some and as "one feature" to others; write ``k: 1`` (count) or ``k: 0.5`` (fraction).
    """
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ValueError(f"{name}={k!r} is not valid: give an integer count >= 1 or a fraction in (0, 1)")
    if isinstance(k, float) and not 0.0 < k < 1.0:
        hint = f" (for a count write {name}: {int(k)})" if k.is_integer() and k >= 1 else ""
        raise ValueError(f"{name}={k!r} is not valid: a float k is a fraction of the features and must be in (0, 1){hint}; an integer k >= 1 is a count")
    if isinstance(k, int) and k < 1:
        raise ValueError(f"{name}={k!r} is not valid: give an integer count >= 1 or a fraction in (0, 1)")
