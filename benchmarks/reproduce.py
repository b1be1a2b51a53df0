"""Regenerate docs/RESULTS.md from scratch: every benchmark, the three pipeline configs over
3 seeds, and a verdict on each of the paper's three claims.

    python benchmarks/reproduce.py            # the full run (hours on 2 CPU cores)
    python benchmarks/reproduce.py --quick    # smoke run: every script with --quick, 1 seed
    python benchmarks/reproduce.py --only pipeline --seeds 0,1,2

Steps:
 1. run benchmarks/{training,relevance_speed,pruning,weight_sharing,mixed_precision}.py as
    subprocesses (--seeds a,b,c and --quick passed through; a missing
    script is reported, not fatal);
 2. run configs/{lenet5,lenet300,resnet20}-mnist.yaml through `run_pipeline` for every seed
    (stage cache in benchmarks/results/cache/pipeline, so a rerun resumes), write
    benchmarks/results/pipeline.json, docs/results/pipeline.md and docs/img/pipeline_*.png;
 3. read the benchmarks' JSON and decide per claim whether DeepLIFT improves (1) pruning,
    (2) weight sharing, (3) mixed precision (rule in `verdict`);
 4. write docs/RESULTS.md = header + the hand-written benchmarks/notes/results.md (the state
    of the work, the issue summaries) + verdicts + every docs/results/*.md section.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SECTIONS = ROOT / "docs" / "results"
IMG = ROOT / "docs" / "img"
PIPELINES = {  # config -> goals (ratio >= x at accuracy loss <= pt; cosine >= c)
    "lenet5-mnist.yaml": {"ratio": 50, "drop": 0.5, "cosine": 0.8},
    "lenet300-mnist.yaml": {"ratio": 60, "drop": 1.0},
    "resnet20-mnist.yaml": {"ratio": 20, "drop": 1.0},
}


def _seeds_comma(seeds: list[int]) -> list[str]:
    return ["--seeds", ",".join(map(str, seeds))]


# Every script takes the one --seeds a,b,c format of benchmarks/_common.py.
BENCHMARKS = {
    "training": _seeds_comma,
    "relevance_speed": _seeds_comma,
    "pruning": _seeds_comma,
    "weight_sharing": _seeds_comma,
    "mixed_precision": _seeds_comma,
    "robustness": lambda seeds: [],
    "gpu": lambda seeds: [],  # records "not measured" on a machine without a GPU
    "deploy": lambda seeds: ["--seed", str(seeds[0])],
    "own_model": lambda seeds: [],
}
CLAIMS = {
    1: ("pruning", "DeepLIFT improves pruning"),
    2: ("weight_sharing", "DeepLIFT improves weight sharing"),
    3: ("mixed_precision", "DeepLIFT improves mixed precision"),
}


# ------------------------------------------------------------------ benchmarks
def run_benchmarks(names: list[str], seeds: list[int], quick: bool) -> dict[str, str]:
    """Run each benchmark script as a subprocess; name -> 'ok' / why it failed."""
    status: dict[str, str] = {}
    for name in names:
        script = ROOT / "benchmarks" / f"{name}.py"
        if not script.is_file():
            status[name] = "missing script"
            print(f"[reproduce] {name}: no benchmarks/{name}.py, skipped", flush=True)
            continue
        cmd = [sys.executable, str(script), *BENCHMARKS[name](seeds)]
        if quick:
            cmd.append("--quick")
        print(f"[reproduce] {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        status[name] = "ok" if rc == 0 else f"failed (exit {rc})"
        print(f"[reproduce] {name}: {status[name]} in {time.perf_counter() - t0:.0f} s",
              flush=True)
    return status


# -------------------------------------------------------------------- pipeline
def run_pipelines(configs: list[str], seeds: list[int], quick: bool) -> dict[str, Any]:
    """Every shipped config x seed through the pipeline; returns pipeline.json's dict."""
    import torch

    from xaicompress.pipeline import load_config, run_pipeline
    from xaicompress.pipeline.config import FinetuneStage

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out: dict[str, Any] = {"seeds": seeds, "quick": quick, "configs": {}}
    for name in configs:
        cfg = load_config(ROOT / "configs" / name)
        if quick:  # smoke: the same stages, a fraction of the epochs and samples
            cfg = _quick(cfg, FinetuneStage)
        runs = []
        for seed in seeds:
            folder = RESULTS / "pipeline" / f"{Path(name).stem}-seed{seed}"
            folder.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            res = run_pipeline(cfg.with_seed(seed), folder,
                               cache_dir=RESULTS / "cache" / "pipeline",
                               echo=lambda m, n=name, s=seed: print(f"[{n} seed {s}] {m}",
                                                                    flush=True))
            r = res.report
            runs.append({"seed": seed, "compression_ratio": r["compression_ratio"],
                         "accuracy_drop": r["accuracy_drop"], "baseline": r["baseline"],
                         "final": r["final"], "fidelity": r["fidelity"]["final"],
                         "stages": [{k: s[k] for k in ("name", "accuracy", "size_bytes",
                                                       "seconds")} | {"cosine":
                                    s["fidelity"]["cosine"]} for s in r["stages"]],
                         "wall_seconds": time.perf_counter() - t0, "folder": str(
                             folder.relative_to(ROOT))})
            if seed == seeds[0]:
                IMG.mkdir(parents=True, exist_ok=True)
                for plot in ("stages", "layers", "heatmaps"):
                    src = folder / f"{plot}.png"
                    if src.is_file():
                        shutil.copyfile(src, IMG / f"pipeline_{Path(name).stem}_{plot}.png")
        out["configs"][name] = {"title": cfg.title(), "runs": runs}
    return out


def _quick(cfg: Any, finetune_type: type) -> Any:
    data = cfg.model_dump()
    data["train"]["epochs"] = min(data["train"]["epochs"], 2)
    for st in data["stages"]:
        for k in ("finetune_epochs", "qat_epochs", "epochs"):
            if k in st and st[k]:
                st[k] = min(st[k], 0.3)
        if "samples" in st:
            st["samples"] = min(st["samples"], 64)
        if "steps" in st:
            st["steps"] = 1
    data["report"].update(fidelity_samples=32, latency_repeats=2)
    from xaicompress.pipeline import validate_config

    return validate_config(data, "quick")


def _ms(vals: list[float]) -> tuple[float, float]:
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def pipeline_markdown(data: dict[str, Any]) -> str:
    seeds = data["seeds"]
    lines = ["## The whole pipeline (`xaicompress compress`)", "",
             f"Shipped configs, {len(seeds)} seed(s) ({', '.join(map(str, seeds))}), mean ± "
             "std. Ratio = baseline fp32 bytes / bytes of the packed file on disk; drop = "
             "baseline accuracy - final accuracy; cosine / top-10% / agree = explanation "
             "fidelity of the final model (input-space DeepLIFT maps vs the original's)."
             + (" **Quick smoke run: numbers are not meaningful.**" if data["quick"] else ""),
             "", "| config | baseline % | final % | drop pt | packed KB | ratio | cosine | "
             "top-10% | agree % | goal | met |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
             "---|---|"]
    for name, c in data["configs"].items():
        rs = c["runs"]
        g = PIPELINES.get(name, {})
        base = _ms([r["baseline"]["accuracy"] for r in rs])
        fin = _ms([r["final"]["accuracy"] for r in rs])
        drop = _ms([r["accuracy_drop"] for r in rs])
        kb = _ms([r["final"]["size_bytes"] / 1024 for r in rs])
        ratio = _ms([r["compression_ratio"] for r in rs])
        cos = _ms([r["fidelity"]["cosine"] for r in rs])
        top = _ms([r["fidelity"]["top10_overlap"] for r in rs])
        agree = _ms([r["fidelity"]["agreement"] for r in rs])
        goal = f">= {g.get('ratio')}x at <= {g.get('drop')} pt" + (
            f", cosine >= {g['cosine']}" if "cosine" in g else "")
        met = (ratio[0] >= g.get("ratio", 0) and drop[0] <= g.get("drop", 1e9)
               and cos[0] >= g.get("cosine", -1))
        lines.append(f"| {c['title']} | {base[0]:.2f} ± {base[1]:.2f} | {fin[0]:.2f} ± "
                     f"{fin[1]:.2f} | {drop[0]:.2f} ± {drop[1]:.2f} | {kb[0]:.2f} ± {kb[1]:.2f} "
                     f"| {ratio[0]:.1f} ± {ratio[1]:.1f} | {cos[0]:.3f} ± {cos[1]:.3f} | "
                     f"{top[0]:.3f} ± {top[1]:.3f} | {agree[0]:.1f} ± {agree[1]:.1f} | {goal} | "
                     f"{'**met**' if met else '**missed**'} |")
    lines += ["", "Per seed (ratio / drop pt / cosine / wall seconds):", ""]
    for c in data["configs"].values():
        per = "; ".join(f"seed {r['seed']}: {r['compression_ratio']:.1f}x / "
                        f"{r['accuracy_drop']:+.2f} / {r['fidelity']['cosine']:.3f} / "
                        f"{r['wall_seconds']:.0f} s" for r in c["runs"])
        lines.append(f"- {c['title']}: {per}")
    lines += ["", "Accuracy and explanation cosine after each stage (seed "
              f"{seeds[0]}):", ""]
    for c in data["configs"].values():
        st = " -> ".join(f"{s['name']} {s['accuracy']:.2f}% / {s['size_bytes'] / 1024:.1f} KB "
                         f"/ cos {s['cosine']:.3f}" for s in c["runs"][0]["stages"])
        lines.append(f"- {c['title']}: baseline {c['runs'][0]['baseline']['accuracy']:.2f}% -> "
                     f"{st}")
    stems = [Path(n).stem for n in data["configs"]]
    lines += [""] + [f"![{s} stages](../img/pipeline_{s}_stages.png)" for s in stems]
    lines += [f"![{stems[0]} heatmaps](../img/pipeline_{stems[0]}_heatmaps.png)"] if stems \
        else []
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------- verdicts
_ACC_PREFIX = "acc"
_CRITERION_HINTS = ("deeplift", "l1", "taylor", "random", "gradxact", "activation", "plain",
                    "uniform", "none", "unweighted", "tp:", "magnitude", "abs_w", "|w|")


def _is_criterion(key: str) -> bool:
    k = key.lower()
    return any(k.startswith(h) or h in k for h in _CRITERION_HINTS)


def _acc_fields(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if k.startswith(_ACC_PREFIX)
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def observations(obj: Any, context: tuple[str, ...] = ()) -> list[tuple]:
    """(setting, criterion, metric, value) from any of the benchmarks' JSON layouts:
    rows (lists of dicts with a `criterion` field) and nested criterion -> setting -> [seed
    dicts] maps. setting = the JSON path plus the row's scalar options."""
    found: list[tuple] = []
    if any(str(c).startswith("globalrule") for c in context):
        return found  # a study of selection rules, not a comparison of criteria
    if isinstance(obj, list):
        for item in obj:
            # mixed_precision.json calls the criterion (or the uniform baseline) "method"
            crit = item.get("criterion", item.get("method")) if isinstance(item, dict) else None
            if crit is not None and _acc_fields(item):
                opts = tuple(sorted((k, str(v)) for k, v in item.items()
                                    if k not in ("criterion", "method", "seed")
                                    and isinstance(v, (str, int, float, type(None)))
                                    and not k.startswith(("acc", "size", "base", "seconds",
                                                          "time", "latency", "bytes",
                                                          "params", "nonzero", "macs",
                                                          "error", "used", "weighted",
                                                          "achieved"))))
                for m, v in _acc_fields(item).items():
                    found.append((context + tuple(f"{k}={v}" for k, v in opts),
                                  str(crit), m, v))
            else:
                found += observations(item, context)
    elif isinstance(obj, dict):
        crit_keys = [k for k in obj if isinstance(k, str) and _is_criterion(k)]
        if crit_keys and len(crit_keys) >= max(2, len(obj) // 2):
            for crit in crit_keys:
                for setting, seeds in (obj[crit].items() if isinstance(obj[crit], dict)
                                       else [("", obj[crit])]):
                    for rec in seeds if isinstance(seeds, list) else [seeds]:
                        if isinstance(rec, dict):
                            for m, v in _acc_fields(rec).items():
                                found.append((context + (str(setting),), crit, m, v))
        else:
            for k, v in obj.items():
                found += observations(v, context + (str(k),))
    return found


#: criteria that use no gradient of the model: what a user gets without any attribution
CLASSIC = ("l1", "random", "none", "plain", "uniform", "tp:magnitude", "activation")


def verdict(obs: list[tuple], against: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Per setting and metric: mean over seeds per criterion; best DeepLIFT variant vs the
    best other criterion. Rule: 'supported' when DeepLIFT is ahead on average by >= 0.5 pt
    and wins at least half the settings; 'not supported' when it is behind on average by
    >= 0.5 pt or wins fewer than a third; 'inconclusive (tie)' otherwise."""
    groups: dict[tuple, dict[str, list[float]]] = {}
    for setting, crit, metric, v in obs:
        groups.setdefault((setting, metric), {}).setdefault(crit, []).append(v)
    diffs = []
    for (setting, metric), by_crit in groups.items():
        dl = {c: statistics.fmean(v) for c, v in by_crit.items() if c.startswith("deeplift")}
        other = {c: statistics.fmean(v) for c, v in by_crit.items()
                 if not c.startswith("deeplift")
                 and (against is None or c.split("^")[0] in against)}
        if not dl or not other:
            continue
        bd, bo = max(dl, key=dl.get), max(other, key=other.get)
        diffs.append({"setting": "/".join(setting), "metric": metric, "deeplift": bd,
                      "deeplift_acc": dl[bd], "best_other": bo, "other_acc": other[bo],
                      "diff": dl[bd] - other[bo]})
    if not diffs:
        return {"verdict": "no data", "settings": 0, "diffs": []}
    mean = statistics.fmean(d["diff"] for d in diffs)
    wins = sum(d["diff"] > 0 for d in diffs)
    if mean >= 0.5 and wins >= len(diffs) / 2:
        word = "supported"
    elif mean <= -0.5 or wins < len(diffs) / 3:
        word = "not supported"
    else:
        word = "inconclusive (tie)"
    return {"verdict": word, "settings": len(diffs), "wins": wins, "mean_diff": mean,
            "best": max(diffs, key=lambda d: d["diff"]),
            "worst": min(diffs, key=lambda d: d["diff"]), "diffs": diffs}


def verdicts_markdown(quick: bool, status: dict[str, str]) -> tuple[str, dict[str, Any]]:
    suffix = "_quick" if quick else ""
    lines = ["## Verdict on the paper's three claims", "",
             "Rule: for every setting a benchmark measured (model, ratio / k / bit budget, "
             "with or without fine-tuning), the best DeepLIFT variant's accuracy (mean over "
             "seeds) minus the best other criterion's. A claim is *supported* when DeepLIFT "
             "is ahead by >= 0.5 pt on average and wins at least half the settings, *not "
             "supported* when it is behind by >= 0.5 pt on average or wins fewer than a "
             "third, *inconclusive* otherwise. The benchmark sections below hold every "
             "number.", ""]
    out: dict[str, Any] = {}
    for num, (bench, text) in CLAIMS.items():
        path = RESULTS / f"{bench}{suffix}.json"
        if not path.is_file():
            why = status.get(bench, "not run")
            lines.append(f"{num}. **{text}: no data** (benchmarks/results/{path.name} "
                         f"missing; benchmark {why}).")
            out[bench] = {"verdict": "no data"}
            continue
        v = verdict(observations(json.loads(path.read_text())))
        out[bench] = {k: v[k] for k in v if k != "diffs"}
        if v["verdict"] == "no data":
            lines.append(f"{num}. **{text}: no comparable numbers** in {path.name}.")
            continue
        b, w = v["best"], v["worst"]
        lines.append(
            f"{num}. **{text}: {v['verdict']}.** Over {v['settings']} settings the best "
            f"DeepLIFT variant beat the best other criterion in {v['wins']}, by "
            f"{v['mean_diff']:+.2f} pt on average; best case {b['diff']:+.2f} pt "
            f"({b['setting']}, {b['metric']}: {b['deeplift']} {b['deeplift_acc']:.2f}% vs "
            f"{b['best_other']} {b['other_acc']:.2f}%), worst case {w['diff']:+.2f} pt "
            f"({w['setting']}, {w['metric']}: {w['deeplift']} {w['deeplift_acc']:.2f}% vs "
            f"{w['best_other']} {w['other_acc']:.2f}%).")
        c = verdict(observations(json.loads(path.read_text())), against=CLASSIC)
        if c["verdict"] != "no data":
            lines.append(
                f"   Against the gradient-free baselines only ({', '.join(CLASSIC)}; i.e. "
                f"without Taylor / gradient x activation): **{c['verdict']}**, DeepLIFT "
                f"ahead in {c['wins']} of {c['settings']} settings, {c['mean_diff']:+.2f} pt "
                f"on average (best {c['best']['diff']:+.2f}, worst {c['worst']['diff']:+.2f}).")
    return "\n".join(lines) + "\n", out


# ------------------------------------------------------------------------ main
def write_results(quick: bool, status: dict[str, str]) -> Path:
    from xaicompress.atomic import atomic_write_text

    verdict_md, verdicts = verdicts_markdown(quick, status)
    order = ["training", "relevance", "relevance_speed", "pruning", "weight_sharing",
             "mixed_precision", "pipeline", "entropy", "deploy", "revealcancel", "robustness",
             "gpu"]
    sections = sorted(SECTIONS.glob("*.md"), key=lambda p: (order.index(p.stem) if p.stem in
                                                            order else len(order), p.stem))
    head = ["# xaicompress: results", "",
            "Regenerated by `python benchmarks/reproduce.py"
            + (" --quick" if quick else "") + f"` on {time.strftime('%Y-%m-%d')} "
            f"({os.cpu_count()} CPU cores) from the sections each benchmark script wrote in "
            "its last run (`docs/results/*.md`, JSON in `benchmarks/results/`); goals that "
            "were missed say so.", "",
            "Benchmarks run by this call: " + (", ".join(
                f"{k} {v}" for k, v in status.items() if v != "not run") or
                "none (sections from their scripts' own last runs)") + ".", ""]
    # the hand-written state of the work and summaries (benchmarks/notes/results.md), first
    notes = ROOT / "benchmarks" / "notes" / "results.md"
    hand = [notes.read_text().rstrip() + "\n"] if notes.is_file() else []
    body = hand + [verdict_md] + [p.read_text().rstrip() + "\n" for p in sections]
    text = "\n".join(head) + "\n" + "\n".join(body)
    atomic_write_text(ROOT / "docs" / "RESULTS.md", text)
    atomic_write_text(RESULTS / f"verdicts{'_quick' if quick else ''}.json",
                      json.dumps(verdicts, indent=2) + "\n")
    return ROOT / "docs" / "RESULTS.md"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--quick", action="store_true", help="smoke run: --quick to every "
                    "benchmark, 1 seed, short pipeline epochs")
    ap.add_argument("--only", default="benchmarks,pipeline,results",
                    help="comma-separated parts: benchmarks, pipeline, results")
    ap.add_argument("--benchmarks", default=",".join(BENCHMARKS))
    ap.add_argument("--configs", default=",".join(PIPELINES))
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.quick:
        seeds = seeds[:1]
    parts = set(args.only.split(","))
    sys.path.insert(0, str(ROOT / "src"))
    from xaicompress.atomic import atomic_write_text

    status = {n: "not run" for n in args.benchmarks.split(",")}
    if "benchmarks" in parts:
        status = run_benchmarks(args.benchmarks.split(","), seeds, args.quick)
    if "pipeline" in parts:
        RESULTS.mkdir(parents=True, exist_ok=True)
        data = run_pipelines(args.configs.split(","), seeds, args.quick)
        name = "pipeline_quick" if args.quick else "pipeline"
        atomic_write_text(RESULTS / f"{name}.json", json.dumps(data, indent=2) + "\n")
        SECTIONS.mkdir(parents=True, exist_ok=True)
        if not args.quick:  # a smoke run never overwrites the real section
            atomic_write_text(SECTIONS / "pipeline.md", pipeline_markdown(data))
        print(pipeline_markdown(data))
    if "results" in parts:
        print(f"[reproduce] wrote {write_results(args.quick, status)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
