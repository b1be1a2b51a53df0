"""`compare`: the same pipeline once per criterion and seed, side by side.

The criterion replaces the one of every stage that has one. All runs share one stage cache
(OUT/cache), so the baseline of a seed is trained once and reused by every criterion, and a
rerun of `compare` only computes what is missing. Writes compare.json, compare.md (mean ±
std over seeds) and compare.png (accuracy vs packed size after each stage).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from xaicompress.atomic import atomic_write_text
from xaicompress.errors import XaiCompressError
from xaicompress.pipeline.config import MAX_SEED, CriterionStage, PipelineConfig
from xaicompress.pipeline.run import check_out_dir, prepare_out_dir, read_inputs, run_pipeline
from xaicompress.report.report import report_json

#: the most criteria or seeds one `compare` runs (each is a whole pipeline run)
MAX_ITEMS = 100
FINAL_KEYS = ("accuracy", "accuracy_drop", "size_kb", "compression_ratio", "cosine",
              "top10_overlap", "agreement")


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values]
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1
            else 0.0, "n": len(vals)}


def parse_list(text: str, option: str, kind: type = str) -> list[Any]:
    """'a,b,c' -> ['a', 'b', 'c'] (converted by `kind`), no empties, no duplicates."""
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    if not items:
        raise XaiCompressError(f"{option} {text!r}: expected a comma-separated list")
    try:
        vals = [kind(s) for s in items]
    except ValueError:
        raise XaiCompressError(f"{option} {text!r}: expected {kind.__name__} values") from None
    if len(set(vals)) != len(vals):
        raise XaiCompressError(f"{option} {text!r}: lists a value twice")
    if kind is int and any(not 0 <= v <= MAX_SEED for v in vals):
        raise XaiCompressError(f"{option} {text!r}: seeds must be in 0..{MAX_SEED}")
    if len(vals) > MAX_ITEMS:
        raise XaiCompressError(f"{option} {text!r}: {len(vals)} values, at most {MAX_ITEMS}")
    return vals


def _folder_name(criterion: str, seed: int) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in criterion)
    return f"{safe}-seed{seed}"


def run_compare(config: PipelineConfig, criteria: Sequence[str], seeds: Sequence[int],
                out_dir: str | os.PathLike[str], *, plots: bool = True,
                echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run `config` for every criterion x seed into OUT/runs/<criterion>-seed<s>/; returns
    (and writes) the compare.json dict."""
    if not any(isinstance(s, CriterionStage) for s in config.stages):
        raise XaiCompressError("compare: the config has no stage with a criterion to vary")
    if not criteria or not seeds:
        raise XaiCompressError("compare: give at least one criterion and one seed")
    variants = {c: config.with_criterion(c) for c in criteria}  # validates every criterion
    check_out_dir(out_dir)
    read_inputs(config)  # bad data or checkpoint: an error before any folder is made
    out = prepare_out_dir(out_dir)
    (out / "runs").mkdir(exist_ok=True)
    say = echo or (lambda _msg: None)
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        for crit in criteria:
            say(f"criterion {crit}, seed {seed}")
            res = run_pipeline(variants[crit].with_seed(seed), out / "runs" / _folder_name(
                crit, seed), cache_dir=out / "cache", plots=False, echo=echo)
            r = res.report
            runs.append({
                "criterion": crit, "seed": seed, "folder": f"runs/{_folder_name(crit, seed)}",
                "cached": res.cached,
                "compression_ratio": r["compression_ratio"],
                "accuracy_drop": r["accuracy_drop"], "baseline": r["baseline"],
                "final": r["final"], "fidelity": r["fidelity"]["final"],
                "stages": [{"name": s["name"], "accuracy": s["accuracy"],
                            "size_bytes": s["size_bytes"], "cosine": s["fidelity"]["cosine"]}
                           for s in r["stages"]],
            })
    result = {"title": config.title(), "criteria": list(criteria), "seeds": list(seeds),
              "summary": summarise(runs, criteria), "curves": curves(runs, criteria),
              "runs": runs, "config": config.model_dump(mode="json")}
    atomic_write_text(out / "compare.json", report_json(result))
    atomic_write_text(out / "compare.md", compare_markdown(result))
    if plots:
        from xaicompress.report.plots import plot_compare

        plot_compare(result["curves"], out / "compare.png", title=f"{result['title']}: "
                     f"accuracy vs size ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
    return result


def summarise(runs: list[dict[str, Any]], criteria: Sequence[str]) -> dict[str, Any]:
    """criterion -> metric -> mean/std/n over seeds of the final model."""
    out: dict[str, Any] = {}
    for crit in criteria:
        rs = [r for r in runs if r["criterion"] == crit]
        vals = {"accuracy": [r["final"]["accuracy"] for r in rs],
                "accuracy_drop": [r["accuracy_drop"] for r in rs],
                "size_kb": [r["final"]["size_bytes"] / 1024 for r in rs],
                "compression_ratio": [r["compression_ratio"] for r in rs],
                "cosine": [r["fidelity"]["cosine"] for r in rs],
                "top10_overlap": [r["fidelity"]["top10_overlap"] for r in rs],
                "agreement": [r["fidelity"]["agreement"] for r in rs]}
        out[crit] = {k: mean_std(v) for k, v in vals.items()}
    return out


def curves(runs: list[dict[str, Any]], criteria: Sequence[str]) -> dict[str, Any]:
    """criterion -> per stage (baseline first): accuracy and size KB, mean/std over seeds."""
    out: dict[str, Any] = {}
    for crit in criteria:
        rs = [r for r in runs if r["criterion"] == crit]
        points = [{"name": "baseline",
                   "accuracy": mean_std([r["baseline"]["accuracy"] for r in rs]),
                   "size_kb": mean_std([r["baseline"]["size_bytes"] / 1024 for r in rs])}]
        for i, st in enumerate(rs[0]["stages"]):
            points.append({"name": st["name"],
                           "accuracy": mean_std([r["stages"][i]["accuracy"] for r in rs]),
                           "size_kb": mean_std([r["stages"][i]["size_bytes"] / 1024
                                                for r in rs])})
        out[crit] = points
    return out


def pm(stat: dict[str, float], digits: int = 2) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def compare_markdown(result: dict[str, Any]) -> str:
    n = len(result["seeds"])
    lines = [f"# {result['title']}: criteria compared", "",
             f"Final model after every stage, mean ± std over {n} seed{'s' if n > 1 else ''} "
             f"({', '.join(map(str, result['seeds']))}).", "",
             "| criterion | accuracy % | drop pt | packed KB | x smaller | cosine | top-10% "
             "| agree % |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for crit, s in result["summary"].items():
        lines.append(f"| {crit} | {pm(s['accuracy'])} | {pm(s['accuracy_drop'])} | "
                     f"{pm(s['size_kb'])} | {pm(s['compression_ratio'], 1)} | "
                     f"{pm(s['cosine'], 3)} | {pm(s['top10_overlap'], 3)} | "
                     f"{pm(s['agreement'], 1)} |")
    lines += ["", "Accuracy after each stage (mean ± std):", "",
              "| criterion | " + " | ".join(p["name"] for p in
                                            next(iter(result["curves"].values()))) + " |",
              "|---|" + "---:|" * len(next(iter(result["curves"].values())))]
    for crit, pts in result["curves"].items():
        lines.append(f"| {crit} | " + " | ".join(pm(p["accuracy"]) for p in pts) + " |")
    lines += ["", "![accuracy vs size](compare.png)"]
    return "\n".join(lines) + "\n"
