"""Helpers shared by the benchmark scripts: result paths, mean ± std, writers, the one
--seeds format and the one base-model cache."""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xaicompress.checkpoint import Checkpoint

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS_RESULTS = ROOT / "docs" / "results"
IMG = ROOT / "docs" / "img"


def machine() -> str:
    """The CPU and torch thread count a row was measured with: training on another CPU
    rounds differently and the difference grows over the epochs (docs/design.md), so rows
    of one seed from two machines are not paired."""
    import os
    import platform

    import torch

    cpu, isa = platform.processor() or platform.machine(), ""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    for line in info:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            cpu = value.strip()
        elif key.strip() == "flags":
            flags = value.split()
            isa = " avx512" if "avx512f" in flags else " avx2" if "avx2" in flags else ""
            break
    return (f"{cpu}{isa}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s)")


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    if len(values) == 1:
        return float(values[0]), 0.0
    return float(statistics.mean(values)), float(statistics.stdev(values))


def fmt(values: list[float], digits: int = 2) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def write_json(name: str, data: Any, path: Path | None = None) -> Path:
    """Write `data` to benchmarks/results/<name>.json, or to `path` when given."""
    from xaicompress.atomic import atomic_write_text

    p = path or RESULTS / f"{name}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, json.dumps(data, indent=2))
    return p


def write_section(name: str, markdown: str) -> Path:
    from xaicompress.atomic import atomic_write_text

    DOCS_RESULTS.mkdir(parents=True, exist_ok=True)
    p = DOCS_RESULTS / f"{name}.md"
    atomic_write_text(p, markdown.rstrip() + "\n")
    return p


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]: the one --seeds format of every benchmark script."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return seeds


def add_seeds(ap: argparse.ArgumentParser, default: str = "0,1,2", flag: str = "--seeds",
              help: str = "comma-separated seeds") -> None:
    """Declare a comma-separated seed list option (parsed to list[int])."""
    ap.add_argument(flag, type=parse_seeds, default=parse_seeds(default), help=help)


CACHE = RESULTS / "cache"


def _base_path(model: str, data: str, seed: int, train_kw: dict[str, Any]) -> Path:
    key = json.dumps({"model": model, "data": data, "seed": seed, **train_kw}, sort_keys=True)
    return CACHE / "base" / f"{model}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def base_model_cached(model: str, data: str = "mnist5k", *, seed: int, **train_kw: Any) -> bool:
    """Whether base_model(...) with these arguments would come from the cache."""
    return _base_path(model, data, seed, train_kw).is_file()


def base_model(model: str, data: str = "mnist5k", *, seed: int,
               **train_kw: Any) -> tuple[Checkpoint, float | None]:
    """A trained base model, shared by every script through one cache keyed by the training
    config (model, data, seed and every train_checkpoint argument). Returns the checkpoint and
    the training wall time (None when it came from the cache)."""
    from xaicompress.checkpoint import load_checkpoint, save_checkpoint
    from xaicompress.train import train_checkpoint

    path = _base_path(model, data, seed, train_kw)
    if path.is_file():
        return load_checkpoint(path), None
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt = train_checkpoint(model, data, seed=seed, **train_kw)
    seconds = time.perf_counter() - t0
    save_checkpoint(ckpt, path)  # atomic: a concurrent script never reads half a file
    print(f"trained {model} on {data} seed {seed}: {ckpt.metrics['accuracy']:.2f}% "
          f"({seconds:.0f} s)", flush=True)
    return ckpt, seconds
