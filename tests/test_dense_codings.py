"""Format version 3's value codings of dense tensors (fill, grid8, narrow integers), the
rounding that makes biases grid8, and that version 2 files still load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from xaicompress.checkpoint import Checkpoint, ModelSpec
from xaicompress.data import load_dataset
from xaicompress.encoding.dense import DENSE, grid8_parts, grid8_round
from xaicompress.encoding.streams import Streams
from xaicompress.errors import XaiCompressError
from xaicompress.export.packed import load_packed, packed_report, write_packed
from xaicompress.export.xcpk_reader import parse_container, read_xcpk
from xaicompress.metrics import accuracy
from xaicompress.quant.codebook import round_vectors

V2_DEMO = Path(__file__).parent / "data" / "lenet5_demo_v2.xcpk"


def _roundtrip(t: torch.Tensor) -> tuple[str, int, torch.Tensor]:
    _, streams = DENSE.encode(t, None)
    (s,) = streams
    _, back = DENSE.decode({}, Streams([(s.role, s.coding, s.data)], "t"), tuple(t.shape),
                           None, t.dtype)
    return s.coding, len(s.data), back


@pytest.mark.parametrize("values, coding, nbytes", [
    (torch.zeros(40), "fill16", 2),
    (torch.full((7,), 1.0 / 3), "fill32", 4),
    (torch.tensor([0.5, -0.25, 0.125]), "float16", 6),
    (torch.tensor([1.0 / 3, 0.1]), "float32", 8),
    (torch.tensor([2.0]), "float16", 2),
])
def test_float_values_take_the_smallest_lossless_coding(values, coding, nbytes):
    got, n, back = _roundtrip(values)
    assert (got, n) == (coding, nbytes)
    assert torch.equal(back, values)


def test_grid8_stores_a_rounded_bias_in_one_byte_a_value_bit_for_bit():
    b = torch.randn(30) * 0.7
    r = grid8_round(b)
    step = float(b.abs().max()) / 127
    assert float((r - b).abs().max()) <= step / 2 * 1.001  # moved by at most half a level
    assert len(torch.unique(r)) <= 255
    coding, n, back = _roundtrip(r)
    assert (coding, n) == ("grid8", 2 + 30)
    assert np.array_equal(back.numpy().view(np.int32), r.numpy().view(np.int32))
    # the unrounded bias is not on a grid: stored as it is
    assert _roundtrip(b)[0] == "float32"
    assert grid8_parts(b.numpy()) is None


def test_grid8_rounding_falls_back_to_fp16_where_the_grid_is_not_exact():
    tiny = torch.tensor([1e-6, -3e-7, 2e-7])  # the scale would be below fp16's normal range
    r = grid8_round(tiny)
    assert torch.equal(r, tiny.half().float())
    assert torch.equal(grid8_round(torch.zeros(5)), torch.zeros(5))
    # a negative value rounded to zero is stored as +0 (the grid has no -0)
    r = grid8_round(torch.tensor([1.0, -1e-4]))
    assert r[1].item() == 0.0 and not torch.signbit(r[1])


@pytest.mark.parametrize("dtype, value, coding", [
    (torch.int64, 7, "int8"), (torch.int64, 300, "int16"), (torch.int64, -70000, "int32"),
    (torch.int64, 1 << 40, "int64"), (torch.int32, 5, "int8"), (torch.uint8, 3, "uint8"),
    (torch.bool, True, "bool"),
])
def test_integer_buffers_take_the_narrowest_coding_and_keep_their_dtype(dtype, value, coding):
    t = torch.tensor([value, 0], dtype=dtype)
    got, _, back = _roundtrip(t)
    assert got == coding
    assert back.dtype == dtype and torch.equal(back, t)


def test_an_integer_tensor_stored_wider_than_its_dtype_is_refused():
    _, streams = DENSE.encode(torch.tensor([1 << 40], dtype=torch.int64), None)
    (s,) = streams
    with pytest.raises(XaiCompressError, match="coding 'int64'"):
        DENSE.decode({}, Streams([(s.role, s.coding, s.data)], "t"), (1,), None, torch.int32)


@pytest.mark.parametrize("coding, data, msg", [
    ("grid8", b"\x00\x3c" + bytes([128]), "-127..127"),  # scale 1.0, q = -128
    ("grid8", b"\x00\x00\x01", "scale > 0"),  # scale 0
    ("grid8", b"\x00\x3c\x01\x02", "expected 2 \\+ 1"),
    ("fill16", b"\x00\x3c\x00", "bytes"),
])
def test_bad_dense_value_streams_are_refused(coding, data, msg):
    with pytest.raises(XaiCompressError, match=msg):
        DENSE.decode({}, Streams([("values", coding, data)], "t"), (1,), None, torch.float32)


def _lenet5() -> Checkpoint:
    torch.manual_seed(0)
    spec = ModelSpec("lenet5", (1, 28, 28), 10)
    return Checkpoint(spec.build().eval(), spec, "mnist5k")


def test_round_vectors_makes_biases_one_byte_each_and_the_file_smaller(tmp_path):
    ck = _lenet5()
    with torch.no_grad():
        for p in ck.model.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.3)
    x = torch.randn(16, 1, 28, 28)
    before, out = packed_report(ck), ck.model(x)
    round_vectors(ck, "fp16")
    after = packed_report(ck)
    n_bias = sum(p.numel() for p in ck.model.parameters() if p.dim() == 1)
    # fp32 biases (4 bytes each) became 1 byte each plus a 2-byte scale per layer
    assert before.parts_bits["dense"] - after.parts_bits["dense"] == 8 * (3 * n_bias - 2 * 5)
    assert (ck.model(x) - out).abs().max() < 0.05
    write_packed(ck, tmp_path / "m.xcpk")
    codings = {r.name: r.streams[0][1] for r in
               parse_container((tmp_path / "m.xcpk").read_bytes()).records if "bias" in r.name}
    assert set(codings.values()) == {"grid8"}
    back = load_packed(tmp_path / "m.xcpk")
    assert torch.equal(back.model(x), ck.model(x))
    f = read_xcpk(str(tmp_path / "m.xcpk"))  # the standalone reader agrees bit for bit
    for name, t in ck.model.state_dict().items():
        assert np.array_equal(f.tensors[name], t.numpy()), name


def test_round_vectors_keeps_fp32_codebooks_untouched():
    ck = _lenet5()
    sd = {k: v.clone() for k, v in ck.model.state_dict().items()}
    round_vectors(ck, "fp32")
    assert all(torch.equal(sd[k], v) for k, v in ck.model.state_dict().items())


def test_a_version_2_file_still_loads_and_predicts():
    # the demo's packed file as the previous writer made it (format version 2, 2,441 bytes)
    raw = V2_DEMO.read_bytes()
    assert raw[4] == 2
    ck = load_packed(V2_DEMO)
    f = read_xcpk(str(V2_DEMO))
    for name, t in ck.model.state_dict().items():
        assert np.array_equal(f.tensors[name], t.numpy()), name
    # its report said 97.30% on the mnist5k test split
    assert accuracy(ck.model, load_dataset("mnist5k").test) == pytest.approx(97.3, abs=0.01)
    # written again, it is a version 3 file, smaller (the new header dictionary)
    assert packed_report(ck).file_bytes < len(raw) - 40
