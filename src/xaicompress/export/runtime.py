"""Running an exported file the way it is deployed: onnxruntime on the CPU, all graph
optimizations on (so QDQ groups run as integer kernels), a chosen number of threads.

`ort_latency_ms` is what `evaluate`, the report and benchmarks/deploy.py give next to
PyTorch's latency; `integer_op_counts` reads the graph onnxruntime really runs (its
optimized model, `SessionOptions.optimized_model_filepath`).
"""

from __future__ import annotations

import collections
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from xaicompress.export.onnx import INPUT_NAME

#: what onnxruntime's optimizer turns a QDQ group into (CPU execution provider)
INTEGER_OPS = frozenset({"QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger",
                         "ConvInteger", "QLinearAdd", "QLinearGlobalAveragePool",
                         "QLinearAveragePool", "QLinearMul", "QLinearConcat"})


def session(path: str | os.PathLike[str], *, optimized: str | None = None,
             threads: int = 1) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # the NCHWc "hardware specific" notice when saving
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def integer_op_counts(path: str | os.PathLike[str]) -> collections.Counter[str]:
    """Operator counts of the graph onnxruntime actually runs for the file at `path` (its
    optimized model, saved through `SessionOptions.optimized_model_filepath`)."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="xaicompress-ort-") as tmp:
        opt = Path(tmp) / "optimized.onnx"
        session(path, optimized=str(opt))
        return collections.Counter(n.op_type for n in onnx.load(str(opt)).graph.node)


def ort_predict(path: str | os.PathLike[str], x: Tensor, batch_size: int = 256) -> Tensor:
    """Logits of the file at `path` as onnxruntime deploys it (all optimizations on, so
    QDQ groups run as integer kernels)."""
    sess = session(path)
    outs = [torch.from_numpy(sess.run(None, {INPUT_NAME: x[i:i + batch_size].numpy()})[0])
            for i in range(0, len(x), batch_size)]
    return torch.cat(outs)


def ort_latency_ms(path: str | os.PathLike[str], input_shape: tuple[int, ...], *,
                   batch: int = 64, threads: int = 1, repeats: int = 30,
                   warmup: int = 5) -> float:
    """Median wall time (ms) of one onnxruntime run of a batch of standard normal inputs."""
    sess = session(path, threads=threads)
    x = np.random.default_rng(0).standard_normal((batch, *input_shape)).astype(np.float32)
    for _ in range(warmup):
        sess.run(None, {INPUT_NAME: x})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {INPUT_NAME: x})
        times.append((time.perf_counter() - t0) * 1000)
    return float(statistics.median(times))
