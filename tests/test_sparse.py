"""Sparse position storage: bitmap / relative indices, bit-exact round trips."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xaicompress.encoding.positions import decode_positions, encode_positions, position_bits
from xaicompress.errors import XaiCompressError


@settings(max_examples=150, deadline=None)
@given(numel=st.integers(0, 3000), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_round_trip_any_density(numel, density, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(numel, generator=g) < density
    kind, payload = encode_positions(mask)
    back = decode_positions(kind, payload, numel)
    assert back.dtype == torch.bool
    assert torch.equal(back, mask)
    assert len(payload) == math.ceil(position_bits(mask) / 8)


@settings(max_examples=40, deadline=None)
@given(gaps=st.lists(st.integers(1, 5000), min_size=0, max_size=40), tail=st.integers(0, 300))
def test_round_trip_long_gaps_use_fillers(gaps, tail):
    positions = torch.tensor(gaps, dtype=torch.long).cumsum(0) - 1
    numel = int(positions[-1]) + 1 + tail if gaps else tail
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[positions] = True
    kind, payload = encode_positions(mask)
    assert torch.equal(decode_positions(kind, payload, numel), mask)


def test_choice_of_format_is_the_cheaper():
    dense = torch.rand(1000, generator=torch.Generator().manual_seed(0)) < 0.5
    assert encode_positions(dense)[0] == "bitmap"
    assert position_bits(dense) == 1000
    sparse = torch.zeros(100_000, dtype=torch.bool)
    sparse[::97] = True
    kind, payload = encode_positions(sparse)
    assert kind == "relidx"
    # every gap is 97: 7-bit gaps, one entry per kept weight, 40 header bits
    assert position_bits(sparse) == 40 + sparse.sum().item() * 7
    assert len(payload) * 8 < 100_000 / 10


def test_shaped_mask_flattens_row_major():
    mask = torch.tensor([[True, False, False], [False, False, True]])
    kind, payload = encode_positions(mask)
    assert torch.equal(decode_positions(kind, payload, 6).reshape(2, 3), mask)


@pytest.mark.parametrize("kind,payload,numel,msg", [
    ("bitmap", b"\x00", 20, "bitmap of 1 bytes"),
    ("zip", b"", 3, "unknown kind"),
    ("relidx", b"\x03", 10, "header"),
    ("relidx", bytes([0, 1, 0, 0, 0, 0]), 10, "k=0"),
    ("relidx", bytes([4, 2, 0, 0, 0]), 10, "body"),
    ("relidx", bytes([4, 1, 0, 0, 0, 15]), 10, "beyond"),
])
def test_corrupt_payload_is_a_clear_error(kind, payload, numel, msg):
    with pytest.raises(XaiCompressError, match=msg):
        decode_positions(kind, payload, numel)
