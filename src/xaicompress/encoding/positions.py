"""Storage of a pruning mask's positions as a runtime would keep them (`encoding.Mask` uses it).

The values of the kept weights are stored elsewhere (by the layer's weight encoding); this
module only encodes *where* they are, in the cheapest of two formats:

``bitmap``  one bit per weight (little-endian bit order inside each byte);
            ``numel`` bits.
``relidx``  Deep Compression's relative indices (Han et al. 2016): the gap from the previous
            kept weight in k bits. A gap longer than ``M = 2**k - 1`` is bridged with *filler*
            entries (code 0 = "advance M positions, no weight here"), so unlike Deep
            Compression's filler zeros they carry no value: the value stream holds exactly the
            kept weights. Codes 1..M mean "the next kept weight is `code` positions further".
            Payload: 1 byte k, uint32 little-endian number of entries, the k-bit codes packed
            little-endian; ``40 + entries * k`` bits. k (1..16) is chosen to minimise the size.
``range``   the bitmap's bits entropy-coded (`encoding.entropy`, block-adaptive model):
            about numel * H(sparsity) bits.

`encode_positions(mask) -> (kind, payload)` picks the cheapest; `decode_positions(kind,
payload, numel)` returns the flat bool mask bit-exactly; `position_bits(mask)` is the size
of the chosen encoding in bits (``len(payload) == ceil(position_bits / 8)``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from xaicompress.encoding.entropy import range_coded
from xaicompress.errors import XaiCompressError
from xaicompress.export.xcpk_reader import RANGE, XcpkError, range_decode

BITMAP = "bitmap"
RELIDX = "relidx"
KINDS = (BITMAP, RELIDX, RANGE)
_MAX_K = 16
_HEADER_BITS = 8 + 32


def _flat_mask(mask: Tensor) -> np.ndarray:
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    return mask.detach().reshape(-1).cpu().numpy().astype(bool)


def _gaps(flat: np.ndarray) -> np.ndarray:
    """Distance of every kept position from the previous one (the first from -1), int64."""
    pos = np.flatnonzero(flat).astype(np.int64)
    return np.diff(np.concatenate([np.array([-1], dtype=np.int64), pos]))


def _relidx_entries(gaps: np.ndarray, k: int) -> int:
    m = (1 << k) - 1
    return int(((gaps + m - 1) // m).sum())


def _best_k(gaps: np.ndarray) -> tuple[int, int]:
    """(k, entries) minimising the relative-index size; smallest k wins ties."""
    best = (1, _relidx_entries(gaps, 1))
    for k in range(2, _MAX_K + 1):
        e = _relidx_entries(gaps, k)
        if e * k < best[1] * best[0]:
            best = (k, e)
    return best


def _sizes(flat: np.ndarray) -> tuple[int, int, int, int]:
    """(bitmap bits, relidx bits, k, entries)."""
    k, entries = _best_k(_gaps(flat))
    return flat.size, _HEADER_BITS + entries * k, k, entries


def position_bits(mask: Tensor, *, entropy: bool = True) -> int:
    """Bits needed to store the positions of the kept (True) entries of `mask` (any shape)
    in the cheapest format (`encode_positions`; the range coding's whole bytes)."""
    kind, payload = encode_positions(mask, entropy=entropy)
    if kind == RANGE:
        return 8 * len(payload)
    bitmap, relidx, _, _ = _sizes(_flat_mask(mask))
    return min(bitmap, relidx)


def encode_positions(mask: Tensor, *, entropy: bool = True) -> tuple[str, bytes]:
    """Encode the positions of True entries of `mask` (any shape; flattened row-major).

    Returns ``(kind, payload)`` with kind ``"bitmap"``, ``"relidx"`` or (when `entropy`)
    ``"range"``, whichever is smallest in whole bytes (bitmap, then relidx, on a tie).
    """
    flat = _flat_mask(mask)
    kind, payload = _fixed_positions(flat)
    if entropy:
        coded = range_coded(flat.astype(np.int64), 2)
        if len(coded) < len(payload):
            return RANGE, coded
    return kind, payload


def _fixed_positions(flat: np.ndarray) -> tuple[str, bytes]:
    bitmap_bits, relidx_bits, k, entries = _sizes(flat)
    if bitmap_bits <= relidx_bits:
        return BITMAP, np.packbits(flat, bitorder="little").tobytes()
    gaps = _gaps(flat)
    m = (1 << k) - 1
    per_gap = (gaps + m - 1) // m  # fillers + the entry of the kept weight itself
    codes = np.zeros(entries, dtype=np.int64)
    ends = np.cumsum(per_gap) - 1
    codes[ends] = gaps - (per_gap - 1) * m
    bits = ((codes[:, None] >> np.arange(k)) & 1).astype(np.uint8).reshape(-1)
    body = np.packbits(bits, bitorder="little").tobytes()
    return RELIDX, bytes([k]) + int(entries).to_bytes(4, "little") + body


def decode_positions(kind: str, payload: bytes, numel: int) -> Tensor:
    """Inverse of `encode_positions`: a flat bool tensor of `numel` entries (True = kept).

    A payload that does not fit `numel` raises `XaiCompressError` (a corrupt file).
    """
    numel = int(numel)
    if numel < 0:
        raise XaiCompressError(f"sparse positions: numel {numel} is negative")
    if kind == RANGE:
        try:
            return torch.from_numpy(range_decode(bytes(payload), 2, numel,
                                                 "sparse positions").astype(bool))
        except XcpkError as exc:
            raise XaiCompressError(str(exc)) from None
    raw = np.frombuffer(bytes(payload), dtype=np.uint8)
    if kind == BITMAP:
        if raw.size != (numel + 7) // 8:
            raise XaiCompressError(f"sparse positions: bitmap of {raw.size} bytes, expected "
                                   f"{(numel + 7) // 8} for {numel} weights")
        flat = np.unpackbits(raw, bitorder="little")[:numel].astype(bool)
        return torch.from_numpy(flat.copy())
    if kind != RELIDX:
        raise XaiCompressError(f"sparse positions: unknown kind {kind!r}, expected one of "
                               f"{', '.join(KINDS)}")
    if raw.size < 5:
        raise XaiCompressError("sparse positions: relative-index payload shorter than its "
                               "5-byte header")
    k = int(raw[0])
    entries = int.from_bytes(raw[1:5].tobytes(), "little")
    if not 1 <= k <= _MAX_K:
        raise XaiCompressError(f"sparse positions: relative-index width k={k}, expected 1.."
                               f"{_MAX_K}")
    # Every entry (kept weight or filler) advances at least one position, so a valid stream
    # has at most numel entries: refuse more before unpacking anything.
    if entries > numel:
        raise XaiCompressError(f"sparse positions: {entries} relative-index entries for only "
                               f"{numel} weights")
    if raw.size - 5 != (entries * k + 7) // 8:
        raise XaiCompressError(f"sparse positions: relative-index body of {raw.size - 5} bytes, "
                               f"expected {(entries * k + 7) // 8} for {entries} entries of "
                               f"{k} bits")
    bits = np.unpackbits(raw[5:], bitorder="little")[: entries * k].astype(np.int64)
    codes = (bits.reshape(entries, k) << np.arange(k)).sum(1)
    m = (1 << k) - 1
    advance = np.where(codes == 0, m, codes)
    pos = np.cumsum(advance) - 1
    kept = pos[codes != 0]
    if kept.size and kept[-1] >= numel:
        raise XaiCompressError(f"sparse positions: relative indices reach position "
                               f"{int(kept[-1])}, beyond the {numel} weights")
    flat = np.zeros(numel, dtype=bool)
    flat[kept] = True
    return torch.from_numpy(flat)


def sparse_weight_bits(mask: Tensor, value_bits: int = 32) -> int:
    """Bits of a masked weight stored sparsely: positions plus one value per kept weight."""
    return position_bits(mask) + int(mask.sum()) * value_bits
