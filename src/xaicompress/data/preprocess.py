"""Preprocessing: how image pixels become a model's inputs. It belongs to the model.

    x = (pixel01 - mean[c]) / std[c]        per channel c, pixels in [0, 1] (RGB or gray)

after the image is brought to `size` x `size`: image folders resize the shorter side to
`resize` and centre-crop `size` x `size` when `resize` is set (torchvision's
`Resize(resize)` + `CenterCrop(size)` on PIL images, bilinear), else resize the whole image
to `size` x `size` (bilinear); in-memory datasets are resized to `size` (bilinear,
antialiased). Grayscale data is replicated to 3 channels when the model's normalisation
has 3 (a torchvision model trained on gray images converted to RGB).

A checkpoint records the complete preprocessing (`ModelSpec.preprocess`), so every later
command feeds the model exactly what it was trained on: data loading, the DeepLIFT black
`zeros` reference (``-mean / std``), fidelity, evaluation; ONNX files carry it in their
metadata and reports print it. Unset fields mean "the data's own": `mean`/`std` computed on
the training split (the default), `size` the data's image size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from xaicompress.errors import XaiCompressError

MAX_SIZE = 4096
#: named normalisations (`--normalise imagenet`)
PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": ((0.0,), (1.0,)),
}


@dataclass(frozen=True)
class Preprocess:
    """What turns [0, 1] pixels into model inputs (see the module docstring).

    mean, std: per-channel values in [0, 1] pixel units (None: the data's own statistics);
    size: the model's input side (None: the data's); resize: image folders only, the
    shorter side before a centre crop to `size` (None: resize the whole image to `size`).
    """

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    size: int | None = None
    resize: int | None = None

    @property
    def channels(self) -> int | None:
        return None if self.mean is None else len(self.mean)

    def complete(self) -> bool:
        return self.mean is not None and self.size is not None

    def with_stats(self, mean: tuple[float, ...], std: tuple[float, ...],
                   size: int) -> Preprocess:
        """This preprocessing with what it left to the data filled in."""
        return replace(self, mean=self.mean if self.mean is not None else tuple(mean),
                       std=self.std if self.std is not None else tuple(std),
                       size=self.size if self.size is not None else size)

    def to_meta(self) -> dict[str, Any]:
        return {"mean": None if self.mean is None else list(self.mean),
                "std": None if self.std is None else list(self.std), "size": self.size,
                "resize": self.resize}

    @classmethod
    def from_meta(cls, meta: Any, source: str) -> Preprocess:
        """A file's preprocessing, every field type- and range-checked."""
        if not isinstance(meta, dict) or not set(meta) <= {"mean", "std", "size", "resize"}:
            raise XaiCompressError(f"{source}: preprocess must be an object with mean, std, "
                                   "size, resize")
        mean, std = meta.get("mean"), meta.get("std")
        for name, v in (("mean", mean), ("std", std)):
            if v is not None and not _floats_ok(v):
                raise XaiCompressError(f"{source}: preprocess {name} {str(v)[:60]} is not a "
                                       "list of 1 to 4 finite numbers")
        pre = cls(None if mean is None else tuple(float(v) for v in mean),
                  None if std is None else tuple(float(v) for v in std),
                  _size(meta.get("size"), "size", source),
                  _size(meta.get("resize"), "resize", source))
        pre.check(source)
        return pre

    def check(self, source: str) -> None:
        if (self.mean is None) != (self.std is None) or (
                self.mean is not None and len(self.mean) != len(self.std or ())):
            raise XaiCompressError(f"{source}: normalisation needs as many means as stds")
        if self.std is not None and not all(s > 0 for s in self.std):
            raise XaiCompressError(f"{source}: normalisation std {self.std} must be positive")
        if self.mean is not None and len(self.mean) not in (1, 3):
            raise XaiCompressError(f"{source}: normalisation has {len(self.mean)} channels; "
                                   "expected 1 (gray) or 3 (RGB)")
        if self.resize is not None and (self.size is None or self.resize < self.size):
            raise XaiCompressError(f"{source}: resize {self.resize} needs a size no larger "
                                   "than it (the centre crop)")

    def describe(self) -> str:
        def fmt(v: tuple[float, ...] | None) -> str:
            return "data" if v is None else ",".join(f"{x:.6g}" for x in v)

        text = f"normalise mean {fmt(self.mean)} / std {fmt(self.std)}"
        if self.size is not None:
            text += f", {self.size} x {self.size}"
        if self.resize is not None:
            text += f" (shorter side resized to {self.resize}, centre crop)"
        return text


def _floats_ok(v: Any) -> bool:
    return isinstance(v, list) and 1 <= len(v) <= 4 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
        for x in v)


def _size(v: Any, name: str, source: str) -> int | None:
    if v is None:
        return None
    if not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SIZE):
        raise XaiCompressError(f"{source}: preprocess {name} {v!r} is not an integer from 1 "
                               f"to {MAX_SIZE}")
    return v


def parse_normalise(text: str, option: str = "--normalise"
                    ) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """`MEAN/STD` with comma-separated channels (`0.485,0.456,0.406/0.229,0.224,0.225`,
    `0.5/0.25`), the same as `MEAN,STD` (`0.5,0.25`; 3 means then 3 stds), a preset
    (`imagenet`, `none` = 0/1), or `data` (None: the data's own statistics)."""
    t = str(text).strip().lower()
    if t == "data":
        return None
    if t in PRESETS:
        return PRESETS[t]
    mean_text, slash, std_text = t.partition("/")
    try:
        if slash:
            mean = tuple(float(v) for v in mean_text.split(","))
            std = tuple(float(v) for v in std_text.split(","))
        else:  # MEAN,STD: the means of every channel, then the stds
            values = tuple(float(v) for v in t.split(","))
            if len(values) not in (2, 6):
                raise ValueError
            mean, std = values[:len(values) // 2], values[len(values) // 2:]
    except ValueError:
        raise XaiCompressError(f"{option} {text!r}: expected MEAN/STD with one value per "
                               "channel (e.g. 0.485,0.456,0.406/0.229,0.224,0.225 or "
                               f"0.5,0.25), {', '.join(PRESETS)} or data") from None
    if not all(math.isfinite(v) for v in (*mean, *std)):
        raise XaiCompressError(f"{option} {text!r}: values must be finite numbers")
    Preprocess(mean, std).check(f"{option} {text!r}")
    return mean, std
