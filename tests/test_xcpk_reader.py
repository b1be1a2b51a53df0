"""The standalone reader (numpy + standard library) decodes every encoding to exactly the
library's weights, bit for bit, and runs without torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from xaicompress.checkpoint import Checkpoint, ModelSpec
from xaicompress.encoding import ActQuant, Codebook, IntGrid, Mask, bitpack, codebook, intgrid
from xaicompress.encoding.activation import MAX_BITS as ACT_MAX
from xaicompress.encoding.activation import MIN_BITS as ACT_MIN
from xaicompress.export import xcpk_reader
from xaicompress.export.packed import load_packed, write_packed
from xaicompress.export.xcpk_reader import read_xcpk
from xaicompress.relevance import prunable_layers

SHAPE = (1, 28, 28)


def _base(name: str = "lenet5") -> Checkpoint:
    torch.manual_seed(0)
    spec = ModelSpec(name, SHAPE, 10)
    return Checkpoint(spec.build().eval(), spec, "mnist5k")


def _masks(ck: Checkpoint, sparsity: float) -> None:
    for name, m in prunable_layers(ck.model).items():
        w = m.weight.detach().abs().flatten()
        ck.state.get(name).mask = Mask(m.weight.detach().abs() > w.kthvalue(
            max(1, int(sparsity * w.numel()))).values)


def _codebook(ck: Checkpoint, k: int, fp16: bool) -> None:
    for name, m in prunable_layers(ck.model).items():
        w = m.weight.detach()
        values = torch.linspace(float(w.min()), float(w.max()), k)
        values = values.half().float() if fp16 else values + 1e-7  # off the fp16 grid
        idx = (w[..., None] - values).abs().argmin(-1)
        ck.state.get(name).weights = Codebook(values, idx)


def _intgrid(ck: Checkpoint, bits: int) -> None:
    for name, m in prunable_layers(ck.model).items():
        w = m.weight.detach()
        scale = w.reshape(w.shape[0], -1).abs().amax(1) / intgrid.qmax(bits)
        ck.state.get(name).weights = IntGrid(bits, scale.clamp(min=1e-8))


def _variant(kind: str) -> Checkpoint:
    ck = _base()
    if kind.endswith("+bitmap"):
        _masks(ck, 0.5)
    elif kind.endswith("+relidx"):
        _masks(ck, 0.97)
    base = kind.split("+")[0]
    if base.startswith("codebook"):
        _codebook(ck, 8 if "fp16" in base else 5, "fp16" in base)
    elif base.startswith("int"):
        _intgrid(ck, int(base[3:]))
    elif base == "act":
        _intgrid(ck, 8)
        for i, name in enumerate(prunable_layers(ck.model)):
            ck.state.get(name).activation = ActQuant(4 + i % 5, 0.01 * (i + 1))
    ck.state.apply(ck.model)
    ck.state.install_hooks(ck.model)
    return ck


KINDS = ["dense", "dense+bitmap", "dense+relidx", "codebook_fp16", "codebook_fp16+bitmap",
         "codebook_fp32", "codebook_fp32+relidx", "act",
         *[f"int{b}{m}" for b in range(2, 9) for m in ("", "+bitmap")], "int3+relidx"]


def _bits(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1).view(np.uint8) if a.dtype != bool else a


def _check_against_library(path: Path, ck: Checkpoint | None = None) -> None:
    back = load_packed(path)
    f = read_xcpk(str(path))
    sd = back.model.state_dict()
    assert set(f.tensors) == set(sd)
    for name, t in sd.items():
        ours = f.tensors[name]
        # signed integer buffers come out as int64, whatever narrower coding stored them
        want = t.numpy().astype(np.int64) if t.dtype in (torch.int8, torch.int16, torch.int32) \
            else t.numpy()
        assert ours.dtype == want.dtype and ours.shape == tuple(t.shape), name
        assert np.array_equal(_bits(ours), _bits(want)), name  # bit for bit
        if ck is not None:  # and value for value the in-memory model
            assert np.array_equal(ours, ck.model.state_dict()[name].numpy()), name
    for layer, lc in back.state.items():
        enc = f.encodings.get(f"{layer}.weight", {})
        if lc.mask is not None:
            assert np.array_equal(enc["mask"], lc.mask.keep.numpy())
        if lc.codebook is not None:
            assert enc["encoding"] == "codebook"
            assert np.array_equal(enc["codebook"], lc.codebook.values.numpy())
            assert np.array_equal(enc["indices"], lc.codebook.indices.numpy())
        if lc.grid is not None:
            assert enc["encoding"] == "intgrid" and enc["bits"] == lc.grid.bits
            assert np.array_equal(enc["scales"], lc.grid.scale.numpy())
            w = sd[f"{layer}.weight"]
            assert np.array_equal(enc["q"], lc.grid.quantize(w).numpy())
    assert f.activations == {n: a.header() for n, a in back.state.activations().items()}


@pytest.mark.parametrize("kind", KINDS)
def test_reader_decodes_every_encoding_exactly(kind, tmp_path):
    ck = _variant(kind)
    path = tmp_path / f"{kind}.xcpk"
    write_packed(ck, path)
    codings = {s["coding"] for r in read_header(path)["tensors"].values()
               for s in r["streams"]}
    if "bitmap" in kind or "relidx" in kind:
        assert kind.split("+")[1] in codings  # the layout the case is about
    _check_against_library(path, ck)
    f = read_xcpk(str(path))
    if kind.startswith("int"):
        assert {e["bits"] for e in f.encodings.values()} == {int(kind[3])}


def read_header(path: Path) -> dict:
    return xcpk_reader.parse_container(path.read_bytes()).header


def test_resnet_with_batchnorm_buffers(tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec("resnet20", SHAPE, 10, {"width": 0.25})
    model = spec.build().train()
    with torch.no_grad():
        model(torch.randn(8, *SHAPE))
    ck = Checkpoint(model.eval(), spec, "mnist5k")
    _intgrid(ck, 4)
    ck.state.apply(ck.model)
    write_packed(ck, tmp_path / "r.xcpk")
    _check_against_library(tmp_path / "r.xcpk", ck)
    f = read_xcpk(str(tmp_path / "r.xcpk"))
    assert f.tensors["bn1.num_batches_tracked"].dtype == np.int64
    assert f.model["kwargs"] == {"width": 0.25}


def test_limits_agree_with_the_library():
    """The reader is one module on purpose (copy it anywhere); its limits are the library's."""
    assert xcpk_reader.MAX_K == codebook.MAX_K
    assert xcpk_reader.INT_BITS == (intgrid.MIN_BITS, intgrid.MAX_BITS)
    assert xcpk_reader.ACT_BITS == (ACT_MIN, ACT_MAX)
    assert bitpack.MAX_BITS == 16


def test_runs_without_torch(tmp_path):
    """Copied alone next to a packed file, with torch unimportable, it decodes it."""
    ck = _variant("codebook_fp16+relidx")
    write_packed(ck, tmp_path / "m.xcpk")
    shutil.copy(xcpk_reader.__file__, tmp_path / "xcpk_reader.py")
    script = (
        "import sys\n"
        "sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "import json, hashlib, xcpk_reader\n"
        "f = xcpk_reader.read_xcpk('m.xcpk')\n"
        "print(json.dumps({k: hashlib.sha256(v.tobytes()).hexdigest()\n"
        "                  for k, v in f.tensors.items()}))\n")
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    digests = json.loads(res.stdout)
    import hashlib

    back = load_packed(tmp_path / "m.xcpk")
    assert digests == {k: hashlib.sha256(v.numpy().tobytes()).hexdigest()
                       for k, v in back.model.state_dict().items()}


def test_reader_refuses_what_the_library_refuses(tmp_path):
    ck = _variant("int4+bitmap")
    path = tmp_path / "m.xcpk"
    write_packed(ck, path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(xcpk_reader.XcpkError, match="checksum mismatch"):
        read_xcpk(str(path))


@pytest.mark.slow
def test_demo_pipeline_file(tmp_path):
    """The demo's pipeline (configs/lenet5-mnist.yaml: structured + unstructured pruning,
    relevance-weighted sharing), with short training: the reader gives its exact weights."""
    import yaml

    from xaicompress.pipeline.config import validate_config
    from xaicompress.pipeline.run import run_pipeline

    data = yaml.safe_load((Path(__file__).parents[1] / "configs" / "lenet5-mnist.yaml")
                          .read_text())
    data["train"]["epochs"] = 0.3
    for st in data["stages"]:
        st.update(finetune_epochs=0.1, samples=64)
    data["stages"][0]["steps"] = 1
    data["export"]["onnx"] = False
    data["report"] = {"fidelity_samples": 8, "heatmaps": 0, "latency_repeats": 1}
    res = run_pipeline(validate_config(data), tmp_path / "run", plots=False)
    path = res.files["packed"]
    _check_against_library(path, res.final)
    f = read_xcpk(str(path))
    assert {e["encoding"] for e in f.encodings.values()} == {"codebook"}
    assert any("mask" in e for e in f.encodings.values())


def test_format_spec_lists_the_header_dictionary_byte_for_byte():
    text = (Path(__file__).parents[1] / "docs" / "format.md").read_text()
    block = text.split("**Header dictionary.**")[1].split("```")[1]
    assert "".join(block.split("\n")).encode("ascii") == xcpk_reader.HEADER_DICT


def test_a_header_without_the_dictionary_is_refused(tmp_path):
    import zlib

    from tests.badinput.makers_files import write_xcpk, xcpk_parts

    ck = _variant("dense")
    write_packed(ck, tmp_path / "m.xcpk")
    header, payload = xcpk_parts(tmp_path / "m.xcpk")
    plain = zlib.compress(json.dumps(header).encode())
    write_xcpk(tmp_path / "m.xcpk", None, payload, compressed=plain)
    with pytest.raises(xcpk_reader.XcpkError, match="version 3 dictionary"):
        read_xcpk(str(tmp_path / "m.xcpk"))
