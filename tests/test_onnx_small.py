"""Small ONNX: each encoded weight stored as its encoding (int4 / int8 + DequantizeLinear,
codebook + uint4 indices + Gather, sparse initializer), outputs still PyTorch's."""

from __future__ import annotations

import onnx
import pytest
import torch

from tests.test_xcpk_reader import _base, _codebook, _intgrid, _masks
from xaicompress.checkpoint import Checkpoint, ModelSpec
from xaicompress.errors import XaiCompressError
from xaicompress.export.onnx import onnx_predict
from xaicompress.export.onnx_graph import float_onnx
from xaicompress.export.onnx_small import export_small

T = onnx.TensorProto
#: kind -> (build, expected weight storage type, largest size vs the fp32 ONNX)
KINDS = {
    "int3": (lambda ck: _intgrid(ck, 3), T.INT4, 0.16),
    "int4+mask": (lambda ck: (_masks(ck, 0.9), _intgrid(ck, 4)), T.INT4, 0.16),
    "int6": (lambda ck: _intgrid(ck, 6), T.INT8, 0.28),
    "codebook8": (lambda ck: _codebook(ck, 8, True), T.UINT4, 0.16),
    "codebook8+mask": (lambda ck: (_masks(ck, 0.9), _codebook(ck, 8, True)), T.UINT4, 0.16),
    "codebook5_fp32": (lambda ck: _codebook(ck, 5, False), T.UINT4, 0.16),
}


def _inputs(shape):
    return torch.randn(64, *shape, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_encoding_is_stored_as_itself(kind, tmp_path):
    build, storage, max_ratio = KINDS[kind]
    ck = _base()
    build(ck)
    ck.state.apply(ck.model)
    path = export_small(ck, tmp_path / "s.onnx")
    x = _inputs((1, 28, 28))
    assert float((onnx_predict(path, x) - ck.model(x).detach()).abs().max()) <= 1e-5
    graph = onnx.load(str(path)).graph
    names = {i.name: i for i in graph.initializer}
    for layer in ck.state.layers:
        assert f"{layer}.weight" not in names  # no float copy left
        stored = names.get(f"{layer}.weight.q") or names[f"{layer}.weight.indices"]
        assert stored.data_type == storage
    fp32 = len(float_onnx(_base())[0].SerializeToString())
    assert path.stat().st_size <= max_ratio * fp32, (path.stat().st_size, fp32)


def test_masked_float_layers_are_sparse_initializers(tmp_path):
    ck = _base()
    _masks(ck, 0.9)
    ck.state.apply(ck.model)
    path = export_small(ck, tmp_path / "s.onnx")
    graph = onnx.load(str(path)).graph
    assert {s.values.name for s in graph.sparse_initializer} == {
        f"{n}.weight" for n in ck.state.layers}
    x = _inputs((1, 28, 28))
    assert float((onnx_predict(path, x) - ck.model(x).detach()).abs().max()) <= 1e-5
    assert path.stat().st_size < 0.45 * len(float_onnx(_base())[0].SerializeToString())


def test_batchnorm_folded_into_codebook_and_grid_layers(tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec("resnet20", (1, 28, 28), 10, {"width": 0.25})
    model = spec.build().train()
    with torch.no_grad():
        model(torch.randn(16, 1, 28, 28))
        for bn in [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)][:3]:
            bn.weight[0] = -1.5  # a negative factor flips the integers' sign
            bn.weight[1] = 0.0  # a zero factor makes the folded weights 0
    x = _inputs((1, 28, 28))
    for build in (lambda ck: _codebook(ck, 8, False), lambda ck: _intgrid(ck, 4)):
        ck = Checkpoint(model.eval(), spec, "mnist5k")
        build(ck)
        ck.state.apply(ck.model)
        path = export_small(ck, tmp_path / "r.onnx")
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        assert "BatchNormalization" not in ops
        ref = ck.model(x).detach()
        assert float((onnx_predict(path, x) - ref).abs().max()) <= 1e-4 * (1 + ref.abs().max())


def test_non_finite_model_is_not_written(tmp_path):
    ck = _base()
    with torch.no_grad():
        ck.model.fc1.weight[0, 0] = float("nan")
    with pytest.raises(XaiCompressError, match="s.onnx"):
        export_small(ck, tmp_path / "s.onnx")
    assert not (tmp_path / "s.onnx").exists()


def test_cli_export_small(tmp_path, run_cli):
    from xaicompress.checkpoint import save_checkpoint

    ck = _base()
    _codebook(ck, 8, True)
    ck.state.apply(ck.model)
    src = tmp_path / "s.safetensors"
    save_checkpoint(ck, src)
    out = tmp_path / "s.onnx"
    code, stdout, err = run_cli("export", src, "--format", "onnx-small", "--out", out)
    assert code == 0, err
    names = {i.name for i in onnx.load(str(out)).graph.initializer}
    assert "fc1.weight.indices" in names and "fc1.weight" not in names


def test_small_onnx_carries_preprocessing_and_its_stored_encodings(tmp_path):
    ck = _base()
    _codebook(ck, 8, True)
    ck.state.apply(ck.model)
    props = {p.key: p.value for p in onnx.load(export_small(ck, tmp_path / "s.onnx"))
             .metadata_props}
    # the model's metadata (export/metadata.py: architecture, and preprocessing when the
    # checkpoint records one) survives the small file's own property
    assert "xaicompress.stored" in props and props["xaicompress.model"] == ck.spec.name
