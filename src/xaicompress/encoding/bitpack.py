"""Bit packing of small unsigned integers (codebook indices, integer weights).

`pack_bits(values, bits)` stores each value in exactly `bits` bits, least significant bit
first, value after value, little-endian bit order within each byte; the last byte is
zero-padded. So `n` values take `ceil(n * bits / 8)` bytes, the theoretical minimum for a
fixed-width code. Everything is vectorised numpy (one bit matrix per chunk, no Python loop
per element).
"""

from __future__ import annotations

import numpy as np

from xaicompress.errors import XaiCompressError

MAX_BITS = 16
# Why chunk: the bit matrix is `bits` bytes per value; chunks keep it to ~64 MB for any model.
_CHUNK = 1 << 22  # values per chunk; a multiple of 8 so chunks end on byte boundaries


def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or not (
            1 <= int(bits) <= MAX_BITS):
        raise XaiCompressError(f"bit width {bits!r}: expected an integer from 1 to {MAX_BITS}")


def packed_length(count: int, bits: int) -> int:
    """Bytes that `count` values of `bits` bits take once packed."""
    return (int(count) * int(bits) + 7) // 8


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integers `values` (any shape, flattened in C order) at `bits` each.

    Raises XaiCompressError if a value is negative or does not fit in `bits` bits.
    """
    _check_bits(bits)
    v = np.asarray(values).reshape(-1)
    if v.size == 0:
        return b""
    if not np.issubdtype(v.dtype, np.integer):
        raise XaiCompressError(f"pack_bits: expected integer values, got {v.dtype}")
    if int(v.min()) < 0 or int(v.max()) >= (1 << int(bits)):
        raise XaiCompressError(f"pack_bits: values must lie in [0, {(1 << int(bits)) - 1}] for "
                               f"{bits} bits, got [{int(v.min())}, {int(v.max())}]")
    v = v.astype(np.uint32, copy=False)
    shifts = np.arange(int(bits), dtype=np.uint32)
    # Each chunk holds a multiple of 8 values, so its bit count is a multiple of 8 and the
    # packed chunks concatenate without re-aligning.
    parts = []
    for start in range(0, v.size, _CHUNK):
        chunk = v[start:start + _CHUNK]
        bitmat = ((chunk[:, None] >> shifts[None, :]) & 1).astype(np.uint8)
        parts.append(np.packbits(bitmat.reshape(-1), bitorder="little").tobytes())
    return b"".join(parts)


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: `count` values as int64 (count,).

    Raises XaiCompressError if `data` holds fewer than `count * bits` bits.
    """
    _check_bits(bits)
    count = int(count)
    if count < 0:
        raise XaiCompressError(f"unpack_bits: count {count}: expected >= 0")
    need = packed_length(count, bits)
    if len(data) < need:
        raise XaiCompressError(f"unpack_bits: {len(data)} bytes hold fewer than {count} values "
                               f"of {bits} bits ({need} bytes needed)")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    raw = np.frombuffer(data, dtype=np.uint8, count=need)
    weights = (np.int64(1) << np.arange(int(bits), dtype=np.int64))
    out = np.empty(count, dtype=np.int64)
    bytes_per_chunk = _CHUNK * int(bits) // 8
    for i, start in enumerate(range(0, count, _CHUNK)):
        n = min(_CHUNK, count - start)
        chunk = raw[i * bytes_per_chunk:i * bytes_per_chunk + packed_length(n, bits)]
        bitmat = np.unpackbits(chunk, count=n * int(bits), bitorder="little")
        out[start:start + n] = bitmat.reshape(n, int(bits)).astype(np.int64) @ weights
    return out


def index_bits(k: int) -> int:
    """Bits of an index into a codebook of `k` entries: ceil(log2 k) (0 for k = 1)."""
    if k < 1:
        raise XaiCompressError(f"codebook size {k}: expected at least 1 entry")
    return (int(k) - 1).bit_length()
