"""Quantization-aware training with a straight-through estimator (STE).

While training, every quantized layer's weight is a parametrization of a latent float
weight: W = m * (W_lat + (Q(W_lat) - W_lat).detach()), Q the layer's fixed per-channel grid
(bits, scale) and m its pruning mask. The forward pass sees the quantized weights, the
gradient reaches the latent weights unchanged (pruned ones get none). Afterwards the latent
weights are projected once more onto the grid, so the state's scales and the model's
effective weights agree exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.data import Dataset

from xaicompress.checkpoint import Checkpoint
from xaicompress.distill import distillation
from xaicompress.encoding import IntGrid, Mask
from xaicompress.train import train


class STEQuant(nn.Module):
    """Parametrization: latent weight (out, ...) -> quantized weight with an STE gradient."""

    def __init__(self, grid: IntGrid, mask: Mask | None) -> None:
        super().__init__()
        self.grid = grid.copy()
        self.mask = None if mask is None else mask.copy()

    def forward(self, w: Tensor) -> Tensor:
        q = self.grid.effective(w.detach())
        out = w + (q - w).detach()
        return self.mask.apply(out) if self.mask is not None else out


def qat_train(ckpt: Checkpoint, train_set: Dataset, *, epochs: float = 1, lr: float = 1e-3,
              seed: int = 0, batch_size: int = 64, distill: float = 0.0,
              teacher: nn.Module | None = None) -> Checkpoint:
    """Train `ckpt` IN PLACE with the STE on its quantized layers; returns it.

    distill: weight of distillation from `teacher` (default: the model as it is before the
    training; `xaicompress.distill`, 0 = off).

    Activation quantizers installed on the model stay active (with their own STE).
    """
    loss = distillation(teacher if teacher is not None else ckpt.model, distill)
    modules = dict(ckpt.model.named_modules())
    quantized = {n: lc for n, lc in ckpt.state.layers.items() if lc.grid is not None}
    for name, lc in quantized.items():
        parametrize.register_parametrization(modules[name], "weight",
                                             STEQuant(lc.grid, lc.mask))
    try:
        # amp off: the fake-quantized weights q * s must meet the inputs at float32, as the
        # runtime computes them (bf16 keeps 8 mantissa bits of s)
        train(ckpt.model, train_set, epochs=epochs, lr=lr, seed=seed, batch_size=batch_size,
              description="QAT", amp="off", loss=loss)
    finally:
        for name in quantized:
            # Keep the latent float weights; the state re-derives the quantized ones from them.
            parametrize.remove_parametrizations(modules[name], "weight",
                                                leave_parametrized=False)
    with torch.no_grad():
        ckpt.state.apply(ckpt.model)
    ckpt.state.install_hooks(ckpt.model)
    ckpt.model.eval()
    return ckpt
