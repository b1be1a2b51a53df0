"""`Codebook`: weight sharing, every kept weight is one of k shared values (Deep Compression)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from xaicompress.encoding.bitpack import index_bits
from xaicompress.encoding.checks import check_int, check_shape, float32_field, index_field
from xaicompress.encoding.entropy import symbol_stream
from xaicompress.encoding.streams import Stream, Streams, array_stream
from xaicompress.errors import XaiCompressError

#: the codebook value types weight sharing offers (`--codebook`), as torch dtypes
CODEBOOK_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
#: bits of one stored codebook entry per value type
CODEBOOK_BITS = {"fp16": 16, "fp32": 32}
_STREAM_CODING = {"fp16": "float16", "fp32": "float32"}
#: largest codebook the format holds (16-bit indices)
MAX_K = 1 << 16


def round_to_dtype(x: np.ndarray, codebook_dtype: str) -> np.ndarray:
    """Values (any shape) rounded to the nearest value the codebook dtype holds, as float32."""
    t = torch.as_tensor(np.asarray(x, dtype=np.float32))
    return t.to(CODEBOOK_DTYPES[codebook_dtype]).float().numpy()


def codebook_dtype_of(values: Tensor) -> str:
    """'fp16' when every entry is exactly an fp16 value (stored at half the size,
    losslessly), else 'fp32'."""
    c = values.float()
    return "fp16" if bool(torch.equal(c.half().float(), c)) else "fp32"


class Codebook:
    """values: float32 (k,) shared values; indices: int64 of the weight's shape, into values.

    Effective weight = values[indices] (times the mask; pruned weights use no entry).
    Packed: "codebook" stream (float16 when lossless, else float32) and "indices" of the
    kept weights, range-coded ("range") or at ceil(log2 k) bits each ("uint<b>"), whichever
    is smaller; no stream when k = 1. Checkpoint: tensors "codebook" and "indices".
    """

    #: the header fields of its tensor records besides shape, encoding, masked, streams
    PARAMS: ClassVar[tuple[str, ...]] = ("k",)
    kind: ClassVar[str] = "codebook"
    TENSORS: ClassVar[tuple[str, ...]] = ("codebook", "indices")
    META: ClassVar[tuple[str, ...]] = ()

    def __init__(self, values: Tensor, indices: Tensor) -> None:
        # on the CPU, as all compression state; `effective` meets the weight on its device
        self.values = values.detach().to("cpu", torch.float32).reshape(-1)
        self.indices = indices.detach().to("cpu", torch.int64)

    def __repr__(self) -> str:
        return f"Codebook(k={self.k})"

    @property
    def k(self) -> int:
        return int(self.values.numel())

    @property
    def value_bits(self) -> int:
        """Bits per stored weight: ceil(log2 k)."""
        return index_bits(self.k)

    @property
    def storage_dtype(self) -> str:
        return codebook_dtype_of(self.values)

    def effective(self, w: Tensor) -> Tensor:
        return self.values.to(w.device, w.dtype)[self.indices.to(w.device)].reshape(w.shape)

    def copy(self) -> Codebook:
        return Codebook(self.values.clone(), self.indices.clone())

    def validate(self, shape: tuple[int, ...], where: str) -> None:
        check_int(self.k, 1, MAX_K, "codebook size k", where)
        if not torch.isfinite(self.values).all():
            raise XaiCompressError(f"{where}: codebook contains NaN or Inf values")
        check_shape(self.indices, shape, "codebook indices", where)
        if self.indices.numel() and (int(self.indices.min()) < 0
                                     or int(self.indices.max()) >= self.k):
            raise XaiCompressError(f"{where}: codebook index out of range 0..{self.k - 1}")

    # ---------------------------------------------------------------- packed file
    def zero_entry(self) -> int | None:
        """Index of the first codebook entry equal to 0 (the zero cluster), or None."""
        zeros = torch.nonzero(self.values == 0).reshape(-1)
        return int(zeros[0]) if zeros.numel() else None

    def encode(self, w: Tensor, keep: Tensor | None) -> tuple[dict[str, Any], list[Stream]]:
        """Streams of the weights at `keep` (flat bool; None = every weight)."""
        del w  # the indices say it all
        dtype = self.storage_dtype
        book = array_stream("codebook", self.values, _STREAM_CODING[dtype])
        streams = [Stream(book.role, book.coding, book.data, self.k * CODEBOOK_BITS[dtype])]
        idx = self.indices.reshape(-1)
        if keep is not None:
            idx = idx[keep]
        b = self.value_bits
        if b:
            streams.append(symbol_stream("indices", idx.numpy(), b, self.k))
        return {"k": self.k}, streams

    @classmethod
    def decode(cls, params: dict[str, Any], streams: Streams, shape: tuple[int, ...],
               keep: Tensor | None, dtype: torch.dtype) -> tuple[Codebook, Tensor]:
        where = streams.where
        k = check_int(params.get("k"), 1, MAX_K, "codebook size k", where)
        values = streams.take_floats("codebook", ("float16", "float32"), k)
        numel = int(torch.Size(shape).numel())
        count = numel if keep is None else int(keep.sum())
        b = index_bits(k)
        idx = np.zeros(count, dtype=np.int64)
        if b:
            idx = streams.take_symbols("indices", b, k, count)
        full = torch.zeros(numel, dtype=torch.int64)
        full[keep if keep is not None else slice(None)] = torch.from_numpy(idx)
        out = cls(values, full.reshape(shape))
        return out, out.values[out.indices].to(dtype)

    # ----------------------------------------------------------------- checkpoint
    def to_checkpoint(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"codebook": self.values.contiguous(), "indices": self.indices.contiguous()}, {}

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, Tensor], meta: dict[str, Any],
                        shape: tuple[int, ...], where: str) -> Codebook:
        missing = [f for f in cls.TENSORS if f not in tensors]
        if missing:
            raise XaiCompressError(f"{where}: codebook without its {missing[0]} tensor")
        values = float32_field(tensors["codebook"], "codebook", where)
        if values.dim() != 1:
            raise XaiCompressError(f"{where}: codebook has shape {tuple(values.shape)}, "
                                   "expected (k,)")
        out = cls(values, index_field(tensors["indices"], "codebook indices", where))
        out.validate(shape, where)
        return out
