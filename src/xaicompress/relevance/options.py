"""Checked criterion options: one line per mistake, naming the option and its valid values.

Criteria validate their constructor arguments with these helpers, so an option given on
the command line (`deeplift:sigma=1e9`), in a config or from Python is refused the same
way; `get_criterion` prefixes the message with the criterion spec.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from xaicompress.errors import XaiCompressError

#: largest seed accepted anywhere (torch generators take 64-bit seeds)
MAX_SEED = 2 ** 63 - 1


def choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """`value` as a lower-case string that must be one of `choices`."""
    text = str(value).strip().lower()
    if isinstance(value, bool) or text not in choices:
        raise XaiCompressError(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return text


def boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise XaiCompressError(f"{name}={value!r}: expected true or false")


def number(name: str, value: Any, lo: float, hi: float, *, integer: bool = False,
           open_lo: bool = False) -> float:
    """A finite number in [lo, hi] (or (lo, hi] with `open_lo`); an int when `integer`."""
    bad = isinstance(value, bool) or not isinstance(value, (int, float))
    if not bad and integer and (not float(value).is_integer()):
        bad = True
    low_ok = (value > lo if open_lo else value >= lo) if not bad else False
    if bad or not math.isfinite(value) or not low_ok or value > hi:
        kind = "an integer" if integer else "a number"
        interval = f"{'(' if open_lo else '['}{lo:g}, {hi:g}]"
        raise XaiCompressError(f"{name}={value!r}: expected {kind} in {interval}")
    return int(value) if integer else float(value)


def seed(value: Any, name: str = "seed") -> int:
    return int(number(name, value, 0, MAX_SEED, integer=True))


def parse_target(value: Any) -> str | int:
    """`target` option: true (label), pred (argmax), all (sum over classes) or a class index."""
    if isinstance(value, bool):
        raise XaiCompressError(f"target={value!r}: expected true, pred, all or a class index")
    if isinstance(value, int):
        if value < 0:
            raise XaiCompressError(f"target={value}: a class index must be >= 0")
        return value
    text = str(value).strip().lower()
    if text in ("true", "label", "pred", "all"):
        return "true" if text == "label" else text
    raise XaiCompressError(f"target={value!r}: expected true, pred, all or a class index")


def parse_aggregate(value: Any, choices: Sequence[str] = ("abs", "signed")) -> str:
    return choice("aggregate", value, choices)


def per_channel(name: str, values: Any) -> tuple[float, ...] | None:
    """Dataset normalisation (pixel_mean / pixel_std): None or finite numbers."""
    if values is None:
        return None
    try:
        t = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise XaiCompressError(f"{name}={values!r}: expected numbers, one per channel") from exc
    if t.numel() == 0 or not torch.isfinite(t).all():
        raise XaiCompressError(f"{name}={values!r}: expected finite numbers, one per channel")
    if name == "pixel_std" and (t <= 0).any():
        raise XaiCompressError(f"{name}={tuple(t.tolist())}: expected positive values")
    return tuple(float(v) for v in t)


def rows_target(target: str | int, y: Tensor, group: int) -> Tensor | str:
    """Per-row class indices (R,) for R = len(y) * group rows, or "pred" / "all"."""
    if target == "true":
        return y.long().repeat_interleave(group) if group > 1 else y.long()
    if isinstance(target, int):
        return torch.full((len(y) * group,), target, dtype=torch.long)
    return target
