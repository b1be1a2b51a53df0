"""The packed model file: identical outputs after reload for every kind of model, size close
to the theoretical bit count, clear errors on damaged or foreign files."""

import numpy as np
import pytest
import torch

from xaicompress.checkpoint import Checkpoint, ModelSpec, apply_widths, save_checkpoint
from xaicompress.errors import XaiCompressError
from xaicompress.export.packed import (
    load_any,
    load_packed,
    packed_bytes,
    packed_report,
    write_packed,
)
from xaicompress.metrics import packed_size
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
        out.state.get(name).mask = w > w.flatten().kthvalue(int(frac * w.numel())).values
    out.state.apply(out.model)
    return out


def _quantize(ckpt: Checkpoint, bits: int = 4) -> Checkpoint:
    out = ckpt.copy()
    qmax = 2 ** (bits - 1) - 1
    for i, (name, m) in enumerate(prunable_layers(out.model).items()):
        lc = out.state.get(name)
        lc.bits = bits + i % 3  # mixed precision: 4, 5, 6 bits
        w = m.weight.detach()
        lc.scale = (w.reshape(w.shape[0], -1).abs().amax(1) / (2 ** (lc.bits - 1) - 1)).clamp(
            min=1e-8)
        assert qmax > 0
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


@pytest.mark.parametrize("model", ["lenet5", "resnet20"])
def test_reload_gives_identical_outputs_for_every_kind(model, tmp_path):
    for kind, ck in _kinds(model).items():
        path = tmp_path / f"{kind}.xcpk"
        write_packed(ck, path)
        back = load_packed(path)
        _same_outputs(ck, back)
        assert back.data == "mnist5k" and back.history == ck.history
        for name, lc in ck.state.layers.items():
            got = back.state.layers[name]
            for f in ("mask", "codebook", "scale"):
                ref = getattr(lc, f)
                assert (ref is None) == (getattr(got, f) is None), (kind, name, f)
                if ref is not None:
                    assert torch.equal(ref.float(), getattr(got, f).float()), (kind, name, f)
            assert lc.bits == got.bits
        # the file is exactly what the size metric counts
        assert path.stat().st_size == packed_size(ck) == len(packed_bytes(ck))


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
        assert rep.file_bytes == rep.header_bytes + rep.payload_bytes
    assert shared.file_overhead < 0.04  # header included (~0.4 kB on ~16 kB)
    big = packed_report(_share(_ckpt("lenet300"), 16))
    assert big.file_overhead < 0.02


def test_fp32_codebook_costs_32_bits_per_entry():
    base = _ckpt("lenet5")
    sh = _share(base, 4, "fp32")
    rep = packed_report(sh)
    exact16 = all(torch.equal(lc.codebook.half().float(), lc.codebook)
                  for lc in sh.state.layers.values())
    assert rep.parts_bits["codebooks"] == 5 * 4 * (16 if exact16 else 32)


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
    for cut in (3, 9, 40, len(raw) // 2, len(raw) - 1):
        packed_file.write_bytes(raw[:cut])
        _expect_error(packed_file, "packed")


def test_trailing_and_flipped_bytes(packed_file):
    raw = packed_file.read_bytes()
    packed_file.write_bytes(raw + b"\x00\x01")
    _expect_error(packed_file, "unexpected bytes")
    bad = bytearray(raw)
    bad[12] ^= 0xFF  # inside the zlib header
    packed_file.write_bytes(bytes(bad))
    _expect_error(packed_file, "corrupt packed file header")


def test_foreign_and_missing_files(tmp_path):
    pickled = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pickled)
    _expect_error(pickled, "not an xaicompress packed model file")
    noise = tmp_path / "noise.bin"
    noise.write_bytes(np.random.default_rng(0).bytes(500))
    _expect_error(noise, "not an xaicompress packed model file")
    _expect_error(tmp_path / "absent.xcpk", "does not exist")


def test_newer_version_and_wrong_model(packed_file):
    import json
    import zlib

    raw = bytearray(packed_file.read_bytes())
    raw[4] = 99
    packed_file.write_bytes(bytes(raw))
    _expect_error(packed_file, "version 99")
    raw[4] = 1
    hlen = int.from_bytes(raw[5:9], "little")
    header = json.loads(zlib.decompress(bytes(raw[9:9 + hlen])))
    header["model"]["name"] = "lenet300"  # tensors no longer fit the architecture
    new = zlib.compress(json.dumps(header).encode())
    packed_file.write_bytes(bytes(raw[:5]) + len(new).to_bytes(4, "little") + new
                            + bytes(raw[9 + hlen:]))
    _expect_error(packed_file, "does not have|truncated|corrupt")
