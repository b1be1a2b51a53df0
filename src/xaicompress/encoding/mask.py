"""`Mask`: which weights of a layer are kept (unstructured pruning)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from xaicompress.encoding.checks import check_shape
from xaicompress.encoding.positions import KINDS, decode_positions, encode_positions, position_bits
from xaicompress.encoding.streams import Stream, Streams
from xaicompress.errors import XaiCompressError


class Mask:
    """keep: bool tensor of the weight's shape, True = kept. Pruned weights are exactly 0.

    Packed: one "positions" stream (bitmap, relative indices or the range-coded bitmap,
    whichever is smallest: `encoding.positions`), none when every weight is kept.
    Checkpoint: tensor "mask" (uint8 0/1).
    """

    TENSORS: ClassVar[tuple[str, ...]] = ("mask",)
    META: ClassVar[tuple[str, ...]] = ()

    def __init__(self, keep: Tensor) -> None:
        if not isinstance(keep, Tensor):
            raise TypeError(f"Mask needs a bool tensor, got {type(keep).__name__}")
        # compression state lives on the CPU (files are written from it); it meets a GPU
        # weight through `apply`, which moves it to the weight's device
        self.keep = keep.detach().to("cpu", torch.bool)

    def __repr__(self) -> str:
        return f"Mask({self.kept}/{self.keep.numel()} kept)"

    @property
    def kept(self) -> int:
        """Number of kept weights."""
        return int(self.keep.sum())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / max(1, self.keep.numel())

    def apply(self, w: Tensor) -> Tensor:
        """w with the pruned weights set to zero."""
        return w * self.keep.to(w.device, w.dtype)

    def copy(self) -> Mask:
        return Mask(self.keep.clone())

    def validate(self, shape: tuple[int, ...], where: str) -> None:
        check_shape(self.keep, shape, "mask", where)

    # ---------------------------------------------------------------- packed file
    def position_bits(self) -> int:
        """Bits of the positions as packed: 0 when every weight is kept, else the cheaper of
        bitmap and relative indices."""
        return 0 if bool(self.keep.all()) else position_bits(self.keep)

    def encode(self) -> list[Stream]:
        if bool(self.keep.all()):
            return []
        kind, payload = encode_positions(self.keep)
        bits = 8 * len(payload) if kind == "range" else position_bits(self.keep, entropy=False)
        return [Stream("positions", kind, payload, bits)]

    @classmethod
    def decode(cls, streams: Streams, shape: tuple[int, ...]) -> Mask:
        numel = int(torch.Size(shape).numel())
        if not streams.has("positions"):
            return cls(torch.ones(shape, dtype=torch.bool))
        kind, payload = streams.take("positions", KINDS)
        try:
            flat = decode_positions(kind, payload, numel)
        except XaiCompressError as exc:
            raise XaiCompressError(f"{streams.where}: {exc}") from None
        return cls(flat.reshape(shape))

    # ----------------------------------------------------------------- checkpoint
    def to_checkpoint(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"mask": self.keep.to(torch.uint8).contiguous()}, {}

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, Tensor], meta: dict[str, Any],
                        shape: tuple[int, ...], where: str) -> Mask:
        t = tensors["mask"]
        if t.dtype not in (torch.uint8, torch.bool):
            raise XaiCompressError(f"{where}: mask has dtype {t.dtype}, expected uint8 or bool")
        if t.dtype == torch.uint8 and bool((t > 1).any()):
            raise XaiCompressError(f"{where}: mask holds values other than 0 and 1")
        out = cls(t)
        out.validate(shape, where)
        return out
