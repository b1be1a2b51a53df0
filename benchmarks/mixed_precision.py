"""Mixed-precision benchmark: relevance-guided bit allocation vs uniform bits vs unweighted
error, without QAT and after 1 epoch of QAT, and the per-layer bits chosen.

lenet5 and resnet20 on mnist5k, average budgets 2, 2.5, 3, 4, 6 bits per weight. Methods
(all through `xaicompress.quant.integer.quantize`):
  deeplift / taylor   MILP on the relevance-weighted error sum_w R_w (w - Q_b(w))^2
  none                MILP on the unweighted squared error
  uniform             the same bits for every layer (floor of the budget)
Trained base models are cached per (model, seed) in benchmarks/results/cache/ as
base_<model>_s<seed>.safetensors. Writes benchmarks/results/mixed_precision.json,
docs/img/bits_<model>.png and docs/results/mixed_precision.md.

    python benchmarks/mixed_precision.py --seeds 0 1 2     # full run
    python benchmarks/mixed_precision.py --quick           # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import IMG, RESULTS, ROOT, add_seeds  # noqa: E402
from _common import base_model as shared_base_model  # noqa: E402

from xaicompress.atomic import atomic_save_figure, atomic_write_text
from xaicompress.checkpoint import Checkpoint
from xaicompress.data import load_dataset
from xaicompress.quant.integer import quantize
from xaicompress.quant.qat import qat_train
from xaicompress.relevance import (
    Criterion,
    Relevance,
    compute_relevance,
    get_criterion,
    list_criteria,
)
from xaicompress.train import accuracy

DOC = ROOT / "docs" / "results" / "mixed_precision.md"
#: how each base model is trained (resnet20: 6 epochs of Adam reach ~98% on mnist5k)
TRAIN = {"lenet5": {"epochs": 15, "lr": 3e-3}, "resnet20": {"epochs": 6, "lr": 3e-3}}
#: method label -> (criterion, allocation)
QAT_LR = 1e-3
NOTES = """Notes:
- At an average of exactly 2 bits every method is forced to 2 bits in every layer (2 is the
  narrowest width offered), so allocation cannot differ there; the allocation comparison
  starts at 2.5 bits (uniform at 2.5 is the floor, 2 bits; at 3 bits all use the same
  budget). Differences at 2 bits between criteria come only from the grid.
- lenet5: fc1 holds 78% of the weights, so the MILP has little room; it spends spare bits on
  the small conv layers. resnet20's layers are more balanced.
- QAT uses a fixed grid (the PTQ scales), Adam at 1e-3 and a straight-through estimator; at
  6 bits it can lose a little accuracy (the learning rate suits low bit widths)."""
METHODS = {"deeplift": ("deeplift", "milp"), "taylor": ("taylor", "milp"),
           "none": ("none", "milp"), "uniform": ("none", "uniform")}


class _Fixed(Criterion):
    """A criterion that returns relevance computed once (scores do not depend on budget)."""

    needs_data = False

    def __init__(self, rel: Relevance, label: str) -> None:
        super().__init__()
        self.rel, self.name = rel, label  # type: ignore[misc]

    def score(self, model: Any, loader: Any = None) -> Relevance:
        return self.rel


def base_model(model: str, seed: int, quick: bool) -> tuple[Checkpoint, float | None]:
    """(checkpoint, training seconds or None when reused from the shared cache)."""
    kw = {"epochs": 2, "lr": 3e-3} if quick else TRAIN[model]
    return shared_base_model(model, seed=seed, **kw)


def run(models: list[str], seeds: list[int], budgets: list[float], methods: list[str],
        qat_budgets: dict[str, list[float]], qat_epochs: float, samples: int,
        quick: bool) -> dict[str, Any]:
    bundle = load_dataset("mnist5k", seed=0)
    rows: list[dict[str, Any]] = []
    train_seconds: dict[str, float] = {}
    for model in models:
        for seed in seeds:
            base, secs = base_model(model, seed, quick)
            if secs is not None:
                train_seconds[f"{model}_s{seed}"] = secs
            base_acc = accuracy(base.model, bundle.test)
            rels: dict[str, Criterion] = {}
            for label in methods:
                crit = METHODS[label][0]
                if crit not in rels:
                    t0 = time.perf_counter()
                    rel = compute_relevance(base.model, get_criterion(crit), bundle,
                                            samples=samples, seed=seed)
                    print(f"{model} s{seed}: {crit} relevance in "
                          f"{time.perf_counter() - t0:.1f} s", flush=True)
                    rels[crit] = _Fixed(rel, crit)
            for label in methods:
                crit, alloc = METHODS[label]
                done: dict[tuple, dict[str, Any]] = {}
                for avg in budgets:
                    t0 = time.perf_counter()
                    q = quantize(base, rels[crit], bundle, avg_bits=avg, allocation=alloc,
                                 seed=seed, samples=samples)
                    step = q.history[-1]
                    key = tuple(step["bits"].values())
                    row = {"model": model, "seed": seed, "method": label, "avg_bits": avg,
                           "base_acc": base_acc, "bits": step["bits"],
                           "achieved_avg_bits": step["achieved_avg_bits"],
                           "weighted_error": step["weighted_error"]}
                    if key in done:  # same bits, same scales: same model (uniform 2 = 2.5)
                        row.update({k: done[key][k] for k in ("acc", "acc_qat")})
                    else:
                        row["acc"] = accuracy(q.model, bundle.test)
                        row["acc_qat"] = None
                        if avg in qat_budgets.get(model, budgets):
                            # = quantize(..., qat_epochs=E) without redoing the allocation
                            qq = qat_train(q.copy(), bundle.train, epochs=qat_epochs,
                                           lr=QAT_LR, seed=seed)
                            row["acc_qat"] = accuracy(qq.model, bundle.test)
                        done[key] = row
                    row["seconds"] = time.perf_counter() - t0
                    rows.append(row)
                    qat = "-" if row["acc_qat"] is None else f"{row['acc_qat']:.2f}"
                    print(f"{model} s{seed} {label:8s} avg {avg}: base {base_acc:.2f} "
                          f"ptq {row['acc']:.2f} qat {qat} bits {list(key)} "
                          f"({row['seconds']:.1f} s)", flush=True)
    return {"rows": rows, "train_seconds": train_seconds, "qat_epochs": qat_epochs,
            "samples": samples, "budgets": budgets, "methods": methods}


def _ms(vals: list[float]) -> str:
    if not vals:
        return "-"
    m = statistics.mean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{m:+.2f} ± {s:.2f}"


def _sel(rows: list[dict], **kw: Any) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in kw.items())]


def report(res: dict[str, Any]) -> str:
    rows = res["rows"]
    seeds = sorted({r["seed"] for r in rows})
    out = ["## Mixed-precision integer quantization", "",
           f"Per-output-channel symmetric integer weights (MSE-optimal clipping), bits per layer "
           f"from the MILP under an average budget; mnist5k, seeds {seeds}, {res['samples']} "
           f"training samples for relevance. Accuracy change vs the float model in points "
           f"(mean ± std over seeds), without QAT and after {res['qat_epochs']} epoch of QAT "
           "(straight-through estimator). `none` = unweighted squared error; `uniform` = the "
           "same bits everywhere (floor of the budget).", ""]
    for model in sorted({r["model"] for r in rows}, key=lambda m: list(TRAIN).index(m)):
        base = [r["base_acc"] for r in _sel(rows, model=model, method=rows[0]["method"],
                                            avg_bits=rows[0]["avg_bits"])]
        mseeds = sorted({r["seed"] for r in _sel(rows, model=model)})
        out += [f"### {model} (float: {statistics.mean(base):.2f}%, seeds {mseeds})", "",
                "| avg bits | method | Δacc no QAT | Δacc 1 ep QAT | bits per layer (seed "
                f"{seeds[0]}) |", "|---|---|---|---|---|"]
        for avg in res["budgets"]:
            for method in res["methods"]:
                sel = _sel(rows, model=model, method=method, avg_bits=avg)
                if not sel:
                    continue
                qat = [r["acc_qat"] - r["base_acc"] for r in sel if r["acc_qat"] is not None]
                bits = "/".join(str(b) for b in sel[0]["bits"].values())
                out.append(f"| {avg:g} | {method} | {_ms([r['acc'] - r['base_acc'] for r in sel])}"
                           f" | {_ms(qat)} | {bits} |")
        out.append("")
    out += ["### Goals", ""] + goals(res) + ["", NOTES, ""]
    if res["train_seconds"]:
        out += ["Base models trained in this run (seconds, 2 shared cores): " + ", ".join(
            f"{k} {v:.0f}" for k, v in res["train_seconds"].items()), ""]
    return "\n".join(out)


def goals(res: dict[str, Any]) -> list[str]:
    rows = res["rows"]
    lines = []

    def delta(model: str, method: str, avg: float, qat: bool) -> list[float]:
        key = "acc_qat" if qat else "acc"
        return [r[key] - r["base_acc"] for r in _sel(rows, model=model, method=method,
                                                      avg_bits=avg) if r[key] is not None]

    best = "deeplift" if "deeplift" in res["methods"] else res["methods"][0]
    for model in sorted({r["model"] for r in rows}):
        d4 = delta(model, best, 4, False)
        if d4:
            m = statistics.mean(d4)
            lines.append(f"- {model}, {best}, avg 4 bits, no QAT: {m:+.2f} pt "
                         f"({'met' if m >= -0.3 else 'missed'}: goal within 0.3 pt)")
        d25 = delta(model, best, 2.5, True)
        if d25:
            m = statistics.mean(d25)
            lines.append(f"- {model}, {best}, avg 2.5 bits, 1 epoch QAT: {m:+.2f} pt "
                         f"({'met' if m >= -1 else 'missed'}: goal within 1 pt)")
        if best != "uniform" and "uniform" in res["methods"]:
            worse = []
            for avg in res["budgets"]:
                a = delta(model, best, avg, False)
                u = delta(model, "uniform", avg, False)
                if a and u and statistics.mean(a) < statistics.mean(u):
                    worse.append(f"{avg:g} ({statistics.mean(a) - statistics.mean(u):+.2f})")
            lines.append(f"- {model}: {best} below uniform (no QAT) at budgets: "
                         f"{', '.join(worse) if worse else 'none'}")
            for avg in (2, 2.5, 3):
                a, u = delta(model, best, avg, False), delta(model, "uniform", avg, False)
                n = delta(model, "none", avg, False)
                if not (a and u):
                    continue
                gap = statistics.mean(a) - statistics.mean(u)
                goal = (f" ({'met' if gap >= 2 else 'missed'}: goal >= +2 pt)"
                        if model == "resnet20" and avg == 2 else "")
                vs_none = (f"; − unweighted: {statistics.mean(a) - statistics.mean(n):+.2f} pt"
                           if n else "")
                lines.append(f"- {model}: {best} − uniform at avg {avg:g} bits, no QAT: "
                             f"{gap:+.2f} pt{goal}{vs_none}")
    return lines


def plot(res: dict[str, Any], budget: float) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rows = res["rows"]
    for model in sorted({r["model"] for r in rows}):
        sel = {m: _sel(rows, model=model, method=m, avg_bits=budget) for m in res["methods"]}
        sel = {m: v for m, v in sel.items() if v}
        if not sel:
            continue
        layers = list(next(iter(sel.values()))[0]["bits"])
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(layers) + 2), 3.6))
        width = 0.8 / len(sel)
        for i, (m, rs) in enumerate(sel.items()):
            # mean over seeds: the allocation may differ per seed
            vals = [statistics.mean(r["bits"][n] for r in rs) for n in layers]
            ax.bar([j + i * width for j in range(len(layers))], vals, width, label=m)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))])
        ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("bits (mean over seeds)")
        ax.set_title(f"{model}: bits per layer at an average of {budget:g} bits")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = IMG / f"bits_{model}.png"
        IMG.mkdir(parents=True, exist_ok=True)
        atomic_save_figure(fig, p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_seeds(ap)
    ap.add_argument("--models", nargs="+", default=["lenet5", "resnet20"])
    ap.add_argument("--budgets", type=float, nargs="+", default=[2, 2.5, 3, 4, 6])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--qat-epochs", type=float, default=1)
    ap.add_argument("--resnet-qat-budgets", type=float, nargs="+", default=[2.5],
                    help="QAT budgets for resnet20 (each QAT epoch is costly on 2 cores)")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="smoke run: lenet5, 1 seed")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the Markdown and plots from the saved JSON")
    args = ap.parse_args()
    torch.set_num_threads(1)
    avail = set(list_criteria())
    methods = [m for m in args.methods if METHODS[m][0] in avail]
    if args.quick:
        args.seeds, args.models, args.budgets, args.samples = [0], ["lenet5"], [2, 4], 64
        args.qat_epochs = 0.2
    if args.report_only:
        res = json.loads((RESULTS / "mixed_precision.json").read_text())
        plot(res, 3 if 3 in res["budgets"] else res["budgets"][0])
        atomic_write_text(DOC, report(res) + "\n")
        print(report(res))
        return
    t0 = time.perf_counter()
    res = run(args.models, args.seeds, args.budgets, methods,
              {"resnet20": args.resnet_qat_budgets}, args.qat_epochs, args.samples, args.quick)
    res["seconds"] = time.perf_counter() - t0
    name = "mixed_precision_quick" if args.quick else "mixed_precision"
    RESULTS.mkdir(parents=True, exist_ok=True)
    prev = RESULTS / f"{name}.json"
    if prev.is_file() and not args.quick:
        # Models run separately (e.g. resnet20 later) merge into one result file.
        old = json.loads(prev.read_text())
        if old.get("budgets") == res["budgets"] and old.get("methods") == res["methods"]:
            ran = {(m, sd) for m in args.models for sd in args.seeds}
            keep = [r for r in old["rows"] if (r["model"], r["seed"]) not in ran]
            res["rows"] = keep + res["rows"]
            res["train_seconds"] = {**old.get("train_seconds", {}), **res["train_seconds"]}
    atomic_write_text(RESULTS / f"{name}.json", json.dumps(res, indent=1))
    md = report(res)
    if not args.quick:
        plot(res, 3 if 3 in args.budgets else args.budgets[0])
        DOC.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(DOC, md + "\n")
    print(md)
    print(f"done in {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
