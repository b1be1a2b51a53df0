"""`IntGrid`: symmetric per-output-channel integer quantization of a layer's weight."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from xaicompress.encoding.checks import check_int, float32_field
from xaicompress.encoding.entropy import symbol_stream
from xaicompress.encoding.streams import Stream, Streams, array_stream
from xaicompress.errors import XaiCompressError

#: widths the format holds (the quantizer chooses among 2..8, `quant.integer.BITS_CHOICES`)
MIN_BITS, MAX_BITS = 2, 16


def qmax(bits: int) -> int:
    """Largest |q| of a symmetric b-bit grid: 2^(b-1) - 1 (so q in [-qmax, qmax])."""
    return 2 ** (int(bits) - 1) - 1


class IntGrid:
    """bits: width b; scale: float32 (out_channels,), one per output channel (> 0).

    Effective weight = scale[c] * q, q = clamp(round(w / scale[c]), -qmax, qmax).
    Packed: "scales" stream (float32, one per output channel) and "values": q + qmax of the
    kept weights, range-coded ("range") or at b bits ("uint<b>", offset binary), whichever
    is smaller. Checkpoint: tensor "scale", metadata
    "bits".
    """

    #: the header fields of its tensor records besides shape, encoding, masked, streams
    PARAMS: ClassVar[tuple[str, ...]] = ("bits",)
    kind: ClassVar[str] = "intgrid"
    TENSORS: ClassVar[tuple[str, ...]] = ("scale",)
    META: ClassVar[tuple[str, ...]] = ("bits",)

    def __init__(self, bits: int, scale: Tensor) -> None:
        self.bits = int(bits)
        self.scale = scale.detach().to("cpu", torch.float32).reshape(-1)  # state: on the CPU

    def __repr__(self) -> str:
        return f"IntGrid(bits={self.bits})"

    @property
    def qmax(self) -> int:
        return qmax(self.bits)

    @property
    def value_bits(self) -> int:
        return self.bits

    def _scale_like(self, w: Tensor) -> Tensor:
        return self.scale.to(w.device, w.dtype).reshape(-1, *([1] * (w.dim() - 1)))

    def quantize(self, w: Tensor) -> Tensor:
        """The integers q (int64, w's shape) of weight w (out, ...)."""
        s = self._scale_like(w)
        return torch.clamp(torch.round(w / s), -self.qmax, self.qmax).to(torch.int64)

    def effective(self, w: Tensor) -> Tensor:
        s = self._scale_like(w)
        return torch.clamp(torch.round(w / s), -self.qmax, self.qmax) * s

    def copy(self) -> IntGrid:
        return IntGrid(self.bits, self.scale.clone())

    def validate(self, shape: tuple[int, ...], where: str) -> None:
        check_int(self.bits, MIN_BITS, MAX_BITS, "bits", where)
        out = shape[0] if shape else 1
        if self.scale.numel() != out:
            raise XaiCompressError(f"{where}: {self.scale.numel()} scales for {out} output "
                                   "channels")
        if not (torch.isfinite(self.scale).all() and (self.scale > 0).all()):
            raise XaiCompressError(f"{where}: scales must be finite and > 0")

    # ---------------------------------------------------------------- packed file
    def encode(self, w: Tensor, keep: Tensor | None) -> tuple[dict[str, Any], list[Stream]]:
        q = self.quantize(w.detach().float()).reshape(-1)
        if keep is not None:
            q = q[keep]
        b = self.bits
        return {"bits": b}, [array_stream("scales", self.scale, "float32"),
                             symbol_stream("values", (q + self.qmax).numpy(), b,
                                           2 * self.qmax + 1)]

    @classmethod
    def decode(cls, params: dict[str, Any], streams: Streams, shape: tuple[int, ...],
               keep: Tensor | None, dtype: torch.dtype) -> tuple[IntGrid, Tensor]:
        where = streams.where
        b = check_int(params.get("bits"), MIN_BITS, MAX_BITS, "bits", where)
        out_channels = shape[0] if shape else 1
        grid = cls(b, streams.take_floats("scales", ("float32",), out_channels))
        grid.validate(shape, where)
        numel = int(torch.Size(shape).numel())
        count = numel if keep is None else int(keep.sum())
        u = streams.take_symbols("values", b, 2 * grid.qmax + 1, count)
        q = np.zeros(numel, dtype=np.float32)
        q[keep.numpy() if keep is not None else slice(None)] = (u - grid.qmax).astype(np.float32)
        s = grid.scale.reshape(-1, *([1] * (len(shape) - 1)))
        return grid, (torch.from_numpy(q).reshape(shape) * s).to(dtype)

    # ----------------------------------------------------------------- checkpoint
    def to_checkpoint(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"scale": self.scale.contiguous()}, {"bits": self.bits}

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, Tensor], meta: dict[str, Any],
                        shape: tuple[int, ...], where: str) -> IntGrid:
        if "scale" not in tensors or "bits" not in meta:
            raise XaiCompressError(f"{where}: an integer grid needs both its scale tensor and "
                                   "its bits")
        bits = check_int(meta["bits"], MIN_BITS, MAX_BITS, "bits", where)
        out = cls(bits, float32_field(tensors["scale"], "scale", where))
        out.validate(shape, where)
        return out
