"""Bit packing: bit-exact round trips at every width and codebook size, clear errors."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xaicompress.encoding.bitpack import index_bits, pack_bits, packed_length, unpack_bits
from xaicompress.errors import XaiCompressError


@pytest.mark.parametrize("k", range(2, 257))
def test_round_trip_every_codebook_size(k):
    bits = math.ceil(math.log2(k))
    assert index_bits(k) == bits
    rng = np.random.default_rng(k)
    n = 1000 + k  # not a multiple of 8 for most k: the padded last byte is exercised
    values = rng.integers(0, k, n)
    values[:2] = [0, k - 1]  # both ends of the range
    data = pack_bits(values, bits)
    assert len(data) == packed_length(n, bits) == (n * bits + 7) // 8
    assert np.array_equal(unpack_bits(data, bits, n), values)


@pytest.mark.parametrize("bits", range(1, 17))
def test_round_trip_every_width_including_all_ones(bits):
    values = np.full(13, (1 << bits) - 1, dtype=np.int64)
    values[::3] = 0
    assert np.array_equal(unpack_bits(pack_bits(values, bits), bits, 13), values)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 16), st.lists(st.integers(0, 2**16 - 1), max_size=200))
def test_round_trip_property(bits, raw):
    values = np.asarray(raw, dtype=np.int64) % (1 << bits)
    out = unpack_bits(pack_bits(values, bits), bits, len(values))
    assert out.dtype == np.int64
    assert np.array_equal(out, values)


def test_layout_is_lsb_first_little_endian():
    # 3-bit values 1, 2, 7 -> bits 100 010 111 (LSB first) -> byte 0b11010001, then 0b1
    assert pack_bits(np.array([1, 2, 7]), 3) == bytes([0b11010001, 0b1])


def test_large_array_crosses_chunks():
    import xaicompress.encoding.bitpack as packing

    n = packing._CHUNK + 123
    values = np.arange(n, dtype=np.int64) % 7
    assert np.array_equal(unpack_bits(pack_bits(values, 3), 3, n), values)


def test_errors():
    with pytest.raises(XaiCompressError, match="values must lie"):
        pack_bits(np.array([4]), 2)
    with pytest.raises(XaiCompressError, match="values must lie"):
        pack_bits(np.array([-1]), 4)
    with pytest.raises(XaiCompressError, match="bit width"):
        pack_bits(np.array([1]), 0)
    with pytest.raises(XaiCompressError, match="bit width"):
        unpack_bits(b"\x00", 17, 1)
    with pytest.raises(XaiCompressError, match="integer values"):
        pack_bits(np.array([0.5]), 2)
    with pytest.raises(XaiCompressError, match="fewer than"):
        unpack_bits(pack_bits(np.arange(10), 4), 4, 11)
    assert pack_bits(np.array([], dtype=np.int64), 5) == b""
    assert unpack_bits(b"", 5, 0).size == 0
