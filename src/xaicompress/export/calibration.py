"""Activation ranges of a float ONNX graph on calibration samples (for the integer export).

Every float tensor of the graph (its input and every node output) is made a graph output
and ONNX Runtime runs the calibration samples in batches; a first pass finds each tensor's
minimum and maximum, a second (percentile and MSE only) fills a histogram of `bins` equal
bins over that interval. A method turns a tensor's statistics into the range [lo, hi] that
its uint8 grid covers (scale (hi - lo) / 255, zero point round(-lo / scale), 0 always
inside, as onnxruntime.quantization computes them):

- `minmax`: [min, max], nothing clipped;
- `percentile`: the `percentile` and 100 - `percentile` quantiles (default 99.99): clips
  the rare outliers that would otherwise stretch the step of every other value;
- `mse`: the interval t * [min, max], t in (0.05, 1], with the least mean squared
  quantization error over the histogram (rounding inside, clipping outside).

onnxruntime's own calibrators keep every batch's outputs in memory and have no MSE rule, so
the statistics are collected here (two streaming passes) and handed to its quantizer as a
calibration cache (export/onnx_qdq.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from xaicompress.data import dataset_tensors, subset
from xaicompress.errors import XaiCompressError
from xaicompress.export.onnx import INPUT_NAME

CALIBRATION_METHODS = ("minmax", "percentile", "mse")
LEVELS = 255  # uint8 activations


def _float_tensors(proto: object) -> list[str]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    inits = {i.name for i in proto.graph.initializer}
    names = [INPUT_NAME]
    for n in proto.graph.node:
        names += [o for o in n.output if o and o not in inits
                  and types.get(o) == onnx.TensorProto.FLOAT]
    return list(dict.fromkeys(names))


def _session(proto: object, names: list[str]) -> object:
    import onnx
    import onnxruntime as ort

    aug = onnx.ModelProto()
    aug.CopyFrom(proto)
    have = {o.name for o in aug.graph.output}
    for name in names:
        if name not in have and name != INPUT_NAME:
            aug.graph.output.append(onnx.helper.make_tensor_value_info(
                name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(aug.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def _batches(sess: object, names: list[str], x: np.ndarray,
             batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    outs = [n for n in names if n != INPUT_NAME]
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        got = dict(zip(outs, sess.run(outs, {INPUT_NAME: xb}), strict=True))
        got[INPUT_NAME] = xb
        yield got


def _mse_range(hist: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """The interval t * [lo, hi] of least expected squared error on the histogram."""
    edges = np.linspace(lo, hi, len(hist) + 1)
    v = (edges[:-1] + edges[1:]) / 2
    p = hist / max(hist.sum(), 1)
    best, best_err = (lo, hi), np.inf
    for t in np.linspace(1.0, 0.05, 96):
        a, b = min(lo * t, 0.0), max(hi * t, 0.0)
        s = (b - a) / LEVELS
        if s <= 0:
            continue
        zp = np.round(-a / s)
        deq = (np.clip(np.round(v / s) + zp, 0, LEVELS) - zp) * s
        err = float((p * (v - deq) ** 2).sum())
        if err < best_err:
            best, best_err = (a, b), err
    return best


def _percentile_range(hist: np.ndarray, lo: float, hi: float,
                      percentile: float) -> tuple[float, float]:
    edges = np.linspace(lo, hi, len(hist) + 1)
    cdf = np.cumsum(hist) / max(hist.sum(), 1)
    tail = 1.0 - percentile / 100.0
    a = float(edges[np.searchsorted(cdf, tail, side="left")])
    b = float(edges[min(np.searchsorted(cdf, 1.0 - tail, side="left") + 1, len(hist))])
    return min(a, 0.0), max(b, 0.0)


def activation_ranges(proto: object, samples: np.ndarray, *, method: str = "minmax",
                      percentile: float = 99.99, bins: int = 2048,
                      batch_size: int = 64) -> dict[str, tuple[float, float]]:
    """{tensor name: (lo, hi)} of every float tensor of `proto` on `samples` (N, C, H, W)."""
    if method not in CALIBRATION_METHODS:
        raise XaiCompressError(f"--calibration-method {method!r}: expected one of "
                               f"{', '.join(CALIBRATION_METHODS)}")
    if not 0.0 < percentile <= 100.0:
        raise XaiCompressError(f"--percentile {percentile}: expected 0 < p <= 100")
    if len(samples) == 0:
        raise XaiCompressError("calibration: no samples (expected at least 1)")
    x = np.ascontiguousarray(samples, dtype=np.float32)
    names = _float_tensors(proto)
    sess = _session(proto, names)
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}
    for got in _batches(sess, names, x, batch_size):
        for n, a in got.items():
            lo[n], hi[n] = min(lo[n], float(a.min())), max(hi[n], float(a.max()))
    if method == "minmax":
        return {n: (min(lo[n], 0.0), max(hi[n], 0.0)) for n in names}
    hists = {n: np.zeros(bins, np.int64) for n in names}
    for got in _batches(sess, names, x, batch_size):
        for n, a in got.items():
            if hi[n] > lo[n]:
                hists[n] += np.histogram(a, bins=bins, range=(lo[n], hi[n]))[0]
    out = {}
    for n in names:
        if not hi[n] > lo[n]:  # a constant tensor: nothing to choose
            out[n] = (min(lo[n], 0.0), max(hi[n], 0.0))
        elif method == "percentile":
            out[n] = _percentile_range(hists[n], lo[n], hi[n], percentile)
        else:
            out[n] = _mse_range(hists[n], lo[n], hi[n])
    return out


def calibration_samples(data: object, calibration: int = 256, *, seed: int = 0) -> torch.Tensor:
    """`calibration` seeded-random images (N, C, H, W) of a DatasetBundle's training split
    (or of a Dataset), as the model sees them (normalised, no augmentation)."""
    if calibration < 1:
        raise XaiCompressError(f"--calibration {calibration}: expected >= 1")
    train = getattr(data, "train", data)
    return dataset_tensors(subset(train, calibration, seed=seed))[0]
