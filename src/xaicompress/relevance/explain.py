"""`explain`: score a checkpoint with a criterion and write scores, plots and heatmaps.

Output folder layout:
  relevance.safetensors   units/<layer> and weights/<layer> tensors + JSON metadata
  units/<layer>.png       bar plot of the unit relevance of each Conv2d/Linear layer
  heatmaps.png            input-space DeepLIFT maps of a few test images
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from xaicompress.atomic import atomic_save_figure, atomic_write_bytes, check_writable
from xaicompress.errors import XaiCompressError
from xaicompress.relevance.base import Criterion, Relevance, compute_relevance
from xaicompress.relevance.registry import get_criterion

_META_KEY = "xaicompress-relevance"


@dataclass
class Explanation:
    """What `explain_checkpoint` computed and the files it wrote (name -> path)."""

    relevance: Relevance
    files: dict[str, Path] = field(default_factory=dict)


def save_relevance(rel: Relevance, path: str | os.PathLike[str]) -> None:
    """Write a Relevance as one safetensors file (atomically)."""
    meta = json.dumps({"criterion": rel.criterion, "meta": rel.meta}, default=str)
    data = st_save(rel.to_tensors(), metadata={_META_KEY: meta})
    atomic_write_bytes(path, data)


def load_relevance(path: str | os.PathLike[str]) -> Relevance:
    """Read a file written by `save_relevance`; a bad file is a one-line XaiCompressError."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise XaiCompressError(f"{p}: cannot read relevance file ({exc.strerror})") from exc
    try:
        tensors = st_load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + header_len])
        info = json.loads(header.get("__metadata__", {})[_META_KEY])
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise XaiCompressError(f"{p}: not a relevance file written by xaicompress") from exc
    units, weights = {}, {}
    for key, t in tensors.items():
        kind, _, layer = key.partition("/")
        if kind == "units":
            units[layer] = t
        elif kind == "weights":
            weights[layer] = t
    if (weights and set(units) != set(weights)) or not (units or weights) or not all(
            torch.isfinite(t).all() for t in tensors.values()):
        raise XaiCompressError(f"{p}: relevance file is inconsistent (layers or values)")
    return Relevance(str(info.get("criterion", "")), units, weights, dict(info.get("meta", {})))


def plot_unit_relevance(rel: Relevance, layer: str, path: str | os.PathLike[str]) -> None:
    """Bar plot of one layer's unit scores (one bar per filter / neuron)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = rel.units[layer].float()
    fig, ax = plt.subplots(figsize=(max(4.0, min(16.0, 0.12 * len(scores) + 2)), 2.8))
    ax.bar(range(len(scores)), scores.numpy(), color="tab:blue", width=0.85)
    ax.set_xlabel("unit (filter / neuron)")
    ax.set_ylabel("relevance")
    ax.set_title(f"{rel.criterion}: {layer} ({len(scores)} units)", fontsize=10)
    fig.tight_layout()
    try:
        atomic_save_figure(fig, path, dpi=100)
    finally:
        plt.close(fig)


def explain_checkpoint(ckpt: Any, bundle: Any, out_dir: str | os.PathLike[str], *,
                       criterion: str | Criterion = "deeplift", samples: int = 512,
                       seed: int = 0, images: int = 8, batch_size: int = 128) -> Explanation:
    """Score `ckpt.model` on `samples` training images of `bundle` and write the files
    listed in the module docstring into `out_dir` (created if missing).

    `images` test images (seeded choice) get input-space DeepLIFT heatmaps against the
    criterion's reference when it is deeplift with zeros/blur, else the black image.
    """
    from xaicompress.data import dataset_tensors, subset
    from xaicompress.relevance.inputmaps import input_attribution, save_heatmap_grid

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise XaiCompressError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    check_writable(out / "relevance.safetensors")
    crit = get_criterion(criterion) if isinstance(criterion, str) else criterion
    model = ckpt.model
    rel = compute_relevance(model, crit, bundle, samples=samples, batch_size=batch_size,
                            seed=seed)
    files: dict[str, Path] = {"scores": out / "relevance.safetensors"}
    save_relevance(rel, files["scores"])
    (out / "units").mkdir(exist_ok=True)
    for layer in rel.layers():
        files[f"units/{layer}"] = out / "units" / f"{layer}.png"
        plot_unit_relevance(rel, layer, files[f"units/{layer}"])
    if images > 0:
        x, y = dataset_tensors(subset(bundle.test, images, seed=seed), images)
        reference = "blur" if getattr(crit, "name", "") == "deeplift" and getattr(
            getattr(crit, "reference", None), "kind", "") == "blur" else "zeros"
        maps = input_attribution(model, x, reference=reference, pixel_mean=bundle.mean,
                                 pixel_std=bundle.std)
        with torch.no_grad():
            pred = model.eval()(x).argmax(1)
        names = getattr(bundle, "classes", None) or [str(i) for i in range(bundle.num_classes)]
        titles = [f"true {names[int(a)]} / pred {names[int(b)]}" for a, b in zip(y, pred,
                                                                              strict=True)]
        files["heatmaps"] = out / "heatmaps.png"
        save_heatmap_grid(bundle.input_to_pixel(x), maps, files["heatmaps"], titles=titles)
    return Explanation(rel, files)
