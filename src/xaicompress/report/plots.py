"""PNG plots of a `compress` run: accuracy and size per stage, the layers of the final
model, and input-space DeepLIFT heatmaps before and after; plus the accuracy-vs-size plot
of `compare`. Matplotlib with the Agg backend (no display needed); written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from xaicompress.atomic import atomic_save_figure  # noqa: E402
from xaicompress.data import DatasetBundle, dataset_tensors, subset  # noqa: E402
from xaicompress.device import to_model_device
from xaicompress.report.fidelity import input_maps, map_similarity  # noqa: E402


def _save(fig: Any, path: str | Path) -> None:
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)


def plot_stages(report: dict[str, Any], path: str | Path) -> None:
    """Accuracy (%) and packed size (KB, log scale) after every stage, with fidelity."""
    names = ["baseline"] + [s["name"] for s in report["stages"]]
    acc = [report["baseline"]["accuracy"]] + [s["accuracy"] for s in report["stages"]]
    size = [report["baseline"]["size_bytes"] / 1024] + [s["size_bytes"] / 1024
                                                        for s in report["stages"]]
    cos = [1.0] + [s["fidelity"]["cosine"] for s in report["stages"]]
    x = range(len(names))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(x, acc, "o-", color="tab:blue", label="test accuracy %")
    a1.set_ylabel("accuracy %")
    a1.set_title(f"{report['title']}: accuracy per stage")
    t = a1.twinx()
    t.plot(x, cos, "s--", color="tab:green", label="explanation cosine")
    t.set_ylim(0, 1.05)
    t.set_ylabel("cosine of DeepLIFT maps vs original")
    a1.legend(loc="lower left")
    t.legend(loc="lower right")
    bars = a2.bar(x, size, color="tab:orange")
    a2.set_yscale("log")
    a2.set_ylabel("packed size KB (log)")
    a2.set_title(f"size per stage ({report['compression_ratio']:.1f}x overall)")
    for b, s in zip(bars, size, strict=True):
        a2.annotate(f"{s:.1f}", (b.get_x() + b.get_width() / 2, s), ha="center",
                    va="bottom", fontsize=8)
    for ax in (a1, a2):
        ax.set_xticks(list(x), names, rotation=20, ha="right")
    _save(fig, path)


def plot_search(search: list[dict[str, Any]], base_val: float, path: str | Path) -> None:
    """The accuracy budget's search: every probe's validation accuracy against its packed
    size, one series per searched stage, the floor each had to keep and the chosen probe."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, rec in enumerate(search):
        color = f"C{k % 10}"
        probes = rec["probes"]
        ax.plot([p["size_bytes"] / 1024 for p in probes], [p["val_accuracy"] for p in probes],
                "o:", color=color, label=f"{rec['name']} ({rec['field']})", alpha=0.8)
        for p in probes:
            ax.annotate(f"{p['value']:g}", (p["size_bytes"] / 1024, p["val_accuracy"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
            if p["value"] == rec["chosen"]:
                ax.plot(p["size_bytes"] / 1024, p["val_accuracy"], "*", color=color,
                        markersize=14)
        ax.axhline(rec["floor"], color=color, linestyle="--", linewidth=0.8)
    ax.axhline(base_val, color="black", linewidth=0.8, label="baseline (validation)")
    ax.set_xscale("log")
    ax.set_xlabel("packed size KB (log)")
    ax.set_ylabel("validation accuracy %")
    ax.set_title("accuracy budget: probes (star = chosen, dashed = floor)")
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def plot_layers(layers: dict[str, dict[str, Any]], path: str | Path) -> None:
    """Per layer: share of output units kept, sparsity, and bits per stored weight."""
    names = list(layers)
    kept = [lay["units"][1] / max(1, lay["units"][0]) * 100 for lay in layers.values()]
    sparsity = [lay["sparsity"] * 100 for lay in layers.values()]
    bits = [lay["bits"] for lay in layers.values()]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, vals, title, color in ((axes[0], kept, "units kept %", "tab:blue"),
                                   (axes[1], sparsity, "weights pruned %", "tab:red"),
                                   (axes[2], bits, "bits per weight", "tab:purple")):
        ax.bar(range(len(names)), vals, color=color)
        ax.set_title(title)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    for i, lay in enumerate(layers.values()):
        if lay["clusters"]:
            axes[2].annotate(f"k={lay['clusters']}", (i, lay["bits"]), ha="center",
                             va="bottom", fontsize=7)
        axes[0].annotate(f"{lay['units'][1]}", (i, kept[i]), ha="center", va="bottom",
                         fontsize=7)
    _save(fig, path)


def plot_heatmaps(original: nn.Module, compressed: nn.Module, bundle: DatasetBundle, n: int,
                  path: str | Path, seed: int = 0) -> None:
    """n test images; the original's and the compressed model's input-space DeepLIFT maps
    (summed over channels, explaining the original's predicted class)."""
    x, _ = dataset_tensors(subset(bundle.test, n, seed=seed))
    with torch.no_grad():
        target = original.eval()(to_model_device(x, original)).argmax(1).cpu()
        pred = compressed.eval()(to_model_device(x, compressed)).argmax(1).cpu()
    before = input_maps(original, x, target, bundle)
    after = input_maps(compressed, x, target, bundle)
    cos, _ = map_similarity(before, after)
    pixels = bundle.input_to_pixel(x).clamp(0, 1)
    fig, axes = plt.subplots(3, len(x), figsize=(2.2 * len(x), 6.6), squeeze=False)
    for i in range(len(x)):
        img = pixels[i].permute(1, 2, 0).numpy()
        axes[0, i].imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray")
        axes[0, i].set_title(f"original says {int(target[i])}, compressed {int(pred[i])}",
                            fontsize=7)
        for row, maps in ((1, before), (2, after)):
            m = maps[i].sum(0)
            lim = float(m.abs().max()) or 1.0
            axes[row, i].imshow(m.numpy(), cmap="bwr", vmin=-lim, vmax=lim)
        axes[2, i].set_title(f"cosine {float(cos[i]):.2f}", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("image")
    axes[1, 0].set_ylabel("original")
    axes[2, 0].set_ylabel("compressed")
    fig.suptitle("input-space DeepLIFT maps (red = for the class, blue = against)")
    _save(fig, path)


def plot_compare(summary: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Accuracy vs packed size per stage, one line per criterion (mean over seeds, error
    bars = std)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for crit, curve in summary.items():
        xs = [p["size_kb"]["mean"] for p in curve]
        ys = [p["accuracy"]["mean"] for p in curve]
        es = [p["accuracy"]["std"] for p in curve]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=crit)
    ax.set_xscale("log")
    ax.set_xlabel("packed size KB (log) after each stage")
    ax.set_ylabel("test accuracy %")
    ax.set_title(title or "accuracy vs size per criterion")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
