"""Compression state that travels with a model: masks, codebooks, integer bits.

The in-memory model always holds the *effective* float weights (pruned weights are 0,
shared weights equal their centroid, quantized weights equal scale * q). The state keeps
what is needed to keep those constraints during fine-tuning and to pack the weights as a
runtime would store them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from xaicompress.errors import XaiCompressError


@dataclass
class LayerCompression:
    """Compression of one layer's weight (keyed by module name in `CompressionState`).

    mask:     bool, weight shape; True = kept. Pruned weights are exactly zero.
    codebook: float32 (k,) centroids; `indices` int64, weight shape, into the codebook.
              Pruned weights (mask False) do not use a codebook entry.
    bits:     integer quantization width (2..8); `scale` float32 (out_channels,), symmetric
              per-output-channel: w = scale[c] * q, q in [-(2^(b-1)-1), 2^(b-1)-1].
    act_bits: bits of the activations entering this layer (None = float).
    act_scale: scalar scale of those activations (calibrated).
    """

    mask: Tensor | None = None
    codebook: Tensor | None = None
    indices: Tensor | None = None
    bits: int | None = None
    scale: Tensor | None = None
    act_bits: int | None = None
    act_scale: Tensor | None = None

    _TENSORS = ("mask", "codebook", "indices", "scale", "act_scale")
    _INTS = ("bits", "act_bits")

    def is_empty(self) -> bool:
        return all(getattr(self, f) is None for f in self._TENSORS + self._INTS)


@dataclass
class CompressionState:
    layers: dict[str, LayerCompression] = field(default_factory=dict)

    def get(self, name: str) -> LayerCompression:
        """The entry for module `name`, created empty if absent."""
        return self.layers.setdefault(name, LayerCompression())

    def __contains__(self, name: str) -> bool:
        return name in self.layers and not self.layers[name].is_empty()

    def copy(self) -> CompressionState:
        out = CompressionState()
        for name, lc in self.layers.items():
            kw = {f: (getattr(lc, f).clone() if getattr(lc, f) is not None else None)
                  for f in LayerCompression._TENSORS}
            kw.update({f: getattr(lc, f) for f in LayerCompression._INTS})
            out.layers[name] = LayerCompression(**kw)
        return out

    # -- serialisation: tensors under "__xc__/<layer>/<field>", ints in JSON metadata --
    def to_tensors(self) -> tuple[dict[str, Tensor], dict[str, dict[str, int]]]:
        tensors: dict[str, Tensor] = {}
        meta: dict[str, dict[str, int]] = {}
        for name, lc in self.layers.items():
            if lc.is_empty():
                continue
            for f in LayerCompression._TENSORS:
                t = getattr(lc, f)
                if t is not None:
                    t = t.to(torch.uint8) if f == "mask" else t
                    tensors[f"__xc__/{name}/{f}"] = t.contiguous()
            meta[name] = {f: getattr(lc, f) for f in LayerCompression._INTS
                          if getattr(lc, f) is not None}
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict[str, dict[str, int]],
                     source: str = "checkpoint") -> CompressionState:
        st = cls()
        for key, t in tensors.items():
            parts = key.split("/")
            if len(parts) != 3 or parts[0] != "__xc__" or parts[2] not in LayerCompression._TENSORS:
                raise XaiCompressError(f"{source}: unexpected compression tensor {key!r}")
            setattr(st.get(parts[1]), parts[2], t.bool() if parts[2] == "mask" else t)
        for name, ints in (meta or {}).items():
            for f, v in ints.items():
                if f not in LayerCompression._INTS or not isinstance(v, int):
                    raise XaiCompressError(f"{source}: bad compression field {name}.{f}={v!r}")
                setattr(st.get(name), f, v)
        return st

    def install_hooks(self, model: nn.Module) -> None:
        """Re-create what lives in forward hooks rather than tensors (quantized
        activations) on a freshly loaded `model`. Every loader calls this."""
        if any(lc.act_bits is not None for lc in self.layers.values()):
            from xaicompress.quant.activations import install_activation_quant

            install_activation_quant(model, self)

    def apply(self, model: nn.Module) -> None:
        """Write the effective weights implied by the state into `model`, in place."""
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, lc in self.layers.items():
                if lc.is_empty():
                    continue
                if name not in modules or not hasattr(modules[name], "weight"):
                    raise XaiCompressError(f"compression state names unknown layer {name!r}")
                w = modules[name].weight
                eff = effective_weight(w.detach(), lc)
                w.copy_(eff)


def effective_weight(w: Tensor, lc: LayerCompression) -> Tensor:
    """The float weight a runtime would reconstruct from `lc` (w used where lc is silent)."""
    out = w
    if lc.codebook is not None and lc.indices is not None:
        out = lc.codebook.to(w.dtype)[lc.indices].reshape(w.shape)
    elif lc.bits is not None and lc.scale is not None:
        qmax = 2 ** (lc.bits - 1) - 1
        s = lc.scale.to(w.dtype).reshape(-1, *([1] * (w.dim() - 1)))
        out = torch.clamp(torch.round(w / s), -qmax, qmax) * s
    if lc.mask is not None:
        out = out * lc.mask.to(w.dtype)
    return out
