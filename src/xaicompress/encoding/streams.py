"""Byte streams: what one encoding writes into the packed file, and reads back.

A tensor is stored as a few streams, each a byte string with a *role* (what it holds:
"values", "positions", "codebook", "indices", "scales") and a *coding* (how its bytes are
laid out). The packed header names both for every stream, so a new coding (an entropy
coder, issue 18) is one more name here and in `docs/format.md`, not a new file format.

Codings of format version 3 (all little-endian):

  float32, float16                 IEEE 754 values
  fill16, fill32                   (dense values) one value that every value equals
  grid8                            (dense values) binary16 scale, then int8 values
                                   (`encoding.dense`; `xcpk_reader.decode_floats` reads)
  int64, int32, int16, int8, uint8 two's-complement / unsigned integers
  bool                             one byte per value, 0 or 1
  uint1 .. uint16                  unsigned integers of that many bits, bit-packed
                                   (`encoding.bitpack`: LSB first, value after value;
                                   uint8 is therefore one byte per value)
  bitmap, relidx                   positions of kept weights (`encoding.positions`)
  range                            entropy-coded symbols (indices, integers, a bitmap's
                                   bits): `encoding.entropy` writes, `xcpk_reader` reads
  zerocluster                      (positions of a codebook, no bytes) the pruned weights
                                   are those whose index is the codebook's zero entry
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from xaicompress.encoding.bitpack import MAX_BITS, packed_length, unpack_bits
from xaicompress.errors import XaiCompressError
from xaicompress.export.xcpk_reader import RANGE, XcpkError, range_decode

#: codings of whole numpy values, by name
ARRAY_CODINGS: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"), "int16": np.dtype("<i2"), "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"), "bool": np.dtype("u1"),
}
#: torch dtype -> the coding a plain (not encoded) tensor of that dtype is stored in
TORCH_CODINGS: dict[torch.dtype, str] = {
    torch.int64: "int64", torch.int32: "int32", torch.int16: "int16", torch.int8: "int8",
    torch.uint8: "uint8", torch.bool: "bool",
}


@dataclass(frozen=True)
class Stream:
    """One stream of a tensor: role, coding, its bytes, and the exact bits of information
    in them (`bits <= 8 * len(data)`; the rest is the padding to a whole byte)."""

    role: str
    coding: str
    data: bytes
    bits: int

    def record(self) -> dict[str, object]:
        """The stream's entry in the packed header."""
        return {"role": self.role, "coding": self.coding, "bytes": len(self.data)}


def uint_coding(bits: int) -> str:
    """Name of the bit-packed coding of `bits`-bit unsigned integers."""
    return f"uint{int(bits)}"


def uint_bits(coding: str) -> int | None:
    """`bits` of a "uint<bits>" bit-packed coding, None for any other coding. ("uint8"
    bit-packed is byte for byte the uint8 array coding.)"""
    digits = coding[4:] if coding.startswith("uint") else ""
    if digits.isdigit() and str(int(digits)) == digits and 1 <= int(digits) <= MAX_BITS:
        return int(digits)
    return None


def array_stream(role: str, values: Tensor | np.ndarray, coding: str) -> Stream:
    """A stream of whole values (flattened row-major) in an `ARRAY_CODINGS` coding."""
    dt = ARRAY_CODINGS[coding]
    arr = values.detach().cpu().reshape(-1).numpy() if isinstance(values, Tensor) else \
        np.asarray(values).reshape(-1)
    data = np.ascontiguousarray(arr.astype(dt)).tobytes()
    return Stream(role, coding, data, 8 * len(data))


class Streams:
    """The streams of one tensor read from a file, by role; each decoder takes the roles it
    needs (checking their coding) and `done` refuses any left over."""

    def __init__(self, streams: Iterable[tuple[str, str, bytes]], where: str) -> None:
        self.where = where
        self._by_role: dict[str, tuple[str, bytes]] = {}
        for role, coding, data in streams:
            if role in self._by_role:
                raise XaiCompressError(f"{where}: two streams with role {role!r}")
            self._by_role[role] = (coding, data)

    def has(self, role: str) -> bool:
        return role in self._by_role

    def coding(self, role: str) -> str:
        """The coding of stream `role` (which must exist), without taking it."""
        return self._by_role[role][0]

    def take(self, role: str, codings: Iterable[str]) -> tuple[str, bytes]:
        """(coding, bytes) of the stream `role`, whose coding must be one of `codings`."""
        allowed = tuple(codings)
        if role not in self._by_role:
            raise XaiCompressError(f"{self.where}: missing its {role!r} stream")
        coding, data = self._by_role.pop(role)
        if coding not in allowed:
            raise XaiCompressError(f"{self.where}: {role} stream has coding {coding!r}, "
                                   f"expected {' or '.join(allowed)}")
        return coding, data

    def take_array(self, role: str, codings: Iterable[str], count: int) -> np.ndarray:
        """`count` values of stream `role` as a numpy array of its coding's dtype."""
        coding, data = self.take(role, codings)
        dt = ARRAY_CODINGS[coding]
        if len(data) != count * dt.itemsize:
            raise XaiCompressError(f"{self.where}: {role} stream of {len(data)} bytes, expected "
                                   f"{count} {coding} values ({count * dt.itemsize} bytes)")
        return np.frombuffer(data, dtype=dt, count=count)

    def take_symbols(self, role: str, bits: int, alphabet: int, count: int) -> np.ndarray:
        """`count` symbols (int64, each < `alphabet`) of stream `role`, coded "uint<bits>"
        or "range" (entropy-coded)."""
        coding, data = self.take(role, (uint_coding(bits), RANGE))
        where = f"{self.where}: {role} stream"
        if coding == RANGE:
            try:
                return range_decode(data, alphabet, count, where)
            except XcpkError as exc:
                raise XaiCompressError(str(exc)) from None
        if len(data) != packed_length(count, bits):
            raise XaiCompressError(f"{where} of {len(data)} bytes, expected "
                                   f"{packed_length(count, bits)} for {count} values of "
                                   f"{bits} bits")
        out = unpack_bits(data, bits, count)
        if count and int(out.max()) >= alphabet:
            raise XaiCompressError(f"{where}: value out of range 0..{alphabet - 1}")
        return out

    def take_floats(self, role: str, codings: Iterable[str], count: int) -> Tensor:
        """`count` finite values of stream `role` as a float32 tensor (count,)."""
        arr = self.take_array(role, codings, count).astype(np.float32)
        if not np.isfinite(arr).all():
            raise XaiCompressError(f"{self.where}: {role} stream holds NaN or Inf values")
        return torch.from_numpy(arr)

    def done(self) -> None:
        if self._by_role:
            raise XaiCompressError(f"{self.where}: unexpected streams {sorted(self._by_role)}")
