"""Entropy coding of symbol streams (codebook indices, integer weights, sparse positions).

The "range" coding (docs/format.md, "Range coding") is constriction's range coder
(`constriction.stream.queue.RangeEncoder`, a kept library with a Rust core and a numpy
interface; why not nncodec's DeepCABAC: docs/design.md) driven by a block-adaptive
categorical model, so no probability table is stored: block j of the symbols is coded with
the counts of every symbol before it plus a prior count alpha. The model's definition
(blocks, priors, the probabilities handed to constriction) lives once, in the standalone
reader `export/xcpk_reader.py`, which decodes these streams too; this module is the writer.

`symbol_stream` stores a stream in the cheaper of its fixed-width coding ("uint<b>") and
"range", so entropy coding never makes a file larger.
"""

from __future__ import annotations

import numpy as np

from xaicompress.encoding.bitpack import pack_bits
from xaicompress.encoding.streams import Stream, uint_coding
from xaicompress.export.xcpk_reader import (
    MAX_ALPHABET,
    RANGE,
    RANGE_ALPHAS,
    range_encode,
)


def range_coded(symbols: np.ndarray, alphabet: int) -> bytes:
    """The smallest "range" stream of `symbols` over the priors of `RANGE_ALPHAS` (the
    smallest prior byte on a tie)."""
    if not 1 <= alphabet <= MAX_ALPHABET:
        raise ValueError(f"alphabet of {alphabet} symbols, expected 1..{MAX_ALPHABET}")
    sym = np.asarray(symbols).reshape(-1)
    if sym.size and (int(sym.min()) < 0 or int(sym.max()) >= alphabet):
        raise ValueError(f"symbols outside 0..{alphabet - 1}")
    best = b""
    for prior in range(len(RANGE_ALPHAS)):
        data = range_encode(sym, alphabet, prior)
        if not best or len(data) < len(best):
            best = data
    return best


def symbol_stream(role: str, symbols: np.ndarray, bits: int, alphabet: int, *,
                  entropy: bool = True) -> Stream:
    """`symbols` (ints in [0, alphabet), alphabet <= 2^bits) as "uint<bits>" or, when
    `entropy` and it is smaller, as "range" (the fixed width on a tie)."""
    sym = np.asarray(symbols).reshape(-1)
    fixed = Stream(role, uint_coding(bits), pack_bits(sym, bits), bits * sym.size)
    if not entropy or alphabet < 2:
        return fixed
    data = range_coded(sym, alphabet)
    if len(data) < len(fixed.data):
        return Stream(role, RANGE, data, 8 * len(data))
    return fixed
