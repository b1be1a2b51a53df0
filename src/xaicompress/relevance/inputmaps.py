"""Input-space DeepLIFT maps (heatmaps, explanation fidelity) and a heatmap grid plot."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from xaicompress.errors import XaiCompressError
from xaicompress.relevance.engine import DeepLiftEngine
from xaicompress.relevance.references import black_image, parse_reference, resolve_reference


def input_attribution(model: nn.Module, x: Tensor, *, target: Any = None,
                      reference: Any = None, pixel_mean: Sequence[float] | None = None,
                      pixel_std: Sequence[float] | None = None,
                      batch_size: int = 256) -> Tensor:
    """DeepLIFT (Rescale) contributions of every input feature, (N, C, H, W).

    x (N, C, H, W) normalised inputs. target: None (the predicted class), a class index,
    or (N,) indices. reference: None / "zeros" (black image: pass pixel_mean/pixel_std),
    "blur", a tensor (C, H, W) / (K, C, H, W) (K references are averaged), or a callable.
    Each map sums to f_t(x) - f_t(reference) up to float rounding. The model is not changed.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise XaiCompressError(f"input_attribution: x must be (N, C, H, W), got "
                               f"{tuple(x.shape) if isinstance(x, Tensor) else type(x)}")
    spec = parse_reference("zeros" if reference is None else reference)
    if spec.kind in ("mean", "samples"):
        raise XaiCompressError(f"reference={spec.describe()}: needs a dataset; pass the "
                               "reference image as a tensor instead")
    x = x.detach().float()
    if spec.kind == "zeros":
        ref_const: Tensor | None = black_image(tuple(x.shape[1:]), pixel_mean, pixel_std)[None]
        per_sample = None
    else:
        ref = resolve_reference(spec, None, x)  # type: ignore[arg-type]
        ref_const, per_sample = ref.constant, ref.per_sample
    engine = DeepLiftEngine(model)  # cached per model: repeated calls do not re-trace
    group = 1 if ref_const is None else ref_const.shape[0]
    if ref_const is not None:
        engine.set_reference(ref_const)
    outs = []
    for i in range(0, len(x), max(1, batch_size // group)):
        xs = x[i:i + max(1, batch_size // group)]
        if per_sample is not None:
            engine.set_reference(per_sample(xs))
        rows = xs.repeat_interleave(group, 0) if group > 1 else xs
        t: Tensor | str
        if target is None:
            t = "pred"
        else:
            tt = torch.as_tensor(target).long().reshape(-1)
            tt = tt.expand(len(x)) if tt.numel() == 1 else tt
            if tt.numel() != len(x):
                raise XaiCompressError(f"target: {tt.numel()} classes for {len(x)} inputs")
            t = tt[i:i + len(xs)].repeat_interleave(group)
        res = engine.attribute(rows, t)
        outs.append(res.inputs.view(len(xs), group, *x.shape[1:]).mean(1))
    return torch.cat(outs)


def save_heatmap_grid(images: Tensor, maps: Tensor, path: str | os.PathLike[str], *,
                      titles: Sequence[str] | None = None, ncols: int = 4) -> None:
    """Save a PNG grid: each image (grey/RGB, values in [0, 1]) next to its map.

    images (N, C, H, W) pixels in [0, 1]; maps (N, C, H, W) attributions, summed over
    channels and shown on a symmetric red (positive) / blue (negative) scale.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xaicompress.atomic import atomic_save_figure, check_writable

    check_writable(path)
    n = len(images)
    if n == 0 or maps.shape[0] != n:
        raise XaiCompressError(f"heatmaps: {n} images and {maps.shape[0]} maps; expected the "
                               "same positive number")
    ncols = max(1, min(ncols, n))
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, 2 * ncols, figsize=(2.2 * 2 * ncols, 2.3 * nrows),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, ncols)
        img = images[i].detach().float().clamp(0, 1)
        ax_img, ax_map = axes[r][2 * c], axes[r][2 * c + 1]
        if img.shape[0] == 1:
            ax_img.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax_img.imshow(img[:3].permute(1, 2, 0).numpy())
        heat = maps[i].detach().float().sum(0)
        lim = float(heat.abs().max()) or 1.0
        ax_map.imshow(heat.numpy(), cmap="bwr", vmin=-lim, vmax=lim)
        if titles is not None and i < len(titles):
            ax_img.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    try:
        atomic_save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)
