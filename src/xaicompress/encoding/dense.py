"""`Dense`: values stored as they are (float32), the coding of every tensor without a weight
encoding (biases, BatchNorm, unconstrained weights) and of a masked layer's kept values."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from xaicompress.encoding.streams import TORCH_CODINGS, Stream, Streams, array_stream
from xaicompress.errors import XaiCompressError


class Dense:
    """No weight encoding. Packed: one "values" stream, float32 for floating tensors (what
    a runtime computes with; float16 when every value is exactly a binary16 value, which
    loses nothing), the tensor's own integer coding (int64, ...) for integer buffers such as
    BatchNorm's batch counter. With a mask only the kept values are stored.
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

    def encode(self, w: Tensor, keep: Tensor | None) -> tuple[dict[str, Any], list[Stream]]:
        flat = w.detach().reshape(-1)
        if keep is not None:
            flat = flat[keep]
        coding = self.coding_of(w.dtype)
        values = flat.float() if coding == "float32" else flat
        if coding == "float32" and values.numel() and bool(torch.equal(values.half().float(),
                                                                       values)):
            coding = "float16"
        return {}, [array_stream("values", values, coding)]

    @classmethod
    def decode(cls, params: dict[str, Any], streams: Streams, shape: tuple[int, ...],
               keep: Tensor | None, dtype: torch.dtype) -> tuple[None, Tensor]:
        del params  # dense has none
        numel = int(torch.Size(shape).numel())
        count = numel if keep is None else int(keep.sum())
        coding = cls.coding_of(dtype)
        if coding == "float32":
            vals = streams.take_floats("values", ("float32", "float16"), count)
        else:
            arr = streams.take_array("values", (coding,), count)
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
