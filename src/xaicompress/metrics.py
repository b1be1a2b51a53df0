"""What `evaluate` reports: accuracy, parameters, non-zeros, MACs, bytes, latency."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from xaicompress.checkpoint import Checkpoint, count_nonzero, count_params, fp32_bytes
from xaicompress.device import cpu_copy, model_device
from xaicompress.export.packed import packed_report
from xaicompress.train import accuracy


def count_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one forward pass of one image (Torch-Pruning's counter).

    Counts dense MACs: unstructured sparsity does not reduce it (a dense runtime would not
    skip the zeros); structured pruning does.
    """
    import torch_pruning as tp  # heavy import (~1 s); only MAC counting needs it

    was_training = model.training
    model.eval()
    macs, _ = tp.utils.count_ops_and_params(
        model, torch.zeros(1, *input_shape, device=model_device(model)))
    model.train(was_training)
    return int(macs)


@torch.no_grad()
def measure_latency(model: nn.Module, input_shape: tuple[int, int, int], batch: int = 64,
                    repeats: int = 30, warmup: int = 5) -> float:
    """Median wall time in milliseconds of one forward pass of a batch on the CPU (a GPU
    model is timed as a CPU copy: the figure stands for the small device it is made for)."""
    model = cpu_copy(model)
    model.eval()
    x = torch.randn(batch, *input_shape)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - t0) * 1000)
    return float(statistics.median(times))


def evaluate(ckpt: Checkpoint, test_set: Dataset | None, *, latency: bool = True,
             latency_repeats: int = 30) -> dict[str, Any]:
    """The standard measurement dictionary of a checkpoint."""
    model = ckpt.model
    out: dict[str, Any] = {
        "accuracy": accuracy(model, test_set) if test_set is not None else None,
        "params": count_params(model),
        "nonzero_params": count_nonzero(model),
        "macs": count_macs(model, ckpt.spec.input_shape),
        "fp32_bytes": fp32_bytes(model),
        # the model as deployed: the size of its packed file (export/packed.py)
        "size_bytes": packed_report(ckpt).file_bytes,
    }
    out["latency_ms"] = (measure_latency(model, ckpt.spec.input_shape, repeats=latency_repeats)
                         if latency else None)
    return out


def onnx_latency(ckpt: Checkpoint, calibration: torch.Tensor | None = None, *,
                 batch: int = 64, repeats: int = 30) -> dict[str, float | None]:
    """onnxruntime latency (ms, median, batch `batch`, 1 thread, all optimizations) of the
    files a user deploys: `onnx_latency_ms` of the small ONNX (float kernels) and, when the
    model has integer layers and `calibration` images are given, `onnx_int8_latency_ms` of
    the integer ONNX. Written to a temporary folder, removed after."""
    import tempfile
    from pathlib import Path

    from xaicompress.export.onnx_small import export_small
    from xaicompress.export.runtime import ort_latency_ms

    shape = ckpt.spec.input_shape
    out: dict[str, float | None] = {"onnx_latency_ms": None, "onnx_int8_latency_ms": None}
    with tempfile.TemporaryDirectory(prefix="xaicompress-eval-") as tmp:
        small = export_small(ckpt, Path(tmp) / "model.onnx")
        out["onnx_latency_ms"] = ort_latency_ms(small, shape, batch=batch, repeats=repeats)
        if calibration is not None and any(lc.grid is not None for _, lc in ckpt.state.items()):
            from xaicompress.export.onnx_qdq import export_qdq

            int8 = export_qdq(ckpt, Path(tmp) / "model.int8.onnx", calibration)
            out["onnx_int8_latency_ms"] = ort_latency_ms(int8, shape, batch=batch,
                                                         repeats=repeats)
    return out
