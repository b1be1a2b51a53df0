"""Do a benchmark's figures reproduce? Compare two runs of the same benchmark JSON.

    python benchmarks/reproduction.py OLD.json NEW.json [OLD2.json NEW2.json ...] \
        [--out docs/results/reproduction.md]

Every accuracy a benchmark measured per seed (pruning's `cells`, the `rows` of
weight_sharing / mixed_precision) is grouped by its setting; a setting reproduces when
the two runs' means differ by at most twice the standard error of that difference
(sqrt(s_old^2 / n_old + s_new^2 / n_new), at least `FLOOR` points: one test image of
1,000 is 0.1 pt). A rerun that changes what is measured (another training split of the
baselines, another default) shows here as the settings that moved, largest first.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

#: measured accuracies compared (points)
METRICS = ("acc_pruned", "acc_ft", "acc", "acc_qat")
#: the fields of a flat row that name its setting
SETTING = ("model", "criterion", "method", "variant", "setting", "k", "avg_bits")
#: the smallest difference of means called a change (points)
FLOOR = 0.2


def samples(data: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], list[float]]:
    """(setting path..., metric) -> per-seed values, from any nesting of dicts whose leaves
    are lists of per-seed records (pruning) or a flat `rows` list (sharing, quantization)."""
    out: dict[tuple[str, ...], list[float]] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            if k in ("ft_rows", "variant_rows", "rows") and isinstance(v, list):
                for key, vals in _rows(v).items():
                    out.setdefault((*path, k, *key), []).extend(vals)
            elif isinstance(v, (dict, list)):
                for key, vals in samples(v, (*path, str(k))).items():
                    out.setdefault(key, []).extend(vals)
    elif isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
        for rec in data:
            for m in METRICS:
                if isinstance(rec.get(m), (int, float)):
                    out.setdefault((*path, m), []).append(float(rec[m]))
    return out


def _rows(rows: list[dict[str, Any]]) -> dict[tuple[str, ...], list[float]]:
    out: dict[tuple[str, ...], list[float]] = {}
    for r in rows:
        setting = tuple(f"{f}={r[f]}" for f in SETTING if f in r)
        for m in METRICS:
            if isinstance(r.get(m), (int, float)):
                out.setdefault((*setting, m), []).append(float(r[m]))
    return out


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    a, b = samples(old), samples(new)
    rows = []
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        sx = statistics.stdev(x) if len(x) > 1 else 0.0
        sy = statistics.stdev(y) if len(y) > 1 else 0.0
        noise = max(FLOOR, 2 * math.sqrt(sx ** 2 / len(x) + sy ** 2 / len(y)))
        diff = statistics.fmean(y) - statistics.fmean(x)
        rows.append({"setting": " / ".join(key), "old": statistics.fmean(x), "n_old": len(x),
                     "new": statistics.fmean(y), "n_new": len(y), "diff": diff,
                     "noise": noise, "within": abs(diff) <= noise})
    return rows


def markdown(name: str, rows: list[dict[str, Any]], shown: int = 8) -> str:
    ok = sum(r["within"] for r in rows)
    diffs = [r["diff"] for r in rows]
    lines = [f"**{name}**: {ok} of {len(rows)} settings within noise "
             f"({100 * ok / max(1, len(rows)):.0f}%); new minus old mean "
             f"{statistics.fmean(diffs):+.2f} pt (median {statistics.median(diffs):+.2f}) "
             "over all settings." if rows else f"**{name}**: no setting in common."]
    moved = sorted((r for r in rows if not r["within"]), key=lambda r: -abs(r["diff"]))
    if moved:
        lines += ["", "| setting (largest moves) | old | new | diff | noise |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['setting']} | {r['old']:.2f} (n={r['n_old']}) | {r['new']:.2f} "
                  f"(n={r['n_new']}) | {r['diff']:+.2f} | {r['noise']:.2f} |"
                  for r in moved[:shown]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pairs", nargs="+", help="OLD.json NEW.json, repeated")
    ap.add_argument("--out", default=None, help="write the markdown here")
    args = ap.parse_args(argv)
    if len(args.pairs) % 2:
        ap.error("give the files in pairs: OLD.json NEW.json")
    parts = []
    for old, new in zip(args.pairs[::2], args.pairs[1::2], strict=True):
        rows = compare(json.loads(Path(old).read_text()), json.loads(Path(new).read_text()))
        parts.append(markdown(Path(new).stem, rows))
    text = "\n\n".join(parts) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
