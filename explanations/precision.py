"""Full-fp32 matmuls and convolutions on GPU for evaluation and double-backprop objectives.

On Ampere+ GPUs PyTorch may run fp32 convolutions (cuDNN's default) and matmuls with TF32, whose
10-bit mantissa (relative rounding ~5e-4) is coarser than the finite difference of the curvature
term and than the gaps between the P@k / thickness values of two methods. :func:`full_fp32` turns
TF32 off for a block and restores the flags after it; ``RobustClassifier(allow_tf32=False)`` (the
default) runs fit, validate, test and predict inside it. On CPU the flags have no effect.

Examples:
    >>> with full_fp32():
    ...     assert not torch.backends.cudnn.allow_tf32
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["full_fp32", "set_tf32", "tf32_flags"]


def tf32_flags() -> tuple[bool, bool]:
    """(cudnn.allow_tf32, cuda.matmul.allow_tf32) as they are now."""
    return bool(torch.backends.cudnn.allow_tf32), bool(torch.backends.cuda.matmul.allow_tf32)


def set_tf32(flags: tuple[bool, bool]) -> None:
    """Set (cudnn.allow_tf32, cuda.matmul.allow_tf32)."""
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = (bool(f) for f in flags)


@contextlib.contextmanager
def full_fp32(enabled: bool = True) -> Iterator[None]:
    """TF32 convolutions and matmuls off inside the block (``enabled=False``: flags untouched)."""
    if not enabled:
        yield
        return
    saved = tf32_flags()
    set_tf32((False, False))
    try:
        yield
    finally:
        set_tf32(saved)
