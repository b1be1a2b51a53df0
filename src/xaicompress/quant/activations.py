"""Calibration of b-bit activations on training samples.

The quantizer itself (`encoding.ActQuant`: x_q = s * clamp(round(x / s), -2^(b-1),
2^(b-1) - 1), and the hooks that make the in-memory model compute it) lives with the other
encodings; this module only finds the scale s of every layer from data.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from xaicompress.data import make_loader, subset
from xaicompress.device import model_device, to_model_device
from xaicompress.encoding.activation import MAX_BITS, MIN_BITS, act_range
from xaicompress.errors import XaiCompressError

ACT_BITS_CHOICES = range(MIN_BITS, MAX_BITS + 1)


@torch.no_grad()
def calibrate_activations(model: nn.Module, dataset: Dataset, layers: list[str], bits: int, *,
                          samples: int = 512, seed: int = 0,
                          batch_size: int = 128) -> dict[str, Tensor]:
    """Per-layer activation scales s = max|x| / (2^(b-1) - 1) of each layer's input, over
    `samples` seeded-random training items. Returns layer -> float32 scalar tensor.

    The model is run as it is (weights already quantized), layer by layer in one pass, with
    earlier activation quantizers not yet active (scales are calibrated on float inputs).
    """
    if bits not in ACT_BITS_CHOICES:
        raise XaiCompressError(f"--act-bits {bits}: expected 2..8")
    if samples < 1:
        raise XaiCompressError(f"--samples {samples}: expected a positive number of samples")
    modules = dict(model.named_modules())
    peaks = {name: torch.zeros((), device=model_device(model)) for name in layers}
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
            model(to_model_device(x, model))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    qmax = act_range(bits)[1]
    # A layer that only ever saw zeros gets scale 1: any positive scale represents 0 exactly.
    return {name: (p.cpu() / qmax if p > 0 else torch.ones(())).float().reshape(())
            for name, p in peaks.items()}
