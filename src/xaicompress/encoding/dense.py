"""`Dense`: values stored as they are, the coding of every tensor without a weight encoding
(biases, BatchNorm, unconstrained weights) and of a masked layer's kept values."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from xaicompress.encoding.codebook import codebook_dtype_of
from xaicompress.encoding.streams import TORCH_CODINGS, Stream, Streams, array_stream
from xaicompress.errors import XaiCompressError
from xaicompress.export.xcpk_reader import (
    FILL_CODINGS,
    GRID8,
    GRID8_QMAX,
    XcpkError,
    decode_floats,
)

#: the codings of a float tensor's values, as `Dense` picks them (docs/format.md)
FLOAT_CODINGS = ("float32", "float16", *FILL_CODINGS, GRID8)
#: signed integer codings, narrowest first: an integer buffer is stored in the narrowest one
#: that holds its values (BatchNorm's batch counter: one byte instead of eight)
_SIGNED = ("int8", "int16", "int32", "int64")
_SIGNED_DTYPES = {"int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
                  "int64": torch.int64}


def _is_half(x: np.ndarray) -> bool:
    return codebook_dtype_of(torch.from_numpy(np.ascontiguousarray(x))) == "fp16"


def grid8_parts(values: np.ndarray) -> tuple[np.float32, np.ndarray] | None:
    """(scale, int8 q) when float32 `values` are exactly float32(q) * scale bit for bit,
    with scale a binary16 value and max |q| = 127 (what `grid8_round` makes), else None."""
    v = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if not v.size or not np.isfinite(v).all():
        return None
    scale = np.float32(np.abs(v).max() / np.float32(GRID8_QMAX))
    if not scale > 0 or not _is_half(np.array([scale], dtype=np.float32)):
        return None
    q = v / scale
    if not np.array_equal(q, np.round(q)) or np.abs(q).max() > GRID8_QMAX:
        return None
    back = q.astype(np.int8).astype(np.float32) * scale
    if not np.array_equal(back.view(np.int32), v.view(np.int32)):
        return None
    return scale, q.astype(np.int8)


def grid8_round(t: Tensor) -> Tensor:
    """`t` (float, any shape) rounded to 255 levels: q * s, s = max |t| / 127 rounded to a
    binary16 value, q = round(t / s) in -127..127, so that `Dense` stores it as "grid8" (one
    byte a value). A value moves by at most s / 2 (max |t| / 254). Where that grid is not
    exactly representable (an all-zero or tiny tensor: s below binary16's normal range) the
    values are rounded to binary16 instead."""
    x = t.detach().to("cpu", torch.float32)
    amax = float(x.abs().max()) if x.numel() else 0.0
    half = x.half().float()
    if not amax > 0:
        return half.to(t.dtype)
    s = torch.tensor(amax / GRID8_QMAX, dtype=torch.float32).half().float()
    q = torch.round(x / s).clamp(-GRID8_QMAX, GRID8_QMAX)
    out = q * s + 0.0  # + 0.0: a value rounded to -0 is stored, and read back, as +0
    if grid8_parts(out.numpy()) is None:
        return half.to(t.dtype)
    return out.to(t.dtype)


class Dense:
    """No weight encoding. Packed: one "values" stream. Float tensors: the smallest lossless
    coding of their float32 values: "fill16" / "fill32" (one value repeated: BatchNorm's
    statistics once folded), "grid8" (int8 times a binary16 scale: biases rounded by
    `grid8_round`), "float16" (every value exactly a binary16 value) or "float32". Integer
    buffers: the narrowest signed coding that holds them (int8 .. their own width), or
    their own coding (uint8, bool). With a mask only the kept values are stored.
    """

    #: the header fields of its tensor records besides shape, encoding, masked, streams
    PARAMS: ClassVar[tuple[str, ...]] = ()
    kind: ClassVar[str] = "dense"
    value_bits: ClassVar[int] = 32

    def effective(self, w: Tensor) -> Tensor:
        return w

    @staticmethod
    def coding_of(dtype: torch.dtype) -> str:
        if dtype.is_floating_point:
            return "float32"
        if dtype not in TORCH_CODINGS:
            raise XaiCompressError(f"cannot store a tensor of dtype {dtype}")
        return TORCH_CODINGS[dtype]

    @classmethod
    def int_codings(cls, dtype: torch.dtype) -> tuple[str, ...]:
        """The codings an integer tensor of `dtype` may be stored in."""
        own = cls.coding_of(dtype)
        return _SIGNED[:_SIGNED.index(own) + 1] if own in _SIGNED else (own,)

    def encode(self, w: Tensor, keep: Tensor | None) -> tuple[dict[str, Any], list[Stream]]:
        flat = w.detach().reshape(-1)
        if keep is not None:
            flat = flat[keep]
        coding = self.coding_of(w.dtype)
        if coding != "float32":
            *narrower, own = self.int_codings(w.dtype)
            for narrow in narrower:  # signed buffers only; uint8 / bool: their own coding
                info = torch.iinfo(_SIGNED_DTYPES[narrow])
                if not flat.numel() or (int(flat.min()) >= info.min and
                                        int(flat.max()) <= info.max):
                    return {}, [array_stream("values", flat, narrow)]
            return {}, [array_stream("values", flat, own)]
        v = flat.float().cpu().numpy()
        return {}, [self._float_stream(v)]

    @staticmethod
    def _float_stream(v: np.ndarray) -> Stream:
        """The smallest lossless stream of float32 values `v` (ties: the plainer coding)."""
        half = bool(v.size) and _is_half(v)
        best = array_stream("values", v, "float16" if half else "float32")
        if v.size >= 2 and np.array_equal(v.view(np.int32), np.full_like(v, v[0]).view(
                np.int32)):
            data = v[:1].astype("<f2" if half else "<f4").tobytes()
            return Stream("values", "fill16" if half else "fill32", data, 8 * len(data))
        grid = grid8_parts(v)
        if grid is not None and 2 + v.size < len(best.data):
            data = np.float16(grid[0]).tobytes() + grid[1].tobytes()
            return Stream("values", GRID8, data, 8 * len(data))
        return best

    @classmethod
    def decode(cls, params: dict[str, Any], streams: Streams, shape: tuple[int, ...],
               keep: Tensor | None, dtype: torch.dtype) -> tuple[None, Tensor]:
        del params  # dense has none
        numel = int(torch.Size(shape).numel())
        count = numel if keep is None else int(keep.sum())
        coding = cls.coding_of(dtype)
        if coding == "float32":
            stream = ("values", *streams.take("values", FLOAT_CODINGS))
            try:
                vals = torch.from_numpy(decode_floats(stream, count, streams.where))
            except XcpkError as exc:
                raise XaiCompressError(str(exc)) from None
        else:
            arr = streams.take_array("values", cls.int_codings(dtype), count)
            if coding == "bool" and arr.size and int(arr.max()) > 1:
                raise XaiCompressError(f"{streams.where}: bool values other than 0 and 1")
            vals = torch.from_numpy(arr.astype(np.int64))
        if keep is None:
            return None, vals.reshape(shape).to(dtype)
        full = torch.zeros(numel, dtype=vals.dtype)
        full[keep] = vals
        return None, full.reshape(shape).to(dtype)

    def payload_bits(self, kept: int) -> int:
        return 32 * kept


DENSE = Dense()
