"""Helpers shared by the benchmark scripts: result paths, mean ± std, writers."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
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
