"""ONNX export of any checkpoint xaicompress writes (plain, pruned, masked, shared, quantized).

The graph has a dynamic batch dimension (input "input" (N, C, H, W) -> output "logits"
(N, classes)). Pruned, masked and weight-shared layers export their effective float weights.
An integer-quantized layer exports its weight as an int8 initializer feeding a per-channel
DequantizeLinear (axis 0) into the Conv / Gemm, and layers with quantized activations get a
QuantizeLinear / DequantizeLinear pair (int8, zero point 0; plus a Clip below 8 bits) on their
input: what the in-memory model computes, so ONNX Runtime reproduces it. Which layers get
which nodes follows their encoding (`LayerEncoding.grid`, `.activation`).

Before the file is renamed into place, ONNX Runtime runs it on the fixed probe batch and
its logits must match PyTorch's within `verify_tolerance` (docs/format.md, "verify").

We use the TorchScript exporter (`dynamo=False`): it runs offline and lets a small
`torch.autograd.Function` emit the Q/DQ nodes directly through its `symbolic`, so no graph
surgery by initializer names (which the exporter may rename or fold) is needed.
"""

from __future__ import annotations

import copy
import io
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xaicompress.atomic import atomic_write_bytes, check_writable
from xaicompress.checkpoint import Checkpoint, check_finite_model, probe_batch, probe_outputs
from xaicompress.encoding import ActQuant, IntGrid
from xaicompress.encoding.activation import (
    act_range,
    fake_quant_activation,
    remove_activation_quant,
)
from xaicompress.errors import XaiCompressError
from xaicompress.export.metadata import add_onnx_metadata

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class _Dequantize(torch.autograd.Function):
    """q int8 (out, ...) * scale (out,) -> float weight; exported as DequantizeLinear."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, scale: Tensor) -> Tensor:  # noqa: ARG004
        return q.float() * scale.reshape(-1, *([1] * (q.dim() - 1)))

    @staticmethod
    def symbolic(g: Any, q: Any, scale: Any) -> Any:
        shape = q.type().sizes()
        zp = g.op("Constant", value_t=torch.zeros(shape[0], dtype=torch.int8))
        return g.op("DequantizeLinear", q, scale, zp, axis_i=0)


class _FakeQuantAct(torch.autograd.Function):
    """Activation fake quantization; exported as QuantizeLinear -> DequantizeLinear."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, lo: Tensor, hi: Tensor,  # noqa: ARG004
                bits: int) -> Tensor:
        return fake_quant_activation(x, scale, bits)

    @staticmethod
    def symbolic(g: Any, x: Any, scale: Any, lo: Any, hi: Any, bits: int) -> Any:
        zp = g.op("Constant", value_t=torch.zeros((), dtype=torch.int8))
        q = g.op("QuantizeLinear", x, scale, zp)
        out = g.op("DequantizeLinear", q, scale, zp)
        if bits < 8:
            # int8 saturation is wider than b bits: clip to the b-bit grid, exactly as
            # clamp(round(x/s), lo, hi) * s does (lo, hi are the float32 products q * s).
            out = g.op("Clip", out, lo, hi)
        return out


class _QuantLayer(nn.Module):
    """A Conv2d / Linear whose weight is int8 + per-channel scale, and/or whose input is
    fake-quantized. Same outputs as the original layer with the state applied."""

    def __init__(self, inner: nn.Module, grid: IntGrid | None, act: ActQuant | None) -> None:
        super().__init__()
        self.inner = inner
        self.act_bits = act.bits if act is not None else None
        if act is not None:
            s = act.scale.clone()
            lo, hi = act_range(act.bits)
            self.register_buffer("act_scale", s)
            self.register_buffer("act_lo", torch.tensor(float(lo)) * s)
            self.register_buffer("act_hi", torch.tensor(float(hi)) * s)
        self.quantized = grid is not None
        if grid is not None:
            if grid.bits > 8:
                raise XaiCompressError(f"ONNX export: {grid.bits}-bit weights do not fit int8")
            self.register_buffer("qweight", grid.quantize(inner.weight.detach().float())
                                 .to(torch.int8))
            self.register_buffer("wscale", grid.scale.clone())

    def forward(self, x: Tensor) -> Tensor:
        if self.act_bits is not None:
            x = _FakeQuantAct.apply(x, self.act_scale, self.act_lo, self.act_hi,
                                    self.act_bits)
        w = _Dequantize.apply(self.qweight, self.wscale) if self.quantized else self.inner.weight
        if isinstance(self.inner, nn.Conv2d):
            return self.inner._conv_forward(x, w, self.inner.bias)
        return nn.functional.linear(x, w, self.inner.bias)


def export_model(ckpt: Checkpoint) -> nn.Module:
    """A copy of `ckpt.model` ready for export: effective weights, Q/DQ layers, no hooks."""
    model = copy.deepcopy(ckpt.model).to("cpu")  # exported from a CPU copy
    remove_activation_quant(model)
    ckpt.state.apply(model)
    modules = dict(model.named_modules())
    for name, lc in ckpt.state.layers.items():
        if lc.grid is None and lc.activation is None:
            continue
        m = modules.get(name)
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            raise XaiCompressError(f"ONNX export: quantized layer {name!r} is "
                                   f"{type(m).__name__}, expected Conv2d or Linear")
        new = _QuantLayer(m, lc.grid, lc.activation)
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, new)
    return model.eval()


def onnx_bytes(ckpt: Checkpoint, *, opset: int = OPSET) -> bytes:
    """The serialised ONNX model of `ckpt` (checked with `onnx.checker`)."""
    import onnx  # heavy import (~0.5 s), only export needs it

    model = export_model(ckpt)
    dummy = torch.zeros(2, *ckpt.spec.input_shape)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo but still supported.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), buf, dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    proto.producer_name = "xaicompress"
    add_onnx_metadata(proto, ckpt.spec)  # architecture and preprocessing (export/metadata.py)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


#: the float round-off term of `verify_tolerance`: this many times the model's own
#: |fp32 - fp64| on the probe batch (ORT's fp32 sums are as exact as PyTorch's, not more)
ROUNDOFF_FACTOR = 4.0


def float_roundoff(model: nn.Module, x: Tensor, fp32: Tensor) -> float:
    """max |fp32 - fp64 forward| of `model` on x, given its fp32 outputs `fp32` (the caller
    has them already): how far PyTorch's own float result is from the exact one. Tiny for a
    trained network (~1e-7 relative); large for an ill-conditioned one (random-weight
    squeeze-excitation models pruned and re-normalised reach 6% of their logits of ~1e4,
    measured on torchvision efficientnet_b0), where no fp32 runtime can agree with PyTorch
    more closely than this. 0.0 when the model cannot run in double precision. `model` is
    not modified (the fp64 forward runs on an eval-mode CPU copy)."""
    try:
        m64 = copy.deepcopy(model).to("cpu", torch.float64).eval()
        with torch.no_grad():
            return float((fp32.cpu().double() - m64(x.double())).abs().max())
    except (RuntimeError, TypeError):  # an op without a double kernel
        return 0.0


def verify_tolerance(ckpt: Checkpoint, reference: Tensor) -> float:
    """Largest |ONNX Runtime - PyTorch| accepted on the probe batch: 1e-4 * (1 + max|logit|)
    (ORT's Conv/Gemm sum in another order, ~1e-7 relative), 0.05 * (1 + max|logit|) with
    quantized activations (an input within that round-off of a rounding boundary of its
    grid moves by one step; tests/test_onnx.py measures how often); plus ROUNDOFF_FACTOR x
    the model's own fp32 round-off (`float_roundoff`), so an ill-conditioned network is held
    to what fp32 arithmetic can give, a well-conditioned one to 1e-4."""
    rel = 0.05 if ckpt.state.activations() else 1e-4
    roundoff = float_roundoff(ckpt.model, probe_batch(ckpt.spec.input_shape), reference)
    return rel * (1.0 + float(reference.abs().max())) + ROUNDOFF_FACTOR * roundoff


def export_onnx(ckpt: Checkpoint, path: str | os.PathLike[str], *, opset: int = OPSET) -> Path:
    """Write `ckpt` as ONNX to `path` atomically (nothing partial on failure), after checking
    that ONNX Runtime runs the file to PyTorch's outputs within `verify_tolerance`."""
    check_writable(path)
    check_finite_model(ckpt, path)
    want = probe_outputs(ckpt.model, ckpt.spec.input_shape)

    def verify(tmp: Path) -> None:
        try:
            got = onnx_predict(tmp, probe_batch(ckpt.spec.input_shape))
        except Exception as exc:  # onnxruntime raises its own types for a bad graph
            raise XaiCompressError(f"{path}: not written: ONNX Runtime cannot run it "
                                   f"({type(exc).__name__}: {str(exc)[:200]})") from None
        diff = float((got - want).abs().max())
        if not diff <= verify_tolerance(ckpt, want):
            raise XaiCompressError(f"{path}: not written: ONNX Runtime's outputs differ from "
                                   f"PyTorch's by {diff:.3g}; please report this bug")

    atomic_write_bytes(path, onnx_bytes(ckpt, opset=opset), verify=verify)
    return Path(path)


def onnx_predict(path: str | os.PathLike[str], x: Tensor, batch_size: int = 256, *,
                 optimize: bool = False) -> Tensor:
    """Logits (N, classes) of the ONNX model at `path` on x (N, C, H, W), in ONNX Runtime.

    optimize=False runs the graph as written (float Conv/Gemm on dequantized weights), which
    reproduces PyTorch; optimize=True lets ORT fuse Q/DQ pairs into integer kernels
    (QLinearConv, ...), which round intermediate results differently.
    """
    import onnxruntime as ort  # heavy import (~0.3 s), only running a file needs it

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    outs = [torch.from_numpy(sess.run(None, {INPUT_NAME: x[i:i + batch_size].numpy()})[0])
            for i in range(0, len(x), batch_size)]
    return torch.cat(outs)
