"""Entropy-coded streams ("range", "zerocluster"): exact round trips through the library and
the standalone reader, sizes near the empirical entropy, damaged streams refused, and the
packed size the report gives is the real file's."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from tests.badinput.makers_files import write_xcpk, xcpk_parts
from tests.test_xcpk_reader import _base, _check_against_library, read_header
from xaicompress.checkpoint import Checkpoint
from xaicompress.encoding import Codebook, IntGrid, Mask, qmax
from xaicompress.encoding.entropy import range_coded, range_encode, symbol_stream
from xaicompress.encoding.positions import decode_positions, encode_positions
from xaicompress.errors import XaiCompressError
from xaicompress.export.packed import load_packed, packed_bytes, packed_report, write_packed
from xaicompress.export.xcpk_reader import TRAILER, XcpkError, range_decode, read_xcpk
from xaicompress.relevance import prunable_layers


def _entropy_bits(sym: np.ndarray) -> float:
    p = np.bincount(sym) / sym.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum() * sym.size)


@pytest.mark.parametrize(("alphabet", "count"), [(2, 0), (2, 1), (3, 15), (5, 16), (5, 17),
                                                  (16, 1000), (255, 5000), (2, 50000)])
def test_range_coding_round_trips_near_the_entropy(alphabet, count):
    rng = np.random.default_rng(count)
    p = 0.5 ** np.arange(1, alphabet + 1)
    sym = rng.choice(alphabet, count, p=p / p.sum())
    data = range_coded(sym, alphabet)
    assert np.array_equal(range_decode(data, alphabet, count, "t"), sym)
    if count >= 1000:  # model learning (no table) + the coder's last word, per stream
        assert 8 * len(data) <= 1.02 * _entropy_bits(sym) + 8 * (alphabet + 8)


def test_symbol_stream_takes_the_smaller_coding():
    rng = np.random.default_rng(0)
    uniform = rng.integers(0, 16, 4000)
    assert symbol_stream("indices", uniform, 4, 16).coding == "uint4"
    skewed = np.minimum(rng.geometric(0.6, 4000) - 1, 15)
    s = symbol_stream("indices", skewed, 4, 16)
    assert s.coding == "range" and len(s.data) < 0.5 * 4000 * 4 / 8
    assert symbol_stream("indices", skewed, 4, 16, entropy=False).coding == "uint4"


@pytest.mark.parametrize(("data", "match"), [
    (b"", "prior byte"), (bytes([8, 0, 0, 0, 1]), "prior byte"), (bytes([0, 1, 2]), "words")])
def test_range_decode_refuses_malformed_streams(data, match):
    with pytest.raises(XcpkError, match=match):
        range_decode(data, 4, 10, "t")


def test_range_decode_refuses_trailing_words_and_bad_alphabets():
    sym = np.arange(100) % 3
    data = range_encode(sym, 3, 0)
    with pytest.raises(XcpkError, match="exactly 100 symbols"):
        range_decode(data + data[1:], 3, 100, "t")
    with pytest.raises(XcpkError, match="alphabet"):
        range_decode(data, 1 << 17, 100, "t")
    with pytest.raises(XaiCompressError, match="sparse positions"):
        decode_positions("range", data + data[1:], 100)


def test_sparse_positions_are_range_coded_when_smaller():
    mask = torch.from_numpy(np.random.default_rng(0).random(20000) < 0.04)
    kind, payload = encode_positions(mask)
    assert kind == "range"
    assert len(payload) < len(encode_positions(mask, entropy=False)[1])
    assert torch.equal(decode_positions(kind, payload, mask.numel()), mask)


# ------------------------------------------------------------------ whole files
def _skewed_codebook(ck: Checkpoint, k: int, zero: bool) -> None:
    """Codebooks with a peaked index distribution (what trained weights give); with `zero`,
    entry 0 is 0.0 and the layer's mask is exactly 'index != 0' (the zero cluster)."""
    rng = np.random.default_rng(1)
    for name, m in prunable_layers(ck.model).items():
        w = m.weight.detach()
        values = torch.linspace(float(w.min()), float(w.max()), k).half().float()
        if zero:
            values = torch.cat([torch.zeros(1), values[1:]])
        idx = torch.from_numpy(np.minimum(rng.geometric(0.5, w.numel()) - 1, k - 1))
        ck.state.get(name).weights = Codebook(values, idx.reshape(w.shape))
        if zero:
            ck.state.get(name).mask = Mask(idx.reshape(w.shape) != 0)


def _laplace_intgrid(ck: Checkpoint, bits: int, sparsity: float) -> None:
    rng = np.random.default_rng(2)
    for name, m in prunable_layers(ck.model).items():
        w = torch.from_numpy(rng.laplace(0, 0.02, tuple(m.weight.shape)).astype(np.float32))
        with torch.no_grad():
            m.weight.copy_(w)
        scale = w.reshape(w.shape[0], -1).abs().amax(1) / qmax(bits)
        ck.state.get(name).weights = IntGrid(bits, scale.clamp(min=1e-8))
        if sparsity:
            ck.state.get(name).mask = Mask(torch.from_numpy(
                rng.random(tuple(w.shape)) >= sparsity))


CASES = {
    "codebook16": lambda ck: _skewed_codebook(ck, 16, zero=False),
    "codebook8+zerocluster": lambda ck: _skewed_codebook(ck, 8, zero=True),
    "int4": lambda ck: _laplace_intgrid(ck, 4, 0.0),
    "int6+range_positions": lambda ck: _laplace_intgrid(ck, 6, 0.95),
}
EXPECTED = {"codebook16": {"range"}, "codebook8+zerocluster": {"zerocluster", "range"},
            "int4": {"range"}, "int6+range_positions": {"range"}}


@pytest.mark.parametrize("case", sorted(CASES))
def test_entropy_coded_files_round_trip_exactly(case, tmp_path):
    ck = _base()
    CASES[case](ck)
    ck.state.apply(ck.model)
    path = tmp_path / "m.xcpk"
    write_packed(ck, path)  # verifies outputs on reload before renaming
    codings = {s["coding"] for r in read_header(path)["tensors"].values() for s in r["streams"]}
    assert EXPECTED[case] <= codings
    _check_against_library(path, ck)  # standalone reader == library == in-memory, bit for bit
    back = load_packed(path)
    for name, lc in ck.state.items():
        got = back.state.layers[name]
        assert (lc.mask is None) == (got.mask is None)
        if lc.mask is not None:
            assert torch.equal(lc.mask.keep, got.mask.keep)
        if lc.codebook is not None:
            assert torch.equal(lc.codebook.indices, got.codebook.indices)
    assert packed_report(ck).file_bytes == path.stat().st_size


def test_entropy_coding_shrinks_the_file_and_the_report_counts_it():
    ck = _base()
    _skewed_codebook(ck, 8, zero=True)
    ck.state.apply(ck.model)
    rep = packed_report(ck)
    n = sum(m.weight.numel() for m in prunable_layers(ck.model).values())
    # geometric(0.5) indices: 2 bits of entropy per weight (1 for the zero flag, 1 for the
    # rest on average), vs 3 bits fixed + a bitmap
    bits = rep.parts_bits["indices"] + rep.parts_bits.get("positions", 0)
    assert bits < 2.05 * n
    assert rep.file_bytes == len(packed_bytes(ck))


def test_damaged_entropy_coded_files_are_refused(tmp_path):
    ck = _base()
    _laplace_intgrid(ck, 4, 0.9)
    ck.state.apply(ck.model)
    raw = packed_bytes(ck)
    for cut in (1, 4, len(raw) // 2):
        with pytest.raises(XaiCompressError):
            _load(tmp_path, raw[:-cut])
    rng = np.random.default_rng(0)
    for pos in rng.integers(0, len(raw), 20):
        bad = bytearray(raw)
        bad[int(pos)] ^= 1 << int(rng.integers(8))
        with pytest.raises(XaiCompressError):
            _load(tmp_path, bytes(bad))


def test_a_range_stream_with_extra_words_is_refused_even_with_a_valid_crc(tmp_path):
    ck = _base()
    _laplace_intgrid(ck, 4, 0.0)
    ck.state.apply(ck.model)
    good = tmp_path / "good.xcpk"
    write_packed(ck, good)
    # one more word at the end of a range stream, header and CRC made consistent: only the
    # decoder can tell
    header, payload = xcpk_parts(good)
    order = sorted(header["tensors"])
    name = next(n for n in order if header["tensors"][n]["streams"]
                and header["tensors"][n]["streams"][-1]["coding"] == "range")
    end = sum(s["bytes"] for n in order[:order.index(name) + 1]
              for s in header["tensors"][n]["streams"])
    header["tensors"][name]["streams"][-1]["bytes"] += 4
    path = write_xcpk(tmp_path / "x.xcpk", header,
                      payload[:end] + b"\x01\x00\x00\x00" + payload[end:])
    with pytest.raises(XaiCompressError, match="range-coded"):
        load_packed(path)
    with pytest.raises(XcpkError, match="range-coded"):
        read_xcpk(str(path))


def _load(tmp_path, raw: bytes) -> Checkpoint:
    p = tmp_path / "d.xcpk"
    p.write_bytes(raw)
    return load_packed(p)


def test_crc_covers_the_entropy_coded_payload():
    ck = _base()
    _laplace_intgrid(ck, 4, 0.0)
    ck.state.apply(ck.model)
    raw = packed_bytes(ck)
    (crc,) = TRAILER.unpack_from(raw, len(raw) - TRAILER.size)
    assert crc == zlib.crc32(raw[:-TRAILER.size])


def test_float_vectors_exact_in_fp16_are_stored_at_half_width(tmp_path):
    ck = _base()
    with torch.no_grad():
        for name, p in ck.model.named_parameters():
            if name.endswith("bias"):
                p.copy_(p.half().float())
    path = tmp_path / "m.xcpk"
    write_packed(ck, path)
    rec = read_header(path)["tensors"]
    assert rec["fc1.bias"]["streams"][0] == {"role": "values", "coding": "float16",
                                            "bytes": 2 * 120}
    assert rec["fc1.weight"]["streams"][0]["coding"] == "float32"  # not exact: full width
    _check_against_library(path, ck)
