"""The smallest ONNX any ONNX runtime runs: each layer's weight stored as its encoding.

Starting from the float graph of export/onnx_graph.py (effective weights, BatchNorm
folded), every encoded layer's weight initializer is replaced by a few constant nodes that
rebuild it under the same name (the Conv / Gemm reading it is unchanged):

- `IntGrid` <= 4 bits: int4 (2 per byte) + per-channel scale -> DequantizeLinear
  (opset 21); 5..8 bits int8, 9..16 bits int16;
- `Codebook` (+ `Mask`): the k values + uint4 / uint8 / uint16 indices (a pruned weight
  indexes an exact 0 added to the codebook) -> DequantizeLinear (scale 1) -> Cast int64 ->
  Gather;
- `Mask` alone, density < 1/3: a sparse initializer (values + int64 positions), which the
  runtime densifies when it loads the file.

A folded BatchNorm factor a multiplies the integer scales (|a|; the integers change sign
where a < 0) or, for a codebook, follows the Gather as one Mul by a per-channel constant.
Activations stay float: `onnx_qdq` writes the file with integer kernels.

Measured on onnxruntime 1.32 CPU: int4 / uint4 DequantizeLinear per axis, Gather on
uint4-derived indices and float sparse initializers all run; sparse initializers accept
only int64 positions (int32 / int16 are refused), so a masked float layer is stored
sparse only where 12 bytes per kept weight beat 4 per weight. Quantized codebook or grid
layers keep dense integers (a pruned weight costs its 4 or 8 bits).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xaicompress.atomic import atomic_write_bytes, check_writable
from xaicompress.checkpoint import Checkpoint, check_finite_model, probe_batch
from xaicompress.encoding import LayerEncoding
from xaicompress.errors import XaiCompressError
from xaicompress.export.onnx import ROUNDOFF_FACTOR, float_roundoff, onnx_predict
from xaicompress.export.onnx_graph import effective_model, float_onnx


def _tensor(name: str, values: np.ndarray, onnx_type: int, bits: int) -> Any:
    """TensorProto of integer `values` stored at `bits` (4: two per byte, low nibble
    first, as the ONNX spec packs int4 / uint4)."""
    import onnx

    t = onnx.TensorProto()
    t.name, t.data_type = name, onnx_type
    t.dims.extend(values.shape)
    flat = values.reshape(-1)
    if bits == 4:
        nib = (flat.astype(np.int64) & 0xF).astype(np.uint8)
        if len(nib) % 2:
            nib = np.append(nib, np.uint8(0))
        t.raw_data = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()
    else:
        dtype = {onnx.TensorProto.INT8: np.int8, onnx.TensorProto.INT16: np.int16,
                 onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.UINT16: np.uint16}
        t.raw_data = flat.astype(dtype[onnx_type]).astype("<" + np.dtype(
            dtype[onnx_type]).str[1:]).tobytes()
    return t


def _grid_nodes(w_name: str, lc: LayerEncoding, w: torch.Tensor,
                a: np.ndarray | None) -> tuple[list[Any], list[Any], str]:
    import onnx
    from onnx import helper, numpy_helper

    grid = lc.grid
    q = grid.quantize(w).numpy()
    scale = grid.scale.numpy().astype(np.float64)
    if a is not None:
        q = q * np.sign(a).reshape(-1, *([1] * (q.ndim - 1)))  # a == 0: the weight is 0
        scale = np.where(scale * np.abs(a) > 0, scale * np.abs(a), scale)
    bits = 4 if grid.bits <= 4 else 8 if grid.bits <= 8 else 16
    kind = {4: onnx.TensorProto.INT4, 8: onnx.TensorProto.INT8, 16: onnx.TensorProto.INT16}
    inits = [_tensor(f"{w_name}.q", q, kind[bits], bits),
             numpy_helper.from_array(scale.astype(np.float32), f"{w_name}.scale")]
    node = helper.make_node("DequantizeLinear", [f"{w_name}.q", f"{w_name}.scale"], [w_name],
                            axis=0, name=f"{w_name}/dequantize")
    return [node], inits, f"int{bits}"


def _codebook_nodes(w_name: str, lc: LayerEncoding,
                    a: np.ndarray | None) -> tuple[list[Any], list[Any], str]:
    import onnx
    from onnx import helper, numpy_helper

    cb = lc.codebook
    values = cb.values.numpy().astype(np.float32)
    idx = cb.indices.numpy().astype(np.int64)
    if lc.mask is not None:
        zero = np.flatnonzero(values == 0)
        if len(zero) == 0:
            values = np.append(values, np.float32(0))
            zero = [len(values) - 1]
        idx = np.where(lc.mask.keep.numpy(), idx, zero[0])
    bits = 4 if len(values) <= 16 else 8 if len(values) <= 256 else 16
    kind = {4: onnx.TensorProto.UINT4, 8: onnx.TensorProto.UINT8, 16: onnx.TensorProto.UINT16}
    fp16 = cb.storage_dtype == "float16"
    book = numpy_helper.from_array(values.astype(np.float16 if fp16 else np.float32),
                                   f"{w_name}.codebook")
    inits = [_tensor(f"{w_name}.indices", idx, kind[bits], bits), book,
             numpy_helper.from_array(np.float32(1.0), f"{w_name}.one")]
    p = f"{w_name}/"
    nodes = [helper.make_node("DequantizeLinear", [f"{w_name}.indices", f"{w_name}.one"],
                              [p + "index_f"], name=p + "indices"),
             helper.make_node("Cast", [p + "index_f"], [p + "index"], to=onnx.TensorProto.INT64,
                              name=p + "cast"),
             helper.make_node("Gather", [f"{w_name}.codebook", p + "index"],
                              [p + "gathered"], axis=0, name=p + "gather")]
    last = p + "gathered"
    if fp16:
        nodes.append(helper.make_node("Cast", [last], [p + "f32"], to=onnx.TensorProto.FLOAT,
                                      name=p + "to_float"))
        last = p + "f32"
    if a is not None:
        inits.append(numpy_helper.from_array(
            a.astype(np.float32).reshape(-1, *([1] * (idx.ndim - 1))), f"{w_name}.bn_factor"))
        nodes.append(helper.make_node("Mul", [last, f"{w_name}.bn_factor"], [p + "scaled"],
                                      name=p + "batchnorm"))
        last = p + "scaled"
    nodes[-1].output[0] = w_name
    return nodes, inits, f"codebook k={len(values)} uint{bits}"


def _sparse(w_name: str, w: np.ndarray) -> Any | None:
    from onnx import helper, numpy_helper

    flat = np.flatnonzero(w)
    if 12 * len(flat) >= 4 * w.size:
        return None
    return helper.make_sparse_tensor(numpy_helper.from_array(w.reshape(-1)[flat], w_name),
                                     numpy_helper.from_array(flat.astype(np.int64),
                                                             f"{w_name}.positions"),
                                     list(w.shape))


def small_model(ckpt: Checkpoint) -> Any:
    """The ModelProto of `ckpt` with every encoded weight stored as its encoding."""
    import onnx
    from onnx import numpy_helper

    proto, folds = float_onnx(ckpt)
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, int] = {}
    for n in graph.node:
        for x in n.input:
            readers[x] = readers.get(x, 0) + 1
    weights = dict(effective_model(ckpt).named_parameters())
    new_nodes, new_inits, sparse, stored = [], [], [], {}
    for layer, lc in ckpt.state.items():
        w_name = f"{layer}.weight"
        init = inits.get(w_name)
        w = weights.get(w_name)
        if init is None or w is None or readers.get(w_name) != 1 or tuple(init.dims) != tuple(
                w.shape):
            continue  # not in the graph as itself (e.g. transposed for a MatMul): stays float
        a = folds.get(w_name)
        if lc.grid is not None:
            nodes, extra, how = _grid_nodes(w_name, lc, w.detach().float(), a)
        elif lc.codebook is not None:
            nodes, extra, how = _codebook_nodes(w_name, lc, a)
        elif lc.mask is not None:
            sp = _sparse(w_name, numpy_helper.to_array(init))
            if sp is None:
                continue
            sparse.append(sp)
            nodes, extra, how = [], [], "sparse"
        else:
            continue
        graph.initializer.remove(init)
        new_nodes += nodes
        new_inits += extra
        stored[layer] = how
    graph.initializer.extend(new_inits)
    graph.sparse_initializer.extend(sparse)
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend([*new_nodes, *rest])
    kept = {p.key: p.value for p in proto.metadata_props}  # float_onnx's preprocessing
    onnx.helper.set_model_props(proto, {**kept, "xaicompress.stored": json.dumps(stored)})
    onnx.checker.check_model(proto)
    return proto


def small_bytes(ckpt: Checkpoint) -> bytes:
    return small_model(ckpt).SerializeToString()


def export_small(ckpt: Checkpoint, path: str | os.PathLike[str]) -> Path:
    """Write the small ONNX of `ckpt` to `path` atomically, after checking that
    onnxruntime reproduces the model's float outputs (activation quantization is not part
    of this file) on the probe batch within `verify_tolerance` without its activation term:
    1e-4 * (1 + max |logit|) plus the model's own fp32 round-off."""
    check_writable(path)
    check_finite_model(ckpt, path)
    x = probe_batch(ckpt.spec.input_shape)
    net = effective_model(ckpt)
    with torch.no_grad():
        want = net(x)
    data = small_bytes(ckpt)
    tolerance = (1e-4 * (1.0 + float(want.abs().max()))
                 + ROUNDOFF_FACTOR * float_roundoff(net, x, want))

    def verify(tmp: Path) -> None:
        try:
            got = onnx_predict(tmp, x)
        except Exception as exc:  # onnxruntime raises its own types for a bad graph
            raise XaiCompressError(f"{path}: not written: ONNX Runtime cannot run it "
                                   f"({type(exc).__name__}: {str(exc)[:200]})") from None
        diff = float((got - want).abs().max())
        if not diff <= tolerance:
            raise XaiCompressError(f"{path}: not written: ONNX Runtime's outputs differ from "
                                   f"PyTorch's by {diff:.3g}; please report this bug")

    atomic_write_bytes(path, data, verify=verify)
    return Path(path)
