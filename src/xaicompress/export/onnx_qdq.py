"""Integer ONNX that onnxruntime runs on integer kernels (QLinearConv, QGemm, QLinearAdd...).

The graph is the float graph of export/onnx_graph.py (effective weights, BatchNorm folded)
with every integer-quantized layer (`LayerEncoding.grid`) in full QDQ form:

    x_f -> QuantizeLinear -> DequantizeLinear -> Conv/Gemm <- DequantizeLinear <- w int8
                                                     ^- DequantizeLinear <- bias int32
        -> QuantizeLinear -> DequantizeLinear -> ...

- weights: the library's integers q with one scale per output channel, scale[c] * |a[c]|
  where a is the folded BatchNorm factor (q changes sign where a < 0): int8 with zero
  point 0 where |q| <= 64 (grids of up to 7 bits), uint8 q + 128 with zero point 128 where
  q is wider (8-bit grids: x86 U8S8 kernels without VNNI saturate on them, see
  `SATURATION_FREE`); either way the ONNX weights are exactly the quantized model's;
- activations: uint8, asymmetric, one scale per tensor, calibrated on samples
  (export/calibration.py: minmax, percentile, mse), on every quantized layer's input and
  output and on the operators between them (Add, pooling, Flatten...) so no float island
  breaks the integer chain. A ReLU disappears into its output's zero point.

onnxruntime's graph optimizer (level >= basic) fuses each DQ -> op -> Q group into one
integer operator. uint8 activations with int8 weights (U8S8) is the combination its x86
CPU kernels accelerate: with int8 activations its fusion left 12 of resnet20's 21
convolutions float (measured, onnxruntime 1.32), with uint8 it fuses all 21.

What we reuse: `onnxruntime.quantization.quantize_static` writes the Q/DQ nodes. Its
operator table knows which operators onnxruntime fuses (and which need Q/DQ around them to
keep the chain integer), so we do not re-derive those rules. We give it our integers
(per-channel `TensorQuantOverrides`: scale and zero point per channel, so its
round(w / scale) gives back q exactly, checked after) and our activation ranges (a
calibration cache), and turn off its weight-scale adjustment for int32 biases (it would
change our scales). Layers without an integer grid stay float (`nodes_to_exclude`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from xaicompress.atomic import atomic_write_bytes, check_writable
from xaicompress.checkpoint import Checkpoint, check_finite_model, probe_batch
from xaicompress.errors import XaiCompressError
from xaicompress.export.calibration import CALIBRATION_METHODS, activation_ranges
from xaicompress.export.metadata import add_onnx_metadata
from xaicompress.export.onnx_graph import float_onnx
from xaicompress.export.runtime import INTEGER_OPS, integer_op_counts, ort_predict

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
#: the largest |integer weight| an int8 (U8S8) kernel multiplies without int16 saturation
SATURATION_FREE = 64
__all__ = ["CALIBRATION_METHODS", "INTEGER_OPS", "export_qdq", "integer_op_counts",
           "ort_predict", "qdq_bytes"]


def _weight_axis(node: Any) -> int:
    """The output-channel axis of a Conv / Gemm / MatMul weight initializer."""
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1 if node.op_type == "MatMul" else 0


def _integer_layers(ckpt: Checkpoint, proto: Any,
                    folds: dict[str, np.ndarray]) -> tuple[dict[str, Any], list[str], dict]:
    """(per-channel weight overrides, float weight-op node names, expected weight
    initializers: int8, or uint8 + 128)."""
    from onnxruntime.quantization import QuantType

    inits = {i.name: i for i in proto.graph.initializer}
    nodes = {n.input[1]: n for n in proto.graph.node
             if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in inits}
    overrides: dict[str, Any] = {}
    expected: dict[str, np.ndarray] = {}
    params = dict(ckpt.model.named_parameters())
    for layer, lc in ckpt.state.items():
        if lc.grid is None:
            continue
        w_name = f"{layer}.weight"
        node = nodes.get(w_name)
        if node is None:
            raise XaiCompressError(f"integer ONNX export: layer {layer!r}: no Conv / Gemm / "
                                   "MatMul reads its weight in the exported graph")
        if lc.grid.bits > 8:
            raise XaiCompressError(f"integer ONNX export: layer {layer!r} has "
                                   f"{lc.grid.bits}-bit weights (int8 holds at most 8)")
        q = lc.grid.quantize(params[w_name].detach().float()).numpy()
        a = folds.get(w_name, np.ones(q.shape[0], np.float32)).astype(np.float64)
        # a < 0 flips the integers' sign; a == 0 (gamma 0) makes the folded weight 0
        sign = np.sign(a).reshape(-1, *([1] * (q.ndim - 1)))
        scale = lc.grid.scale.numpy().astype(np.float64) * np.abs(a)
        scale = np.where(scale > 0, scale, lc.grid.scale.numpy())  # a == 0: w' == 0
        axis = _weight_axis(node)
        want = (q * sign).astype(np.int16)
        # x86 U8S8 kernels without VNNI (AVX2) add pairs of uint8 x int8 products in int16
        # and saturate (255 * 127 * 2 > 32767; measured: a QLinearConv of 8-bit weights gave
        # 112 where the exact result is 200). Integers within +-64 cannot saturate
        # (255 * 64 * 2 = 32640): int8. Wider ones are stored uint8 with zero point 128
        # (U8U8 kernels widen to int16 before multiplying): the same integers, exact on
        # every CPU.
        dtype, qtype, zero = ((np.uint8, QuantType.QUInt8, 128)
                              if int(np.abs(want).max(initial=0)) > SATURATION_FREE
                              else (np.int8, QuantType.QInt8, 0))
        want = (want + zero).astype(dtype)
        expected[w_name] = want.T if axis == 1 else want  # MatMul / Gemm keep (in, out)
        overrides[w_name] = [{"axis": axis, "scale": np.float32(s), "zero_point": dtype(zero),
                              "quant_type": qtype} for s in scale]
    excluded = [n.name for w, n in nodes.items() if w not in overrides]
    return overrides, excluded, expected


def _check_weights(proto: Any, expected: dict[str, np.ndarray]) -> None:
    """The weight initializers onnxruntime wrote are exactly the library's integers."""
    from onnx import numpy_helper

    got = {i.name: i for i in proto.graph.initializer}
    for w_name, want in expected.items():
        q = got.get(f"{w_name}_quantized")
        if q is None or not np.array_equal(numpy_helper.to_array(q), want):
            raise XaiCompressError(f"integer ONNX export: weight {w_name!r} is not the "
                                   "quantized model's integers; please report this bug")


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def qdq_model(ckpt: Checkpoint, samples: Tensor, *, method: str = "minmax",
              percentile: float = 99.99) -> Any:
    """The integer (QDQ) ModelProto of `ckpt`, activations calibrated on `samples`."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    if not any(lc.grid is not None for _, lc in ckpt.state.items()):
        raise XaiCompressError("integer ONNX export: the model has no integer-quantized layer "
                               "(run `quantize` first, or export plain ONNX)")
    proto, folds = float_onnx(ckpt)
    overrides, excluded, expected = _integer_layers(ckpt, proto, folds)
    ranges = activation_ranges(proto, samples.numpy(), method=method, percentile=percentile)
    cache = TensorsData(CalibrationMethod.MinMax, {
        n: TensorData(lowest=np.float32(lo), highest=np.float32(hi))
        for n, (lo, hi) in ranges.items()})
    with tempfile.TemporaryDirectory(prefix="xaicompress-qdq-") as tmp:
        cache_path = Path(tmp) / "ranges.json"
        save_tensors_data(cache, cache_path)
        out = Path(tmp) / "qdq.onnx"
        with _quiet_root_logger():  # its "consider pre-processing" notice, on every call
            quantize_static(
                proto, out, None, quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=excluded, calibrate_method=CalibrationMethod.MinMax,
                calibration_cache_path=cache_path,
                extra_options={"TensorQuantOverrides": overrides,
                               "ActivationSymmetric": False,
                               "QDQDisableWeightAdjustForInt32Bias": True})
        result = onnx.load(str(out))
    _check_weights(result, expected)
    result.producer_name = "xaicompress"
    onnx.helper.set_model_props(result, {
        "xaicompress.calibration": json.dumps({"method": method, "samples": len(samples),
                                               **({"percentile": percentile}
                                                  if method == "percentile" else {})}),
        "xaicompress.integer_layers": json.dumps(sorted(w[:-7] for w in expected))})
    add_onnx_metadata(result, ckpt.spec)  # architecture and preprocessing
    onnx.checker.check_model(result)
    return result


def qdq_bytes(ckpt: Checkpoint, samples: Tensor, **kwargs: Any) -> bytes:
    return qdq_model(ckpt, samples, **kwargs).SerializeToString()


def export_qdq(ckpt: Checkpoint, path: str | os.PathLike[str], samples: Tensor, *,
               method: str = "minmax", percentile: float = 99.99) -> Path:
    """Write the integer ONNX of `ckpt` to `path` atomically, after checking that
    onnxruntime runs it on integer kernels with finite outputs on the probe batch."""
    check_writable(path)
    check_finite_model(ckpt, path)
    data = qdq_bytes(ckpt, samples, method=method, percentile=percentile)

    def verify(tmp: Path) -> None:
        try:
            got = ort_predict(tmp, probe_batch(ckpt.spec.input_shape))
            ops = integer_op_counts(tmp)
        except Exception as exc:  # onnxruntime raises its own types for a bad graph
            raise XaiCompressError(f"{path}: not written: ONNX Runtime cannot run it "
                                   f"({type(exc).__name__}: {str(exc)[:200]})") from None
        if not torch.isfinite(got).all():
            raise XaiCompressError(f"{path}: not written: ONNX Runtime's outputs are not "
                                   "finite; please report this bug")
        if not any(op in INTEGER_OPS for op in ops):
            raise XaiCompressError(f"{path}: not written: ONNX Runtime fused no integer "
                                   "operator; please report this bug")

    atomic_write_bytes(path, data, verify=verify)
    return Path(path)
