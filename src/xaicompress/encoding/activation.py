"""`ActQuant`: b-bit quantization of the activations entering a layer, and the forward
pre-hooks that make the in-memory model compute it.

x_q = s * clamp(round(x / s), -2^(b-1), 2^(b-1) - 1) with one calibrated scalar scale s per
layer: exactly what an ONNX QuantizeLinear(int8, zero point 0) + DequantizeLinear computes
at b = 8 (and, followed by a Clip, at b < 8). The hook reads its bits and scale from
attributes of the module, so `copy.deepcopy` (hence `Checkpoint.copy`) carries them.
(Calibration, which needs data, lives in `quant.activations`.)
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from xaicompress.encoding.checks import check_int, check_positive_float, float32_field
from xaicompress.errors import XaiCompressError

MIN_BITS, MAX_BITS = 2, 8
_BITS_ATTR = "_xc_act_bits"
_SCALE_ATTR = "_xc_act_scale"
_HANDLE_ATTR = "_xc_act_handle"


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
    s = scale.to(x.device, x.dtype)
    q = torch.clamp(torch.round(x / s), lo, hi) * s
    if torch.is_grad_enabled() and x.requires_grad:
        return x + (q - x).detach()
    return q


class ActQuant:
    """bits: 2..8; scale: float32 scalar > 0. Packed: the header's "activations" entry of the
    layer ({"bits", "scale"}). Checkpoint: tensor "act_scale", metadata "act_bits"."""

    TENSORS: ClassVar[tuple[str, ...]] = ("act_scale",)
    META: ClassVar[tuple[str, ...]] = ("act_bits",)

    def __init__(self, bits: int, scale: Tensor | float) -> None:
        self.bits = int(bits)
        self.scale = torch.as_tensor(scale, dtype=torch.float32).detach().cpu().reshape(())

    def __repr__(self) -> str:
        return f"ActQuant(bits={self.bits}, scale={float(self.scale):.4g})"

    def __call__(self, x: Tensor) -> Tensor:
        return fake_quant_activation(x, self.scale, self.bits)

    def copy(self) -> ActQuant:
        return ActQuant(self.bits, self.scale.clone())

    def validate(self, where: str) -> None:
        check_int(self.bits, MIN_BITS, MAX_BITS, "activation bits", where)
        check_positive_float(float(self.scale), "activation scale", where)

    def header(self) -> dict[str, Any]:
        """The packed header's entry (a float32 scale is exact as a JSON double)."""
        return {"bits": self.bits, "scale": float(self.scale)}

    @classmethod
    def from_header(cls, entry: Any, where: str) -> ActQuant:
        if not isinstance(entry, dict) or set(entry) != {"bits", "scale"}:
            raise XaiCompressError(f"{where}: activation entry must be {{\"bits\", \"scale\"}}")
        bits = check_int(entry["bits"], MIN_BITS, MAX_BITS, "activation bits", where)
        scale = check_positive_float(entry["scale"], "activation scale", where)
        out = cls(bits, scale)
        if not torch.isfinite(out.scale) or float(out.scale) <= 0:
            raise XaiCompressError(f"{where}: activation scale {scale!r} is not a positive "
                                   "float32")
        return out

    def to_checkpoint(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"act_scale": self.scale.contiguous()}, {"act_bits": self.bits}

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, Tensor], meta: dict[str, Any],
                        shape: tuple[int, ...], where: str) -> ActQuant:
        del shape  # one scale per layer, whatever its weight
        if "act_scale" not in tensors or "act_bits" not in meta:
            raise XaiCompressError(f"{where}: quantized activations need both act_scale and "
                                   "act_bits")
        scale = float32_field(tensors["act_scale"], "act_scale", where)
        if scale.numel() != 1:
            raise XaiCompressError(f"{where}: act_scale has {scale.numel()} values, expected 1")
        out = cls(check_int(meta["act_bits"], MIN_BITS, MAX_BITS, "act_bits", where), scale)
        out.validate(where)
        return out


# ------------------------------------------------------------------------ hooks
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


def install_activation_quant(model: nn.Module, quantizers: dict[str, ActQuant]) -> int:
    """Make `model` fake-quantize the inputs of every layer named in `quantizers`.

    Replaces hooks installed earlier (idempotent). Returns the number of layers hooked.
    """
    remove_activation_quant(model)
    modules = dict(model.named_modules())
    for name, aq in quantizers.items():
        if name not in modules:
            raise XaiCompressError(f"compression state names unknown layer {name!r}")
        aq.validate(f"layer {name!r}")
        m = modules[name]
        setattr(m, _BITS_ATTR, aq.bits)
        setattr(m, _SCALE_ATTR, aq.scale.clone())
        setattr(m, _HANDLE_ATTR, m.register_forward_pre_hook(_pre_hook))
    return len(quantizers)
