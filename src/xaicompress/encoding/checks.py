"""Field checks the encodings share: every message names the file and layer (`where`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from xaicompress.errors import XaiCompressError

#: float dtypes a file may store a float field in; converted explicitly to float32, then
#: checked for finiteness (a float64 1e300 becomes inf in float32 and is refused)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_int(value: Any, lo: int, hi: int, what: str, where: str) -> int:
    """`value` as an int in [lo, hi] (bools and floats refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise XaiCompressError(f"{where}: {what} is {value!r}, expected an integer from {lo} "
                               f"to {hi}")
    return value


def check_positive_float(value: Any, what: str, where: str) -> float:
    """`value` as a finite float > 0 (a JSON number; bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise XaiCompressError(f"{where}: {what} is {value!r}, expected a finite number > 0")
    return float(value)


def float32_field(t: Any, what: str, where: str) -> Tensor:
    """A float tensor converted to float32, refused when any value is NaN or Inf after the
    conversion or its dtype is not one of `FLOAT_DTYPES` (float8 and integers are)."""
    if not isinstance(t, Tensor) or t.dtype not in FLOAT_DTYPES:
        raise XaiCompressError(f"{where}: {what} has dtype "
                               f"{getattr(t, 'dtype', type(t).__name__)}, expected a float "
                               "tensor (float32, float16, bfloat16 or float64)")
    out = t.detach().to(torch.float32)
    if not torch.isfinite(out).all():
        raise XaiCompressError(f"{where}: {what} contains NaN or Inf values (in float32)")
    return out


def index_field(t: Any, what: str, where: str) -> Tensor:
    """An integer tensor as int64."""
    if not isinstance(t, Tensor) or t.dtype not in INT_DTYPES:
        raise XaiCompressError(f"{where}: {what} has dtype "
                               f"{getattr(t, 'dtype', type(t).__name__)}, expected integers")
    return t.detach().to(torch.int64)


def check_shape(t: Tensor, shape: tuple[int, ...], what: str, where: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise XaiCompressError(f"{where}: {what} has shape {tuple(t.shape)}, expected "
                               f"{tuple(shape)}")
