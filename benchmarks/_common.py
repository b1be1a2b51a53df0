"""Helpers shared by the benchmark scripts: seeds, cached base models, mean ± std."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CACHE = RESULTS / "cache"
DOCS_RESULTS = ROOT / "docs" / "results"
IMG = ROOT / "docs" / "img"


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    if len(values) == 1:
        return float(values[0]), 0.0
    return float(statistics.mean(values)), float(statistics.stdev(values))


def fmt(values: list[float], digits: int = 2) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def write_json(name: str, data: Any) -> Path:
    from xaicompress.atomic import atomic_write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / f"{name}.json"
    atomic_write_text(p, json.dumps(data, indent=2))
    return p


def write_section(name: str, markdown: str) -> Path:
    from xaicompress.atomic import atomic_write_text

    DOCS_RESULTS.mkdir(parents=True, exist_ok=True)
    p = DOCS_RESULTS / f"{name}.md"
    atomic_write_text(p, markdown.rstrip() + "\n")
    return p


def base_model(model: str, seed: int, data: str = "mnist5k", **train_kw: Any):  # noqa: ANN201
    """Train (or reuse from the cache) the base model of a benchmark for one seed."""
    from xaicompress.checkpoint import load_checkpoint, save_checkpoint
    from xaicompress.train import train_checkpoint

    CACHE.mkdir(parents=True, exist_ok=True)
    p = CACHE / f"base_{model}_{data.replace(':', '_')}_s{seed}.safetensors"
    if p.exists():
        return load_checkpoint(p)
    ckpt = train_checkpoint(model, data, seed=seed, **train_kw)
    save_checkpoint(ckpt, p)
    return ckpt
