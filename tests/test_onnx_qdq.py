"""Integer ONNX: BatchNorm folded, the quantized model's integers as int8 weights, calibrated
uint8 activations, and onnxruntime really running integer kernels (its optimized graph)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from xaicompress.checkpoint import Checkpoint, ModelSpec
from xaicompress.data import dataset_tensors, load_dataset, subset
from xaicompress.encoding import IntGrid
from xaicompress.encoding.intgrid import qmax
from xaicompress.errors import XaiCompressError
from xaicompress.export.calibration import _mse_range, activation_ranges
from xaicompress.export.onnx import onnx_predict
from xaicompress.export.onnx_graph import float_onnx
from xaicompress.export.onnx_qdq import (
    INTEGER_OPS,
    export_qdq,
    integer_op_counts,
    ort_predict,
    qdq_model,
)
from xaicompress.train import predict, seed_everything, train


@pytest.fixture(scope="module")
def bundle():
    b = load_dataset("mnist5k", seed=0)
    b.train = subset(b.train, 1000, seed=0)
    return b


@pytest.fixture(scope="module")
def lenet5(bundle):
    seed_everything(0)
    spec = ModelSpec("lenet5", tuple(bundle.input_shape), bundle.num_classes)
    return Checkpoint(train(spec.build(), bundle.train, epochs=2, lr=3e-3, seed=0), spec,
                      "mnist5k")


@pytest.fixture(scope="module")
def resnet(bundle):
    seed_everything(0)
    spec = ModelSpec("resnet20", tuple(bundle.input_shape), bundle.num_classes,
                     {"width": 0.5})
    model = train(spec.build(), subset(bundle.train, 200, seed=0), epochs=1, lr=3e-3, seed=0)
    return Checkpoint(model, spec, "mnist5k")


@pytest.fixture(scope="module")
def calibration(bundle):
    return dataset_tensors(subset(bundle.train, 128, seed=3))[0]


def _int8_grid(ckpt: Checkpoint, layers=None) -> Checkpoint:
    """Every (or the named: {name: bits}) Conv/Linear on a max-abs grid, without the
    quantizer's search (fast)."""
    out = ckpt.copy()
    for name, m in out.model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and (layers is None
                                                                  or name in layers):
            bits = 8 if layers is None else layers[name]
            w = m.weight.detach()
            scale = w.reshape(w.shape[0], -1).abs().amax(1).clamp(min=1e-8) / qmax(bits)
            out.state.get(name).weights = IntGrid(bits, scale)
    out.state.apply(out.model)
    return out


def _integers(inits: dict, name: str) -> np.ndarray:
    """A layer's integer weights as the file stores them: int8 with zero point 0, or (wider
    than +-64, which x86 U8S8 kernels could saturate) uint8 with zero point 128."""
    got, zero = inits[f"{name}.weight_quantized"], inits[f"{name}.weight_zero_point"]
    if got.dtype == np.uint8:
        assert (zero == 128).all(), zero
        return got.astype(np.int16) - 128
    assert got.dtype == np.int8 and not zero.any()
    return got.astype(np.int16)


def test_mse_range_clips_a_heavy_tail():
    rng = np.random.default_rng(0)
    v = rng.laplace(size=200_000)
    hist = np.histogram(v, bins=2048, range=(v.min(), v.max()))[0]
    lo, hi = _mse_range(hist, float(v.min()), float(v.max()))
    # 8-bit optimum of a Laplace(b=1) is ~9.9 b (Banner et al. 2019); its max here ~12
    assert 7 < hi < 0.95 * v.max() and 0.95 * v.min() < lo < -7


def _ops(path):
    ops = integer_op_counts(path)
    return ops, sum(n for op, n in ops.items() if op in INTEGER_OPS)


def test_lenet5_runs_on_integer_kernels_with_the_models_integers(lenet5, bundle, calibration,
                                                                tmp_path):
    q = _int8_grid(lenet5, {"conv1": 6, "conv2": 5, "fc1": 4, "fc2": 5, "fc3": 8})
    path = export_qdq(q, tmp_path / "q.onnx", calibration)
    ops, _ = _ops(path)
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 3, ops
    assert ops["Conv"] == ops["Gemm"] == ops["MatMul"] == 0, ops
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    for name, lc in q.state.items():
        w = dict(q.model.named_parameters())[f"{name}.weight"].detach()
        got = _integers(inits, name)
        # int8 up to 7 bits; the 8-bit layer's integers reach 127: uint8 (no saturation)
        assert inits[f"{name}.weight_quantized"].dtype == (np.uint8 if lc.grid.bits == 8
                                                           else np.int8), name
        assert np.array_equal(got, lc.grid.quantize(w).numpy()), name  # exactly the library's
        assert int(np.abs(got).max()) <= lc.grid.qmax
    test = subset(bundle.test, 500, seed=1)
    x, y = dataset_tensors(test)
    ours = predict(q.model, test)[0].argmax(1)
    theirs = ort_predict(path, x).argmax(1)
    acc_pt, acc_ort = (float((p == y).float().mean() * 100) for p in (ours, theirs))
    assert acc_pt > 70, acc_pt
    assert abs(acc_pt - acc_ort) <= 1.0, (acc_pt, acc_ort)
    assert float((ours == theirs).float().mean()) >= 0.97


def test_resnet_batchnorm_folded_and_every_layer_integer(resnet, bundle, calibration, tmp_path):
    proto, folds = float_onnx(resnet)
    types = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" not in types and len(folds) == types.count("Conv") == 21
    x = calibration[:32]
    path = tmp_path / "float.onnx"
    path.write_bytes(proto.SerializeToString())
    assert torch.allclose(onnx_predict(path, x), resnet.model.eval()(x).detach(), atol=1e-4)

    q = _int8_grid(resnet)
    qpath = export_qdq(q, tmp_path / "q.onnx", calibration, method="mse")
    ops, n_int = _ops(qpath)
    assert ops["QLinearConv"] == 21 and ops["QLinearAdd"] == 9 and ops["QGemm"] == 1, ops
    assert ops["Conv"] == 0 and ops["Add"] == 0
    # BatchNorm multiplied into the scales; |integers| are the library's (sign flips where
    # gamma < 0)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(qpath)).graph.initializer}
    params = dict(q.model.named_parameters())
    for name, lc in q.state.items():
        want = lc.grid.quantize(params[f"{name}.weight"].detach()).numpy()
        assert np.array_equal(np.abs(_integers(inits, name)), np.abs(want)), name
    got = ort_predict(qpath, x)
    assert float((got.argmax(1) == q.model(x).argmax(1)).float().mean()) >= 0.9


def test_full_range_8bit_weights_do_not_saturate(lenet5, calibration, tmp_path):
    # The worst case of x86 U8S8 kernels without VNNI (AVX2): every input at the top of its
    # uint8 range times weights at +127 (pairs of products overflow int16). conv1's weights
    # all positive and equal, the input the brightest image: the integer file must give
    # the float model's logits (before the uint8 storage, on an AVX2 CPU, conv1's outputs
    # came out at about half).
    ck = lenet5.copy()
    with torch.no_grad():
        ck.model.conv1.weight.fill_(0.05)
    q = _int8_grid(ck)
    bright = torch.full((1, *calibration.shape[1:]), float(calibration.max()))
    path = export_qdq(q, tmp_path / "q.onnx", torch.cat([calibration, bright]))
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    assert (_integers(inits, "conv1") == 127).all()
    want = q.model.eval()(bright).detach()
    got = ort_predict(path, bright)
    assert torch.allclose(got, want, rtol=0.05, atol=0.05 * float(want.abs().max())), (got, want)


def test_layers_without_an_integer_grid_stay_float(lenet5, calibration):
    q = _int8_grid(lenet5, {"conv2": 8, "fc1": 8, "fc2": 8})
    proto = qdq_model(q, calibration)
    names = {i.name for i in proto.graph.initializer}
    assert "conv2.weight_quantized" in names and "fc1.weight_quantized" in names
    assert "conv1.weight" in names and "conv1.weight_quantized" not in names
    assert "fc3.weight" in names


def test_no_integer_layer_is_a_clear_error(lenet5, calibration, tmp_path):
    with pytest.raises(XaiCompressError, match="no integer-quantized layer"):
        export_qdq(lenet5, tmp_path / "x.onnx", calibration)
    assert not (tmp_path / "x.onnx").exists()


def test_calibration_methods(lenet5, calibration):
    proto, _ = float_onnx(lenet5)
    x = calibration.clone()
    x[0, 0, 0, 0] = 50.0  # one outlier pixel
    mm = activation_ranges(proto, x.numpy(), method="minmax")
    assert mm["input"] == (pytest.approx(float(x.min())), pytest.approx(50.0))
    pc = activation_ranges(proto, x.numpy(), method="percentile", percentile=99.9)
    mse = activation_ranges(proto, x.numpy(), method="mse")
    assert set(pc) == set(mm) == set(mse)
    assert pc["input"][1] < 10  # the outlier stretches min/max; the percentile clips it
    assert any(mse[n] != mm[n] for n in mm)
    for n, (lo, hi) in mm.items():
        assert lo <= 0 <= hi
        assert mse[n][0] >= lo - 1e-6 and mse[n][1] <= hi + 1e-6
        assert pc[n][0] >= lo - 1e-6 and pc[n][1] <= hi + 1e-6
    with pytest.raises(XaiCompressError, match="--calibration-method"):
        activation_ranges(proto, x.numpy(), method="kl")


def test_cli_export_int8(lenet5, tmp_path, run_cli):
    from xaicompress.checkpoint import save_checkpoint

    src = tmp_path / "q.safetensors"
    save_checkpoint(_int8_grid(lenet5), src)
    out = tmp_path / "m.int8.onnx"
    code, stdout, err = run_cli("export", src, "--format", "onnx-int8", "--out", out,
                                "--calibration", "64", "--calibration-method", "percentile")
    assert code == 0, err
    assert integer_op_counts(out)["QLinearConv"] == 2
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert '"method": "percentile"' in props["xaicompress.calibration"]
    assert '"samples": 64' in props["xaicompress.calibration"]
    code, stdout, err = run_cli("evaluate", src, "--json")
    assert code == 0, err
    m = json.loads(stdout)
    assert m["latency_ms"] > 0 and m["onnx_latency_ms"] > 0 and m["onnx_int8_latency_ms"] > 0
    code, _, err = run_cli("export", src, "--format", "onnx-int8", "--out", tmp_path / "x.onnx",
                           "--calibration-method", "kl")
    assert code == 2 and "--calibration-method" in err
    code, _, err = run_cli("export", src, "--format", "onnx", "--out", tmp_path / "x.onnx",
                           "--calibration", "8")
    assert code == 2 and "--calibration: applies to --format onnx-int8 only" in err
    assert not (tmp_path / "x.onnx").exists()


def test_pipeline_writes_the_integer_file(lenet5, bundle, tmp_path):
    from xaicompress.pipeline.config import validate_config
    from xaicompress.pipeline.outputs import export_final

    cfg = validate_config({"model": "lenet5", "data": "mnist5k", "stages": [],
                           "export": {"calibration": 32, "calibration_method": "mse"}})
    files = export_final(_int8_grid(lenet5), tmp_path, cfg, bundle)
    assert files["onnx_int8"].name == "model.int8.onnx"
    assert integer_op_counts(files["onnx_int8"])["QGemm"] == 3
    (tmp_path / "f").mkdir()
    assert "onnx_int8" not in export_final(lenet5, tmp_path / "f", cfg, bundle)


def test_negative_and_zero_batchnorm_factors(resnet, calibration):
    ck = resnet.copy()
    with torch.no_grad():
        bn = ck.model.bn1
        bn.weight[0], bn.weight[1] = -bn.weight[0], 0.0
    q = _int8_grid(ck)
    proto = qdq_model(q, calibration[:16])  # raises if an int8 weight is not the library's
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    want = q.state.get("conv1").grid.quantize(q.model.conv1.weight.detach()).numpy()
    got = _integers(inits, "conv1")
    assert np.array_equal(got[0], -want[0]) and not got[1].any()
    assert np.array_equal(got[2:], want[2:])
