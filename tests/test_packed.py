"""The packed model file: identical outputs after reload for every kind of model, size close
to the theoretical bit count, clear errors on damaged or foreign files."""

import time

import numpy as np
import pytest
import torch

from tests.badinput.makers_files import write_xcpk, xcpk_parts, zlib_bomb
from xaicompress.checkpoint import Checkpoint, ModelSpec, apply_widths, save_checkpoint
from xaicompress.encoding import IntGrid, Mask, qmax
from xaicompress.errors import XaiCompressError
from xaicompress.export.packed import (
    load_any,
    load_packed,
    packed_bytes,
    packed_report,
    write_packed,
)
from xaicompress.export.xcpk_reader import MAX_HEADER_JSON, TRAILER, parse_container
from xaicompress.quant.codebook import share_weights
from xaicompress.relevance import prunable_layers

SHAPE = (1, 28, 28)


def _ckpt(name: str, seed: int = 0) -> Checkpoint:
    torch.manual_seed(seed)
    # A quarter-width resnet20 keeps the test fast and checks that constructor kwargs travel.
    spec = ModelSpec(name, SHAPE, 10, {"width": 0.25} if name.startswith("resnet") else {})
    model = spec.build()
    # Non-trivial BatchNorm statistics, so buffers must travel too.
    model.train()
    with torch.no_grad():
        model(torch.randn(8, *SHAPE))
    model.eval()
    return Checkpoint(model, spec, "mnist5k", history=[{"stage": "test"}])


def _mask(ckpt: Checkpoint, frac: float = 0.6) -> Checkpoint:
    out = ckpt.copy()
    for name, m in prunable_layers(out.model).items():
        w = m.weight.detach().abs()
        out.state.get(name).mask = Mask(w > w.flatten().kthvalue(int(frac * w.numel())).values)
    out.state.apply(out.model)
    return out


def _quantize(ckpt: Checkpoint, bits: int = 4) -> Checkpoint:
    out = ckpt.copy()
    for i, (name, m) in enumerate(prunable_layers(out.model).items()):
        b = bits + i % 3  # mixed precision: 4, 5, 6 bits
        w = m.weight.detach()
        scale = (w.reshape(w.shape[0], -1).abs().amax(1) / qmax(b)).clamp(min=1e-8)
        out.state.get(name).weights = IntGrid(b, scale)
    out.state.apply(out.model)
    return out


def _share(ckpt: Checkpoint, k: int = 8, dtype: str = "fp16") -> Checkpoint:
    return share_weights(ckpt, "none", None, clusters=k, codebook_dtype=dtype)


def _kinds(name: str) -> dict[str, Checkpoint]:
    base = _ckpt(name)
    return {"plain": base, "masked": _mask(base), "shared": _share(base),
            "shared_fp32_k5": _share(base, 5, "fp32"), "masked_shared": _share(_mask(base), 4),
            "quantized": _quantize(base), "masked_quantized": _quantize(_mask(base))}


def _same_outputs(a: Checkpoint, b: Checkpoint) -> None:
    x = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(1))
    a.model.eval()
    b.model.eval()
    with torch.no_grad():
        assert torch.equal(a.model(x), b.model(x))
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k


def _same_state(ref: Checkpoint, got: Checkpoint) -> None:
    assert set(got.state.layers) == {n for n, lc in ref.state.layers.items() if not lc.is_empty()}
    for name, lc in ref.state.items():
        back = got.state.layers[name]
        assert (lc.mask is None) == (back.mask is None)
        if lc.mask is not None:
            assert torch.equal(lc.mask.keep, back.mask.keep)
        assert type(lc.weights) is type(back.weights)
        if lc.codebook is not None:
            assert torch.equal(lc.codebook.values, back.codebook.values)
        if lc.grid is not None:
            assert lc.grid.bits == back.grid.bits
            assert torch.equal(lc.grid.scale, back.grid.scale)


@pytest.mark.parametrize("model", ["lenet5", pytest.param("resnet20", marks=pytest.mark.slow)])
def test_reload_gives_identical_outputs_for_every_kind(model, tmp_path):
    for kind, ck in _kinds(model).items():
        path = tmp_path / f"{kind}.xcpk"
        write_packed(ck, path)
        back = load_packed(path)
        _same_outputs(ck, back)
        _same_state(ck, back)
        # the model travels, the run's bookkeeping does not
        assert back.data == "mnist5k" and back.history == [] and back.metrics == {}
        # the file is exactly what the size metric counts
        assert path.stat().st_size == packed_report(ck).file_bytes == len(packed_bytes(ck))


def test_history_and_metrics_do_not_change_the_file():
    ck = _share(_ckpt("lenet5"), 4)
    noisy = ck.copy()
    noisy.history = [{"stage": "x", "log": "y" * 10_000}]
    noisy.metrics = {"accuracy": 97.5}
    assert packed_bytes(noisy) == packed_bytes(ck)


def test_structurally_pruned_architecture_is_rebuilt(tmp_path):
    ck = _ckpt("lenet5")
    apply_widths(ck.model, {"conv2": {"in": 6, "out": 10, "groups": 1},
                            "fc1": {"in": 250, "out": 50}, "fc2": {"in": 50, "out": 84}}, "t")
    ck = _share(ck, 4)
    write_packed(ck, tmp_path / "s.xcpk")
    back = load_packed(tmp_path / "s.xcpk")
    assert back.model.conv2.out_channels == 10 and back.model.fc1.out_features == 50
    _same_outputs(ck, back)


def test_sizes_are_close_to_theoretical():
    base = _ckpt("lenet5")
    n_weights = sum(m.weight.numel() for m in prunable_layers(base.model).values())
    n_other = sum(p.numel() for p in base.model.parameters()) - n_weights

    plain = packed_report(base)
    assert plain.theoretical_bits == 32 * (n_weights + n_other)

    shared = packed_report(_share(base, 4))
    cb_bits = 5 * 4 * 16  # five layers, four fp16 centroids each
    assert shared.theoretical_bits == 2 * n_weights + 32 * n_other + cb_bits
    for rep in (plain, shared, packed_report(_mask(base)), packed_report(_quantize(base)),
                packed_report(_share(_mask(base), 16))):
        assert rep.payload_overhead < 0.02
        assert rep.file_bytes == rep.header_bytes + rep.payload_bytes + TRAILER.size
    assert shared.file_overhead < 0.04  # header included (~0.4 kB on ~16 kB)
    big = packed_report(_share(_ckpt("lenet300"), 16))
    assert big.file_overhead < 0.02


def test_fp32_codebook_costs_32_bits_per_entry():
    base = _ckpt("lenet5")
    sh = _share(base, 4, "fp32")
    rep = packed_report(sh)
    exact16 = all(torch.equal(lc.codebook.values.half().float(), lc.codebook.values)
                  for lc in sh.state.layers.values())
    assert rep.parts_bits["codebook"] == 5 * 4 * (16 if exact16 else 32)


def test_header_is_readable_json():
    ck = _quantize(_mask(_ckpt("lenet5")))
    header, payload = xcpk_parts_of(ck)
    assert set(header) == {"model", "widths", "data", "tensors", "activations"}
    rec = header["tensors"]["fc1.weight"]
    assert rec["encoding"] == "intgrid" and rec["bits"] == 6 and rec["masked"] is True
    assert rec["shape"] == [120, 400]
    assert [s["role"] for s in rec["streams"]] == ["positions", "scales", "values"]
    # 6-bit integers, range-coded where that is smaller than bit-packing them
    assert rec["streams"][2]["coding"] in ("uint6", "range")
    assert rec["streams"][2]["bytes"] <= (int(torch.tensor(rec["shape"]).prod()) * 6 + 7) // 8
    assert header["tensors"]["fc1.bias"] == {"shape": [120], "encoding": "dense", "streams": [
        {"role": "values", "coding": "float32", "bytes": 480}]}
    assert sum(s["bytes"] for r in header["tensors"].values() for s in r["streams"]) == \
        len(payload)


def xcpk_parts_of(ck: Checkpoint):
    raw = packed_bytes(ck)
    c = parse_container(raw, "t")
    return c.header, raw[c.header_bytes:-TRAILER.size]


def test_load_any_reads_both_formats(tmp_path):
    ck = _share(_ckpt("lenet5"), 4)
    save_checkpoint(ck, tmp_path / "a.safetensors")
    write_packed(ck, tmp_path / "a.xcpk")
    _same_outputs(load_any(tmp_path / "a.safetensors"), load_any(tmp_path / "a.xcpk"))


@pytest.fixture
def packed_file(tmp_path):
    path = tmp_path / "m.xcpk"
    write_packed(_share(_mask(_ckpt("lenet5")), 4), path)
    return path


def _expect_error(path, match):
    with pytest.raises(XaiCompressError, match=match) as info:
        load_packed(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_truncated_files(packed_file):
    raw = packed_file.read_bytes()
    for cut in (3, 9, 12, 40, len(raw) // 2, len(raw) - 4, len(raw) - 1):
        packed_file.write_bytes(raw[:cut])
        _expect_error(packed_file, "not an xaicompress packed|truncated|checksum mismatch")


def test_every_flipped_bit_is_an_error(packed_file):
    raw = packed_file.read_bytes()
    rng = np.random.default_rng(0)
    # every bit of the prefix and the first header bytes, then a sample over the whole file
    bits = list(range(8 * 16)) + sorted(rng.choice(8 * len(raw), 300, replace=False).tolist())
    t0 = time.perf_counter()
    for bit in bits:
        bad = bytearray(raw)
        bad[bit // 8] ^= 1 << (bit % 8)
        packed_file.write_bytes(bytes(bad))
        _expect_error(packed_file, "checksum mismatch|version|not an xaicompress packed|"
                                   "does not fit")
    assert time.perf_counter() - t0 < 30  # each refusal is quick (~ms)


def test_trailing_bytes(packed_file):
    packed_file.write_bytes(packed_file.read_bytes() + b"\x00\x01")
    _expect_error(packed_file, "checksum mismatch")


def test_foreign_and_missing_files(tmp_path):
    pickled = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pickled)
    _expect_error(pickled, "not an xaicompress packed model file")
    noise = tmp_path / "noise.bin"
    noise.write_bytes(np.random.default_rng(0).bytes(500))
    _expect_error(noise, "not an xaicompress packed model file")
    _expect_error(tmp_path / "absent.xcpk", "does not exist")


def test_versions(packed_file):
    header, payload = xcpk_parts(packed_file)
    write_xcpk(packed_file, header, payload, version=99)
    _expect_error(packed_file, "version 99")
    write_xcpk(packed_file, header, payload, version=1)
    _expect_error(packed_file, "version 1 is no longer read.*safetensors")


def test_wrong_model_is_refused_before_allocating(packed_file):
    header, payload = xcpk_parts(packed_file)
    header["model"]["name"] = "lenet300"  # tensors no longer fit the architecture
    write_xcpk(packed_file, header, payload)
    _expect_error(packed_file, "do not match model 'lenet300'")
    header["model"]["name"] = "lenet5"
    header["model"]["kwargs"] = {"width": 1e9}
    write_xcpk(packed_file, header, payload)
    _expect_error(packed_file, "takes no argument 'width'")


def test_zlib_bomb_is_refused_quickly(tmp_path):
    # 3 GiB of zeros deflate to ~3 MB; the reader stops inflating at its header cap
    path = write_xcpk(tmp_path / "bomb.xcpk", None, b"", compressed=zlib_bomb(3 << 30))
    assert path.stat().st_size < 4 << 20
    t0 = time.perf_counter()
    _expect_error(path, f"more than {MAX_HEADER_JSON} bytes")
    assert time.perf_counter() - t0 < 1.0


def test_a_file_that_does_not_reproduce_the_model_is_not_written(tmp_path, monkeypatch):
    import xaicompress.export.packed as pk

    ck = _share(_ckpt("lenet5"), 4)
    other = ck.copy()
    with torch.no_grad():
        other.model.fc3.bias += 1
    real = pk.packed_bytes
    monkeypatch.setattr(pk, "packed_bytes", lambda c: real(other))
    with pytest.raises(XaiCompressError, match="m.xcpk: not written: reloaded, it gives other"):
        pk.write_packed(ck, tmp_path / "m.xcpk")
    assert list(tmp_path.iterdir()) == []
    bad = ck.copy()
    bad.state.layers["fc1"].codebook.values[0] = float("nan")
    with pytest.raises(XaiCompressError, match="not written: layer 'fc1': codebook contains"):
        write_packed(bad, tmp_path / "m.xcpk")
    assert list(tmp_path.iterdir()) == []
