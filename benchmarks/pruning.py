"""Pruning benchmark: every criterion side by side, structured and unstructured.

    python benchmarks/pruning.py [--seeds 5] [--quick] [--parts structured,iterative,...]

Parts (all by default):
  structured   lenet5 / mnist5k (and resnet20 with --resnet): one-shot global pruning at
               ratios 0.3/0.5/0.7/0.8, accuracy right after and after 1 epoch of fine-tuning,
               every registered criterion, the DeepLIFT variants below and Torch-Pruning's
               GroupMagnitudeImportance / GroupTaylorImportance through the same pruner.
  iterative    lenet5, 5 steps x 1 epoch (Yeom et al.), ratios 0.7 / 0.8.
  unstructured lenet5 fc layers and lenet300 all layers at 0.8/0.9/0.95, 1 epoch; plus the
               goal runs with 3 epochs (lenet5 fc 0.9, lenet300 0.95).
  latency      vgg11 (width 1, 32x32) and resnet20 at 50% channels per layer: measured CPU
               latency reduction against MAC reduction.

Base models are trained once per (model, seed) and cached under benchmarks/results/cache/;
every grid cell's result is cached too (cells.json), so an interrupted run resumes.
Writes benchmarks/results/pruning.json, docs/img/pruning_*.png, docs/results/pruning.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("XAICOMPRESS_NO_PROGRESS", "1")

from xaicompress.atomic import atomic_save_figure, atomic_write_text  # noqa: E402
from xaicompress.checkpoint import (  # noqa: E402
    Checkpoint,
    ModelSpec,
    count_nonzero,
    count_params,
    load_checkpoint,
    save_checkpoint,
)
from xaicompress.data import load_dataset  # noqa: E402
from xaicompress.metrics import count_macs, measure_latency  # noqa: E402
from xaicompress.prune import prune_structured, prune_unstructured  # noqa: E402
from xaicompress.relevance import Criterion, Relevance, get_criterion, list_criteria  # noqa: E402
from xaicompress.train import accuracy, finetune_checkpoint, train_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CACHE = RESULTS / "cache"
IMG = ROOT / "docs" / "img"
MD = ROOT / "docs" / "results" / "pruning.md"

BASE_TRAIN = {"lenet5": {"epochs": 15, "lr": 3e-3}, "lenet300": {"epochs": 15, "lr": 1e-3},
              "resnet20": {"epochs": 4, "lr": 3e-3}}
STRUCT_RATIOS = [0.3, 0.5, 0.7, 0.8]
UNSTRUCT_RATIOS = [0.8, 0.9, 0.95]
TP_CRITERIA = ["tp:magnitude", "tp:taylor"]
#: DeepLIFT configurations searched for an edge (name -> (criterion spec, steps w/o tuning))
DEEPLIFT_VARIANTS: dict[str, tuple[str, int]] = {
    "deeplift": ("deeplift", 1),
    "deeplift:reference=mean": ("deeplift:reference=mean", 1),
    "deeplift:reference=samples:16": ("deeplift:reference=samples:16", 1),
    "deeplift:aggregate=signed": ("deeplift:aggregate=signed", 1),
    "deeplift:target=pred": ("deeplift:target=pred", 1),
    "deeplift x l1": ("deeplift*l1", 1),
    "deeplift rescored x5": ("deeplift", 5),
}


class Product(Criterion):
    """Relevance combined with magnitude: the product of two criteria's per-layer
    L1-normalised scores (units and weights)."""

    name = "product"

    def __init__(self, a: str, b: str) -> None:
        super().__init__(a=a, b=b)
        self.a, self.b = get_criterion(a), get_criterion(b)
        self.needs_data = self.a.needs_data or self.b.needs_data  # type: ignore[misc]

    def score(self, model: torch.nn.Module, loader: Any) -> Relevance:
        ra, rb = self.a.score(model, loader).normalised(), self.b.score(model, loader).normalised()
        return Relevance(f"{self.a!r}*{self.b!r}",
                         {k: ra.units[k].abs() * rb.units[k].abs() for k in ra.units},
                         {k: ra.weights[k].abs() * rb.weights[k].abs() for k in ra.weights})

    def __repr__(self) -> str:
        return f"{self.a!r}*{self.b!r}"


def make_criterion(spec: str, bundle: Any) -> Any:
    if "*" in spec:
        a, b = spec.split("*")
        crit = Product(a, b)
        if getattr(crit.a, "accepts_normalisation", False):  # DeepLIFT's black reference
            crit.a = type(crit.a)(**{**crit.a.options, "pixel_mean": tuple(bundle.mean),
                                     "pixel_std": tuple(bundle.std)})
        return crit
    return spec  # strings go through prune_* (tp:... included)


# ------------------------------------------------------------------------ caching
class Cells:
    """Per-cell results, persisted after every cell so a run resumes."""

    def __init__(self, path: Path, cached_only: bool = False):
        self.path, self.cached_only = path, cached_only
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str, fn: Any) -> Any:
        """The cell's cached result, computed (and saved) if missing; None if missing and
        only cached results are wanted (a report from a run still in progress)."""
        if key not in self.data:
            if self.cached_only:
                return None
            self.data[key] = fn()
            atomic_write_text(self.path, json.dumps(self.data, indent=1))
        return self.data[key]


def base_ckpt(model: str, seed: int, quick: bool, cached_only: bool = False
              ) -> Checkpoint | None:
    CACHE.mkdir(parents=True, exist_ok=True)
    cfg = dict(BASE_TRAIN[model])
    if quick:
        cfg["epochs"] = 1
    path = CACHE / f"{model}_mnist5k_e{cfg['epochs']}_s{seed}.safetensors"
    if path.is_file():
        return load_checkpoint(path)
    if cached_only:
        return None
    t = time.time()
    ck = train_checkpoint(model, "mnist5k", seed=seed, **cfg)
    save_checkpoint(ck, path)
    print(f"trained {model} seed {seed}: {ck.metrics['accuracy']:.2f}% "
          f"({time.time() - t:.0f}s)", flush=True)
    return ck


def classic_criteria() -> list[str]:
    return [c for c in list_criteria() if c not in ("none", "deeplift")] + TP_CRITERIA


def deeplift_variants(quick: bool) -> dict[str, tuple[str, int]]:
    if "deeplift" not in list_criteria():
        return {}
    return {"deeplift": DEEPLIFT_VARIANTS["deeplift"]} if quick else DEEPLIFT_VARIANTS


# ------------------------------------------------------------------------ parts
def run_structured(model: str, seeds: list[int], ratios: list[float], criteria: dict[str, Any],
                   cells: Cells, quick: bool, samples: int) -> dict[str, Any]:
    bundle = load_dataset("mnist5k", seed=0)
    out: dict[str, Any] = {"base": {}, "cells": {}}
    for seed in seeds:
        base = base_ckpt(model, seed, quick, cells.cached_only)
        if base is None:
            continue
        out["base"][seed] = accuracy(base.model, bundle.test)
        for name, (spec, steps) in criteria.items():
            for r in ratios:
                key = f"structured|{model}|{name}|{r}|{seed}|q{int(quick)}"

                def cell(spec=spec, steps=steps, r=r, base=base, seed=seed) -> dict[str, Any]:
                    t = time.time()
                    p = prune_structured(base, make_criterion(spec, bundle), bundle, ratio=r,
                                         scope="global", steps=steps, samples=samples, seed=seed)
                    a0 = accuracy(p.model, bundle.test)
                    f = finetune_checkpoint(p, bundle.train, epochs=1, seed=seed)
                    return {"acc_pruned": a0, "acc_ft": accuracy(f.model, bundle.test),
                            "params": count_params(p.model),
                            "macs": count_macs(p.model, base.spec.input_shape),
                            "seconds": time.time() - t}

                res = cells.get(key, cell)
                if res is None:
                    continue
                out["cells"].setdefault(name, {}).setdefault(str(r), []).append(res)
                print(f"{model} {name:32s} r={r} s={seed}: {res['acc_pruned']:.2f} -> "
                      f"{res['acc_ft']:.2f}", flush=True)
    return out


def run_iterative(seeds: list[int], ratios: list[float], criteria: list[str], cells: Cells,
                  quick: bool, samples: int) -> dict[str, Any]:
    bundle = load_dataset("mnist5k", seed=0)
    out: dict[str, Any] = {}
    steps = 2 if quick else 5
    for seed in seeds:
        base = base_ckpt("lenet5", seed, quick, cells.cached_only)
        if base is None:
            continue
        for name in criteria:
            for r in ratios:
                key = f"iterative|lenet5|{name}|{r}|{seed}|q{int(quick)}"

                def cell(name=name, r=r, base=base, seed=seed) -> dict[str, Any]:
                    p = prune_structured(base, make_criterion(name, bundle), bundle, ratio=r,
                                         scope="global", steps=steps, finetune_epochs=1,
                                         samples=samples, seed=seed)
                    return {"acc_ft": accuracy(p.model, bundle.test)}

                res = cells.get(key, cell)
                if res is None:
                    continue
                out.setdefault(name, {}).setdefault(str(r), []).append(res)
                print(f"iterative {name} r={r} s={seed}: {res['acc_ft']:.2f}", flush=True)
    return out


def run_unstructured(model: str, layers: str, seeds: list[int], ratios: list[float],
                     criteria: list[str], epochs: float, cells: Cells, quick: bool,
                     samples: int) -> dict[str, Any]:
    bundle = load_dataset("mnist5k", seed=0)
    out: dict[str, Any] = {"base": {}, "cells": {}}
    for seed in seeds:
        base = base_ckpt(model, seed, quick, cells.cached_only)
        if base is None:
            continue
        out["base"][seed] = accuracy(base.model, bundle.test)
        for name in criteria:
            for r in ratios:
                key = f"unstructured|{model}|{layers}|{name}|{r}|{epochs}|{seed}|q{int(quick)}"

                def cell(name=name, r=r, base=base, seed=seed) -> dict[str, Any]:
                    p = prune_unstructured(base, make_criterion(name, bundle), bundle, ratio=r,
                                           layers=layers, samples=samples, seed=seed)
                    a0 = accuracy(p.model, bundle.test)
                    f = finetune_checkpoint(p, bundle.train, epochs=epochs, seed=seed)
                    return {"acc_pruned": a0, "acc_ft": accuracy(f.model, bundle.test),
                            "nonzero": count_nonzero(f.model)}

                res = cells.get(key, cell)
                if res is None:
                    continue
                out["cells"].setdefault(name, {}).setdefault(str(r), []).append(res)
                print(f"unstructured {model}/{layers} {name:28s} r={r} s={seed} ep={epochs}: "
                      f"{res['acc_pruned']:.2f} -> {res['acc_ft']:.2f}", flush=True)
    return out


def _median_latency(model: torch.nn.Module, shape: tuple[int, int, int], rounds: int) -> float:
    return statistics.median(measure_latency(model, shape, batch=64, repeats=10)
                             for _ in range(rounds))


def run_latency(quick: bool) -> dict[str, Any]:
    out = {}
    rounds = 1 if quick else 5
    for name, kw, shape in [("vgg11", {"width": 1.0}, (3, 32, 32)),
                            ("resnet20", {"width": 1.0}, (3, 32, 32))]:
        torch.manual_seed(0)
        spec = ModelSpec(name, shape, 10, kw)
        ck = Checkpoint(spec.build().eval(), spec, None)
        fake = torch.utils.data.TensorDataset(torch.zeros(8, *shape), torch.zeros(8).long())
        p = prune_structured(ck, "l1", fake, ratio=0.5, scope="layer")
        macs0, macs1 = count_macs(ck.model, shape), count_macs(p.model, shape)
        # interleave dense and pruned measurements: the shared CPU's load drifts
        l0s, l1s = [], []
        for _ in range(rounds):
            l0s.append(_median_latency(ck.model, shape, 1))
            l1s.append(_median_latency(p.model, shape, 1))
        l0, l1 = statistics.median(l0s), statistics.median(l1s)
        mac_cut, lat_cut = 1 - macs1 / macs0, 1 - l1 / l0
        out[name] = {"macs_before": macs0, "macs_after": macs1, "latency_ms_before": l0,
                     "latency_ms_after": l1, "mac_reduction": mac_cut,
                     "latency_reduction": lat_cut, "latency_over_mac": lat_cut / mac_cut,
                     "threads": torch.get_num_threads()}
        print(f"latency {name}: MACs -{mac_cut:.1%}, latency {l0:.1f} -> {l1:.1f} ms "
              f"(-{lat_cut:.1%}), ratio {lat_cut / mac_cut:.2f}", flush=True)
    return out


# ------------------------------------------------------------------------ report
def ms(values: list[float]) -> str:
    if not values:
        return "-"
    m = statistics.mean(values)
    if len(values) == 1:
        return f"{m:.2f} (n=1)"
    return f"{m:.2f} ± {statistics.stdev(values):.2f}"


def mean(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def plot(name: str, cells: dict[str, Any], ratios: list[float], key: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for crit, by_r in cells.items():
        xs = [r for r in ratios if str(r) in by_r]
        ys = [mean([c[key] for c in by_r[str(r)]]) for r in xs]
        style = "-" if crit.startswith("deeplift") else "--"
        ax.plot(xs, ys, style, marker="o", label=crit)
    ax.set_xlabel("pruning ratio")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    IMG.mkdir(parents=True, exist_ok=True)
    path = IMG / f"pruning_{name}.png"
    atomic_save_figure(fig, path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return str(path.relative_to(ROOT))


def table(part: dict[str, Any], ratios: list[float], title: str) -> list[str]:
    base = list(part["base"].values())
    lines = [f"#### {title}", "", f"Unpruned: {ms(base)} % ({len(base)} seeds). Cells: accuracy "
             "right after pruning / after fine-tuning, mean ± std over seeds.", "",
             "| criterion | " + " | ".join(f"{r}" for r in ratios) + " |",
             "|---|" + "---|" * len(ratios)]
    for crit, by_r in part["cells"].items():
        row = [f"{ms([c['acc_pruned'] for c in by_r.get(str(r), [])])} / "
               f"**{ms([c['acc_ft'] for c in by_r.get(str(r), [])])}**" for r in ratios]
        lines.append(f"| {crit} | " + " | ".join(row) + " |")
    return lines + [""]


def edge_lines(part: dict[str, Any], ratios: list[float], model: str) -> list[str]:
    """Best DeepLIFT variant vs best classic criterion at each ratio (after fine-tuning)."""
    cells = part["cells"]
    out = []
    for r in ratios:
        def m(c: str, r: float = r) -> float:
            return mean([x["acc_ft"] for x in cells[c].get(str(r), [])])

        dl = [c for c in cells if c.startswith("deeplift")]
        cl = [c for c in cells if not c.startswith("deeplift")]
        if not dl or not cl:
            continue
        bd, bc = max(dl, key=m), max(cl, key=m)
        out.append(f"- {model} ratio {r}: best DeepLIFT `{bd}` {m(bd):.2f} vs best classic "
                   f"`{bc}` {m(bc):.2f} -> {m(bd) - m(bc):+.2f} pt")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5, help="seeds for lenet5/lenet300")
    ap.add_argument("--resnet-seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, tiny grid")
    ap.add_argument("--parts", default="structured,iterative,unstructured,latency")
    ap.add_argument("--resnet", default="reduced", choices=["off", "reduced", "full"],
                    help="resnet20 structured grid: reduced (l1, random, gradxact, tp:magnitude,"
                         " deeplift; ratios 0.5/0.8) or full")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cached-only", action="store_true",
                    help="report only cells already computed (no training, no pruning)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    seeds = [0] if args.quick else list(range(args.seeds))
    rseeds = [0] if args.quick else list(range(args.resnet_seeds))
    sratios = [0.5, 0.8] if args.quick else STRUCT_RATIOS
    uratios = [0.9] if args.quick else UNSTRUCT_RATIOS
    samples = 64 if args.quick else args.samples
    RESULTS.mkdir(parents=True, exist_ok=True)
    cells = Cells(CACHE / "pruning_cells.json", args.cached_only)
    dl = deeplift_variants(args.quick)
    classic = classic_criteria()
    if args.quick:
        classic = ["l1", "tp:magnitude"]
    crit_grid = {c: (c, 1) for c in classic} | dl
    result: dict[str, Any] = {"seeds": seeds, "quick": args.quick, "samples": samples}
    t0 = time.time()
    if "latency" in parts:
        # cheap (no training): measured afresh even in a --cached-only report
        result["latency"] = run_latency(args.quick)
    if "structured" in parts:
        result["structured_lenet5"] = run_structured("lenet5", seeds, sratios, crit_grid, cells,
                                                     args.quick, samples)
    if "iterative" in parts:
        it_crit = ["l1"] + (["deeplift"] if dl else [])
        result["iterative_lenet5"] = run_iterative(seeds, [0.7, 0.8], it_crit, cells,
                                                   args.quick, samples)
    if "unstructured" in parts:
        ucrit = [c for c in classic if not c.startswith("tp:")]
        ucrit += [v[0] for k, v in dl.items() if v[1] == 1 and "target" not in k]
        result["unstructured_lenet300"] = run_unstructured(
            "lenet300", "all", seeds, uratios, ucrit, 1, cells, args.quick, samples)
        result["unstructured_lenet5"] = run_unstructured(
            "lenet5", "fc", seeds, uratios, ucrit, 1, cells, args.quick, samples)
        goal_crit = ["l1"] + (["deeplift", "deeplift*l1"] if dl else [])
        result["unstructured_goal_lenet5"] = run_unstructured(
            "lenet5", "fc", seeds, [0.9], goal_crit, 3, cells, args.quick, samples)
        result["unstructured_goal_lenet300"] = run_unstructured(
            "lenet300", "all", seeds, [0.95], goal_crit, 3, cells, args.quick, samples)
    if "structured" in parts and args.resnet != "off":
        if args.resnet == "full":
            rgrid, rratios = crit_grid, sratios
        else:
            keep = ["l1", "random", "gradxact", "tp:magnitude"]
            rgrid = {c: (c, 1) for c in classic if c in keep} | (
                {"deeplift": ("deeplift", 1)} if dl else {})
            rratios = [0.5, 0.8] if not args.quick else [0.5]
        result["structured_resnet20"] = run_structured("resnet20", rseeds, rratios, rgrid,
                                                       cells, args.quick, samples)
        result["resnet_grid"] = args.resnet
    result["seconds"] = time.time() - t0
    name = "pruning_quick" if args.quick else "pruning"
    atomic_write_text(RESULTS / f"{name}.json", json.dumps(result, indent=1, default=str))
    if not args.quick:
        write_markdown(result, sratios, uratios)
        print(f"wrote {MD.relative_to(ROOT)}", flush=True)
    print(f"done in {result['seconds']:.0f}s", flush=True)
    return 0


def write_markdown(res: dict[str, Any], sratios: list[float], uratios: list[float]) -> None:
    lines = ["## Pruning (benchmarks/pruning.py)", "",
             "Setup: mnist5k (4000 train / 1000 test), base models trained once per seed "
             "(lenet5 15 epochs, lenet300 15, resnet20 4; Adam), relevance on 512 training "
             "samples, fine-tuning with `finetune_checkpoint` (Adam 5e-4, masks held). "
             f"Seeds: {len(res['seeds'])} (resnet20: see its table).", "",
             "Group rule (structured): a coupled group's score is the mean, over the member "
             "layers whose output channels it removes (root conv + convs joined by residual "
             "additions), of each layer's L1-normalised unit scores; input-channel members and "
             "BatchNorms add nothing. Global scope ranks these per-layer L1-normalised scores "
             "across groups (`norm=l1`, as specified) and never leaves a group below "
             "`min_channels` (1). Torch-Pruning importances go through the same selection "
             "after the same L1 normalisation.", ""]
    if "latency" in res:
        lines += ["### Latency at 50% channels (layer scope, batch 64, CPU, 1 thread)", "",
                  "| model | MACs cut | latency before → after (ms) | latency cut | "
                  "latency cut / MAC cut (goal ≥ 0.70) |", "|---|---|---|---|---|"]
        for m, v in res["latency"].items():
            lines.append(f"| {m} | {v['mac_reduction']:.1%} | {v['latency_ms_before']:.1f} → "
                         f"{v['latency_ms_after']:.1f} | {v['latency_reduction']:.1%} | "
                         f"{v['latency_over_mac']:.2f} |")
        lines.append("")
    for key, title, ratios in [
            ("structured_lenet5", "Structured, lenet5 / mnist5k, global, one-shot", sratios),
            ("structured_resnet20", "Structured, resnet20 / mnist5k, global, one-shot",
             sratios if res.get("resnet_grid") == "full" else [0.5, 0.8]),
            ("unstructured_lenet5", "Unstructured, lenet5 fc layers, layer scope, 1 epoch",
             uratios),
            ("unstructured_lenet300", "Unstructured, lenet300 all layers, layer scope, 1 epoch",
             uratios),
            ("unstructured_goal_lenet5", "Unstructured goal, lenet5 fc 90%, 3 epochs", [0.9]),
            ("unstructured_goal_lenet300", "Unstructured goal, lenet300 95%, 3 epochs", [0.95])]:
        if key in res and res[key]["cells"]:
            lines += table(res[key], ratios, title)
            if key.startswith("structured"):
                img = plot(key.split("_")[1], res[key]["cells"], ratios, "acc_ft",
                           f"{title} + 1 epoch")
                lines += [f"![{key}](../../{img})", ""]
                lines += ["Criterion edge (after 1 epoch):", ""]
                lines += edge_lines(res[key], ratios, key.split("_")[1]) + [""]
            if key == "unstructured_lenet300":
                img = plot("lenet300_unstructured", res[key]["cells"], ratios, "acc_ft",
                           f"{title}")
                lines += [f"![{key}](../../{img})", ""]
    if "iterative_lenet5" in res:
        lines += ["### Iterative schedule, lenet5, global, 5 steps x 1 epoch", "",
                  "| criterion | 0.7 | 0.8 |", "|---|---|---|"]
        for crit, by_r in res["iterative_lenet5"].items():
            lines.append(f"| {crit} | {ms([c['acc_ft'] for c in by_r.get('0.7', [])])} | "
                         f"{ms([c['acc_ft'] for c in by_r.get('0.8', [])])} |")
        lines.append("")
    MD.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(MD, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
