"""8-bit (or b-bit) activations: calibration on training samples and fake quantization.

The activations entering a quantized layer are quantized symmetrically with one calibrated
scale per layer: x_q = s * clamp(round(x / s), -2^(b-1), 2^(b-1) - 1), exactly what an ONNX
QuantizeLinear(int8, zero point 0) + DequantizeLinear computes at b = 8 (and, followed by a
Clip, at b < 8). The in-memory model really runs this: `install_activation_quant` puts a
forward pre-hook on every layer whose state has `act_bits`. The hook reads its bits and scale
from attributes of the module, so `copy.deepcopy` (hence `Checkpoint.copy`) carries them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from xaicompress.errors import XaiCompressError
from xaicompress.state import CompressionState

_BITS_ATTR = "_xc_act_bits"
_SCALE_ATTR = "_xc_act_scale"
_HANDLE_ATTR = "_xc_act_handle"

ACT_BITS_CHOICES = range(2, 9)


def act_range(bits: int) -> tuple[int, int]:
    """Integer range of signed b-bit activations: [-2^(b-1), 2^(b-1) - 1] (int8 saturation)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def fake_quant_activation(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Quantize-dequantize `x` (any shape) with scalar `scale` at `bits` bits.

    With gradients enabled the straight-through estimator passes the gradient unchanged; in
    inference the exact quantized values are returned (no `x + (q - x)` float round-off), so
    the in-memory model equals what ONNX Runtime computes.
    """
    lo, hi = act_range(bits)
    s = scale.to(x.dtype)
    q = torch.clamp(torch.round(x / s), lo, hi) * s
    if torch.is_grad_enabled() and x.requires_grad:
        return x + (q - x).detach()
    return q


def _pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    bits = getattr(module, _BITS_ATTR, None)
    if bits is None:
        return args
    return (fake_quant_activation(args[0], getattr(module, _SCALE_ATTR), bits), *args[1:])


def remove_activation_quant(model: nn.Module) -> None:
    """Remove every activation fake-quantization hook from `model` (in place)."""
    for m in model.modules():
        handle = getattr(m, _HANDLE_ATTR, None)
        if handle is not None:
            handle.remove()
        # A deep-copied module holds a copy of the hook, not the handle's: drop it by identity.
        for key, hook in list(m._forward_pre_hooks.items()):
            if hook is _pre_hook:
                del m._forward_pre_hooks[key]
        for attr in (_HANDLE_ATTR, _BITS_ATTR, _SCALE_ATTR):
            if hasattr(m, attr):
                delattr(m, attr)


def install_activation_quant(model: nn.Module, state: CompressionState) -> int:
    """Make `model` fake-quantize the inputs of every layer with `act_bits` in `state`.

    Replaces hooks installed earlier (idempotent). Returns the number of layers hooked.
    """
    remove_activation_quant(model)
    modules = dict(model.named_modules())
    n = 0
    for name, lc in state.layers.items():
        if lc.act_bits is None:
            continue
        if lc.act_scale is None:
            raise XaiCompressError(f"compression state: layer {name!r} has act_bits but no "
                                   "act_scale")
        if name not in modules:
            raise XaiCompressError(f"compression state names unknown layer {name!r}")
        if lc.act_bits not in ACT_BITS_CHOICES:
            raise XaiCompressError(f"compression state: layer {name!r} act_bits={lc.act_bits}, "
                                   "expected 2..8")
        m = modules[name]
        setattr(m, _BITS_ATTR, int(lc.act_bits))
        setattr(m, _SCALE_ATTR, lc.act_scale.detach().float().reshape(()).clone())
        setattr(m, _HANDLE_ATTR, m.register_forward_pre_hook(_pre_hook))
        n += 1
    return n


def has_activation_quant(state: CompressionState) -> bool:
    return any(lc.act_bits is not None for lc in state.layers.values())


@torch.no_grad()
def calibrate_activations(model: nn.Module, dataset: Dataset, layers: list[str], bits: int, *,
                          samples: int = 512, seed: int = 0,
                          batch_size: int = 128) -> dict[str, Tensor]:
    """Per-layer activation scales s = max|x| / (2^(b-1) - 1) of each layer's input, over
    `samples` seeded-random training items. Returns layer -> float32 scalar tensor.

    The model is run as it is (weights already quantized), layer by layer in one pass, with
    earlier activation quantizers not yet active (scales are calibrated on float inputs).
    """
    from xaicompress.data import make_loader, subset

    if bits not in ACT_BITS_CHOICES:
        raise XaiCompressError(f"--act-bits {bits}: expected 2..8")
    if samples < 1:
        raise XaiCompressError(f"--samples {samples}: expected a positive number of samples")
    modules = dict(model.named_modules())
    peaks = {name: torch.zeros(()) for name in layers}
    handles = []

    def watch(name: str):  # noqa: ANN202
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            peaks[name] = torch.maximum(peaks[name], args[0].detach().abs().max().float())
        return hook

    for name in layers:
        handles.append(modules[name].register_forward_pre_hook(watch(name)))
    was_training = model.training
    model.eval()
    try:
        loader = make_loader(subset(dataset, samples, seed=seed), batch_size, shuffle=False,
                             seed=seed)
        for x, _y in loader:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    qmax = act_range(bits)[1]
    # A layer that only ever saw zeros gets scale 1: any positive scale represents 0 exactly.
    return {name: (p / qmax if p > 0 else torch.ones(())).float().reshape(())
            for name, p in peaks.items()}
