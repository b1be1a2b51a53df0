"""Post-training calibration from a few training samples: BatchNorm re-estimation and
bias correction.

Both repair what a compression step does to the *statistics* of a network without
training it:

- `reestimate_batchnorm` (adaptive BatchNorm, EagleEye, Li et al. 2020): after channels are
  removed or weights rounded, the running mean / variance a BatchNorm stored describe the
  old network's activations. They are reset and re-accumulated (cumulative average, every
  batch weighted equally) from `samples` training images in inference mode for everything
  but the BatchNorms, so Dropout stays off and no weight changes.
- `correct_bias` (empirical bias correction, Nagel et al. 2019, as AIMET and NNCF apply it
  after quantization): the per-channel mean of a compressed layer's output differs from the
  float layer's; the difference, measured on the same images, is added to the layer's
  bias. Layers without a bias are left to the BatchNorm that follows them (its re-estimated
  mean absorbs the same shift).

Every rank under torchrun reads the same samples (no sharded sampler), so the statistics
are identical everywhere without a collective.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from xaicompress.data import subset
from xaicompress.errors import XaiCompressError

#: training images the calibrations read by default (the issue's post-training budget)
CALIBRATION_SAMPLES = 1024
#: images per forward pass: BatchNorm statistics average whole batches, so batches equal
_BATCH = 128


def _loader(dataset: Dataset, samples: int, seed: int) -> DataLoader:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise XaiCompressError(f"calibration samples {samples!r}: expected a positive integer")
    return DataLoader(subset(dataset, samples, seed=seed), batch_size=_BATCH, shuffle=False)


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm (1d / 2d / 3d, SyncBatchNorm) that tracks running statistics."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, dataset: Dataset, *,
                         samples: int = CALIBRATION_SAMPLES, seed: int = 0) -> int:
    """Reset and re-accumulate the running statistics of every BatchNorm of `model` (in
    place) from `samples` seeded-random items (x, y) of `dataset`. Returns the number of
    BatchNorm layers re-estimated (0: nothing to do, the model is untouched)."""
    bns = batchnorm_layers(model)
    if not bns:
        return 0
    loader = _loader(dataset, samples, seed)
    was_training = model.training
    momenta = {n: m.momentum for n, m in bns.items()}
    model.eval()
    for m in bns.values():
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
        m.train()
    try:
        for x, _y in loader:
            model(x.float())
    finally:
        for n, m in bns.items():
            m.momentum = momenta[n]
        model.train(was_training)
        for m in bns.values():
            m.train(was_training)
    return len(bns)


def _weight_error_output(layer: nn.Module, x: Tensor, delta: Tensor) -> Tensor:
    """The output the weight difference `delta` alone makes from the input `x`."""
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
            return F.conv2d(x, delta, None, layer.stride, 0, layer.dilation, layer.groups)
        return F.conv2d(x, delta, None, layer.stride, layer.padding, layer.dilation,
                        layer.groups)
    return F.linear(x, delta)


def correct_bias(model: nn.Module, reference: nn.Module, dataset: Dataset, layers: list[str],
                 *, samples: int = CALIBRATION_SAMPLES, seed: int = 0) -> dict[str, float]:
    """Shift the bias of each named Conv2d / Linear layer of `model` (in place) by the
    per-channel mean of (W_ref - W) x over `samples` items of `dataset`, x the layer's input
    in `model` and W_ref its weight in `reference` (the uncompressed model, same layer
    names): the expected output error the compressed weights make (Nagel et al. 2019).

    The error of each layer's own weights is measured, on the inputs the compressed
    network really gives it, in one pass for all layers (a layer's shift does not undo the
    errors of the layers before it, so shifts never add up twice). Returns layer -> mean
    absolute shift applied; layers without a bias are skipped and absent.
    """
    modules = dict(model.named_modules())
    refs = dict(reference.named_modules())
    with_bias = [n for n in layers if isinstance(modules.get(n), (nn.Conv2d, nn.Linear))
                 and modules[n].bias is not None and n in refs
                 and refs[n].weight.shape == modules[n].weight.shape]
    if not with_bias:
        return {}
    deltas = {n: (refs[n].weight.detach() - modules[n].weight.detach()).float()
              for n in with_bias}
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def watch(name: str) -> Any:
        def hook(layer: nn.Module, args: tuple[Any, ...]) -> None:
            e = _weight_error_output(layer, args[0].detach().float(), deltas[name]).double()
            dims = [0, *range(2, e.dim())] if isinstance(layer, nn.Conv2d) else \
                list(range(e.dim() - 1))
            sums[name] = sums.get(name, 0) + e.sum(dims)
            counts[name] = counts.get(name, 0) + e.numel() // e.shape[1 if isinstance(
                layer, nn.Conv2d) else -1]
        return hook

    handles = [modules[n].register_forward_pre_hook(watch(n)) for n in with_bias]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, _y in _loader(dataset, samples, seed):
                model(x.float())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    shifts: dict[str, float] = {}
    with torch.no_grad():
        for n in with_bias:
            if n in sums:
                delta = (sums[n] / max(1, counts[n])).to(modules[n].bias.dtype)
                modules[n].bias.add_(delta)
                shifts[n] = float(delta.abs().mean())
    return shifts
