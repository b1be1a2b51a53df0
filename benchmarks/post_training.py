"""Post-training compression and the accuracy budget (issue 16).

Parts (all on the real mnist5k digits, validation = 10% of the training split carved as
`compress` carves it, test = the 1,000 test images, read for the tables only):

- grid: one-shot compression with no fine-tuning from 1,024 calibration images (BatchNorm
  re-estimated, biases corrected; criteria score 512 of them): structured 0.3 / 0.5 / 0.7
  (global scope, every criterion with the cross-layer normalisation `norm` l1 and max,
  written `criterion @norm=max`; `structured_rec`: the same with least-squares
  reconstruction of the cut layers), unstructured 0.7 / 0.9 (all layers, every criterion
  with the norm none and l1, `criterion @norm=l1`; `unstructured_rec`: the kept weights
  refitted by least squares), sharing k = 4 / 8,
  mixed precision 3 / 4 average bits; DeepLIFT variants vs l1, taylor, gradxact,
  tp:magnitude, tp:taylor (structured only), hessian and fisher (score=curvature for the bit
  allocation, HAWQ-V3's objective). The best DeepLIFT variant per compression is chosen on
  the validation split (mean over all its settings and seeds), then compared with the best
  other criterion (chosen per setting on validation too) on the test split.
- bn: resnet20 one-shot global 0.5 with and without BatchNorm re-estimation.
- budget: `compress --max-drop 0.5` with configs/lenet5-mnist.yaml on mnist5k and on a
  second split (mnist5k?split=1).

Every cell is cached in benchmarks/results/post_training_cells.json (or the `--cells` file),
so a rerun only computes what is missing; cells already in any other
benchmarks/results/post_training_cells*.json are reused, not recomputed, and a grid run
stops if a baseline it retrains differs from the stored one (another CPU trains another
model from the same seed). torch runs on one thread.

Run: python benchmarks/post_training.py --parts grid,bn,budget --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, add_seeds, fmt, mean_std, write_json, write_section  # noqa: E402

CELLS = RESULTS / "post_training_cells.json"
DEEPLIFT = ["deeplift", "deeplift:reference=mean"]
OTHERS = ["l1", "taylor", "gradxact", "hessian", "fisher"]
TP = ["tp:magnitude", "tp:taylor"]
SETTINGS = {
    "structured": [0.3, 0.5, 0.7],
    "structured_rec": [0.3, 0.5, 0.7],
    "unstructured": [0.7, 0.9],
    "unstructured_rec": [0.7, 0.9],
    "share": [4, 8],
    "quantize": [3, 4],
}
#: training of the baselines (the issue's probe: resnet20 4 epochs); the issue's
#: mobilenet_v2 is timm's (its stem takes the digits' one channel, `in_chans`); it learns
#: slowly on 28 x 28 digits (seed 0, test: 6 epochs 56.3%, 15 epochs 89.3%, 4 min per 15
#: on one thread)
EPOCHS = {"lenet5": 8, "resnet20": 4, "vgg11": 4, "timm:mobilenetv2_100": 30}
CALIBRATION = 1024
#: stage runs per searched stage in the budget part: the CLI's default (a run takes 2-3 min
#: on one core since the share stage trains 3 epochs of QAT; the runs before 2026-12-02
#: took 4, to fit)
PROBES = 6
#: the split the budget's margin is chosen on (its probes' test drops are read for that)
TUNING = "mnist5k?split=2"
#: the validation share of the budget runs (the library's default with a budget)
BUDGET_VAL = 0.2


class Cells:
    """JSON cache of finished cells (written after each one)."""

    def __init__(self, path: Path, known: dict[str, Any] | None = None) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        #: cells finished in the other cell files (not recomputed, not written here)
        self.known = known or {}

    def has(self, key: str) -> bool:
        return key in self.data or key in self.known

    def get(self, key: str, fn: Any) -> Any:
        if key in self.known and key not in self.data:
            return self.known[key]
        if key not in self.data:
            self.data[key] = fn()
            RESULTS.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=1))
        return self.data[key]


_BASES: dict[tuple[str, int, str], Any] = {}
#: where baselines and the budget runs' outputs go (--out)
OUT = Path("/tmp/xaicompress-post-training")


def bundle_of(spec: str = "mnist5k") -> Any:
    from xaicompress.data import load_dataset
    from xaicompress.data.holdout import carve_validation

    return carve_validation(load_dataset(spec))


def baseline(model: str, seed: int, bundle: Any) -> Any:
    """The trained baseline, kept under OUT/baselines so every part trains it once."""
    from xaicompress.checkpoint import load_checkpoint, save_checkpoint
    from xaicompress.train import train_checkpoint

    key = (model, seed, bundle.spec)
    path = OUT / "baselines" / f"{model}-{seed}-{bundle.spec.replace('?', '_')}.safetensors"
    if key not in _BASES and path.is_file():
        _BASES[key] = load_checkpoint(path)
    if key not in _BASES:
        _BASES[key] = train_checkpoint(model, bundle.spec, epochs=EPOCHS[model], seed=seed,
                                       bundle=bundle, augment=2)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(_BASES[key], path)
    return _BASES[key]


def measure(ckpt: Any, bundle: Any) -> dict[str, float]:
    from xaicompress.export.packed import packed_report
    from xaicompress.train import accuracy

    return {"val": accuracy(ckpt.model, bundle.val), "test": accuracy(ckpt.model, bundle.test),
            "bytes": packed_report(ckpt).file_bytes}


def compress_once(kind: str, ckpt: Any, crit: str, calib: Any, setting: float, seed: int
                  ) -> Any:
    from xaicompress.pipeline.stages import stage_criterion
    from xaicompress.prune import prune_structured, prune_unstructured
    from xaicompress.quant.codebook import share_weights
    from xaicompress.quant.integer import quantize

    crit, _, norm = crit.partition(NORM_TAG)
    c = stage_criterion(crit, seed)
    if kind in ("structured", "structured_rec"):
        return prune_structured(ckpt, c, calib, ratio=setting, scope="global", seed=seed,
                                reconstruct=kind == "structured_rec", norm=norm or "l1")
    if kind in ("unstructured", "unstructured_rec"):
        return prune_unstructured(ckpt, c, calib, ratio=setting, layers="all", seed=seed,
                                  reconstruct=kind == "unstructured_rec", norm=norm or "none")
    if kind == "share":
        return share_weights(ckpt, c, calib, clusters=int(setting), seed=seed)
    return quantize(ckpt, c, calib, avg_bits=setting, seed=seed)


#: DeepLIFT variants of the channel ranking only (classmax changes unit scores; its weight
#: scores are abs's)
DEEPLIFT_UNITS = ["deeplift:aggregate=classmax"]
#: DeepLIFT variants of the weight scores (unstructured pruning, sharing, quantization):
#: weights=layer lets relevance weigh the layers and magnitude the weights inside each
DEEPLIFT_WEIGHTS = ["deeplift:reference=mean,weights=layer"]


#: global structured pruning compares channels across layers after a normalisation
#: (`prune_structured(norm=)`): every criterion runs with each of these, written
#: `criterion @norm=max` (l1, the default, unwritten), and the choice on validation covers
#: the normalisation too, for DeepLIFT and the others alike ("mean" lost everywhere in a
#: probe on lenet5 and resnet20 and is not run)
NORM_TAG = " @norm="
STRUCTURED_NORMS = ["max"]
#: the same for the global unstructured ranking (`prune_unstructured(norm=)`, default
#: "none": raw scores compared across layers); "l1" (each layer's scores L1-normalised) was
#: added after a one-seed probe of mobilenet_v2's 90% refitted cut (docs/relevance.md)
UNSTRUCTURED_NORMS = ["l1"]


def criteria_for(kind: str) -> list[str]:
    others = [f"{c}:score=curvature" if kind == "quantize" and c in ("hessian", "fisher")
              else c for c in OTHERS]
    structured = kind.startswith("structured")
    deeplift = DEEPLIFT + (DEEPLIFT_UNITS if structured else DEEPLIFT_WEIGHTS)
    crits = deeplift + others + (TP if structured else [])
    if structured:
        crits += [f"{c}{NORM_TAG}{n}" for n in STRUCTURED_NORMS for c in crits]
    elif kind.startswith("unstructured"):
        crits += [f"{c}{NORM_TAG}{n}" for n in UNSTRUCTURED_NORMS for c in crits]
    return crits


def run_grid(models: list[str], seeds: list[int], cells: Cells, kinds: list[str]) -> None:
    from xaicompress.data.holdout import calibration_bundle

    bundle = bundle_of()
    for model in models:
        for seed in seeds:
            base = baseline(model, seed, bundle)
            stored = cells.get(f"{model}|{seed}|base", lambda b=base: measure(b, bundle))
            now = measure(base, bundle)
            if (now["val"], now["test"]) != (stored["val"], stored["test"]):
                # the same seed trains another model on another CPU (docs/design.md): new
                # cells would not be comparable with the stored ones (bytes may differ: the
                # packed format has changed since some cells were stored)
                raise SystemExit(f"{model} seed {seed}: the baseline trained here ({now}) "
                                 f"is not the stored one ({stored}); run this model's grid "
                                 "into a new --cells file with the others moved away")
            calib = calibration_bundle(bundle, CALIBRATION, seed=seed)
            for kind in kinds:
                for setting in SETTINGS[kind]:
                    for crit in criteria_for(kind):
                        key = f"{model}|{seed}|{kind}|{setting}|{crit}"
                        t0 = time.perf_counter()

                        def cell(k=kind, c=crit, s=setting, b=base, sd=seed, cb=calib
                                 ) -> dict[str, Any]:
                            return measure(compress_once(k, b, c, cb, s, sd), bundle)

                        hit = cells.has(key)
                        r = cells.get(key, cell)
                        if not hit:
                            print(f"{key}: val {r['val']:.2f} test {r['test']:.2f} "
                                  f"({time.perf_counter() - t0:.1f} s)", flush=True)


def run_bn(seeds: list[int], cells: Cells) -> None:
    from xaicompress.data.holdout import calibration_bundle

    bundle = bundle_of()
    for seed in seeds:
        base = baseline("resnet20", seed, bundle)
        calib = calibration_bundle(bundle, CALIBRATION, seed=seed)
        for crit in ["deeplift", "l1", "random"]:
            for scope in ("global", "layer"):
                for bn, rec in ((True, False), (False, False), (True, True)):
                    key = f"bn|resnet20|{seed}|{scope}|{crit}|{bn}" + ("|rec" if rec else "")

                    def cell(c=crit, sc=scope, on=bn, rc=rec, b=base, sd=seed, cb=calib
                             ) -> dict[str, Any]:
                        from xaicompress.pipeline.stages import stage_criterion
                        from xaicompress.prune import prune_structured

                        out = prune_structured(b, stage_criterion(c, sd), cb, ratio=0.5,
                                               scope=sc, seed=sd, bn_recalibration=on,
                                               reconstruct=rc)
                        return measure(out, bundle)

                    hit = cells.has(key)
                    r = cells.get(key, cell)
                    if not hit:
                        print(f"{key}: val {r['val']:.2f} test {r['test']:.2f}", flush=True)


def budget_key(spec: str, seed: int, margin: float | None, probes: int) -> str:
    """Cell key of one budget run; margin None = the first version (no margin, val 0.1)."""
    if margin is None:
        return f"budget|{spec}|{seed}"
    return f"budget|{spec}|{seed}|margin={margin:g}|probes={probes}"


def _paired(base: Any, final: Any, data: Any) -> tuple[float, float]:
    from xaicompress.pipeline.budget import correct_on, paired_drop

    return paired_drop(correct_on(base.model, data), correct_on(final.model, data))


def probe_population(out: Path, base: Any, bundle: Any) -> list[dict[str, float]]:
    """Every probe a run left in OUT/cache, with its paired validation drop and SE and its
    test drop: the population the margin is calibrated on (tuning split only)."""
    from xaicompress.checkpoint import load_checkpoint

    rows = []
    for path in sorted((out / "cache").glob("*-probe-*.safetensors")):
        ck = load_checkpoint(path, model="lenet5")
        vd, vse = _paired(base, ck, bundle.val)
        td, tse = _paired(base, ck, bundle.test)
        rows.append({"stage": path.name.split("-")[0], "val_drop": vd, "val_se": vse,
                     "test_drop": td, "test_se": tse})
    return rows


def run_budget(seeds: list[int], cells: Cells, specs: list[str], out_root: Path,
               margin: float, probes: int, tuning: set[str]) -> None:
    """`compress --max-drop 0.5 [--margin z]` of configs/lenet5-mnist.yaml per split and
    seed (validation: the budget's default share, `BUDGET_VAL_FRACTION`)."""
    from xaicompress.pipeline import load_config, run_pipeline
    from xaicompress.pipeline.config import RunOptions

    root = Path(__file__).resolve().parents[1]
    cfg0 = load_config(root / "configs" / "lenet5-mnist.yaml")
    for spec in specs:
        for seed in seeds:
            key = budget_key(spec, seed, margin, probes)

            def cell(sp=spec, sd=seed) -> dict[str, Any]:
                cfg = cfg0.model_copy(update={"data": sp}).with_seed(sd).with_run_options(
                    RunOptions(max_drop=0.5, margin=margin))
                cfg = cfg.model_copy(update={"target": cfg.target.model_copy(
                    update={"probes": probes})})
                cfg = cfg.model_copy(update={"export": cfg.export.model_copy(
                    update={"onnx": False})})
                t0 = time.perf_counter()
                # probes do not depend on the margin: runs of one split and seed share a cache
                out = out_root / f"{sp.replace('?', '_')}-{sd}"
                res = run_pipeline(cfg, out, plots=False)
                rep, bundle = res.report, res.bundle
                vd, vse = _paired(res.baseline, res.final, bundle.val)
                td, tse = _paired(res.baseline, res.final, bundle.test)
                row = {"ratio": rep["compression_ratio"], "test_drop": rep["accuracy_drop"],
                       "test_drop_paired": td, "test_se": tse, "val_drop": vd, "val_se": vse,
                       "val_images": len(bundle.val), "margin": margin, "val": cfg.val,
                       "base_test": rep["baseline"]["accuracy"],
                       "final_test": rep["final"]["accuracy"],
                       "search": rep["search"], "seconds": time.perf_counter() - t0}
                if sp in tuning:
                    row["population"] = probe_population(out, res.baseline, bundle)
                return row

            hit = cells.has(key)
            r = cells.get(key, cell)
            if not hit:
                print(f"{key}: {r['ratio']:.1f}x test drop {r['test_drop']:.2f} val drop "
                      f"{r['val_drop']:.2f} ± {r['val_se']:.2f}", flush=True)


# ------------------------------------------------------------------ summaries
def _vals(cells: Cells, model: str, seeds: list[int], kind: str, setting: Any, crit: str,
          split: str) -> list[float]:
    out = []
    for s in seeds:
        r = cells.data.get(f"{model}|{s}|{kind}|{setting}|{crit}")
        if r is not None:
            out.append(r[split])
    return out


def grid_summary(cells: Cells, models: list[str], seeds: list[int], kinds: list[str]
                 ) -> tuple[dict[str, Any], list[str]]:
    """Per model and compression: the DeepLIFT variant chosen on validation, and per setting
    its test accuracy vs the best other criterion's (chosen on validation)."""
    summary: dict[str, Any] = {}
    lines = ["| model | compression | setting | DeepLIFT (chosen on val) | test % | best other "
             "(on val) | test % | difference pt | room pt |",
             "|---|---|---|---|---:|---|---:|---:|---:|"]
    for model in models:
        base = mean_std([cells.data[k]["test"] for s in seeds
                         if (k := f"{model}|{s}|base") in cells.data])[0]
        for kind in kinds:
            dl = [c for c in criteria_for(kind) if c.startswith("deeplift")]
            others = [c for c in criteria_for(kind) if not c.startswith("deeplift")]
            val_mean = {c: mean_std([v for st in SETTINGS[kind] for v in _vals(
                cells, model, seeds, kind, st, c, "val")])[0] for c in dl}
            if not any(v == v for v in val_mean.values()):
                continue
            best_dl = max(val_mean, key=lambda c: val_mean[c] if val_mean[c] == val_mean[c]
                          else -1)
            for st in SETTINGS[kind]:
                ov = {c: mean_std(_vals(cells, model, seeds, kind, st, c, "val"))[0]
                      for c in others}
                ov = {c: v for c, v in ov.items() if v == v}
                if not ov:
                    continue
                best_o = max(ov, key=ov.get)  # type: ignore[arg-type]
                t_dl = _vals(cells, model, seeds, kind, st, best_dl, "test")
                t_o = _vals(cells, model, seeds, kind, st, best_o, "test")
                diff = mean_std(t_dl)[0] - mean_std(t_o)[0]
                # room: what the best other criterion loses against the uncompressed model;
                # below 1 pt no criterion can be ahead of it by 1 pt without beating the
                # uncompressed model itself
                room = base - mean_std(t_o)[0]
                summary[f"{model}|{kind}|{st}"] = {"deeplift": best_dl, "other": best_o,
                                                    "dl_test": t_dl, "other_test": t_o,
                                                    "diff": diff, "room": room}
                lines.append(f"| {model} | {kind} | {st} | {best_dl} | {fmt(t_dl)} | {best_o} "
                             f"| {fmt(t_o)} | {diff:+.2f} | {room:.2f} |")
    return summary, lines


def full_table(cells: Cells, model: str, seeds: list[int], kinds: list[str]) -> list[str]:
    lines = [f"#### {model}: test accuracy % (mean ± std over seeds {seeds})", ""]
    base = [cells.data[f"{model}|{s}|base"]["test"] for s in seeds
            if f"{model}|{s}|base" in cells.data]
    lines += [f"Baseline {fmt(base)}.", ""]
    for kind in kinds:
        crits = criteria_for(kind)
        lines += [f"| {kind} | " + " | ".join(str(s) for s in SETTINGS[kind]) + " |",
                  "|---|" + "---:|" * len(SETTINGS[kind])]
        for c in crits:
            row = [fmt(_vals(cells, model, seeds, kind, s, c, "test")) for s in SETTINGS[kind]]
            if any(r != "nan ± nan" for r in row):
                lines.append(f"| {c} | " + " | ".join(row) + " |")
        lines.append("")
    return lines


def bn_table(cells: Cells, seeds: list[int]) -> list[str]:
    lines = ["| scope | criterion | no re-estimation | BatchNorm re-estimated | + least-squares "
             "reconstruction |", "|---|---|---:|---:|---:|"]
    for scope in ("global", "layer"):
        for crit in ["deeplift", "l1", "random"]:
            v = {tag: [cells.data[k]["test"] for s in seeds
                       if (k := f"bn|resnet20|{s}|{scope}|{crit}|{tag}") in cells.data]
                 for tag in ("False", "True", "True|rec")}
            if any(v.values()):
                lines.append(f"| {scope} | {crit} | {fmt(v['False'])} | {fmt(v['True'])} | "
                             f"{fmt(v['True|rec'])} |")
    return lines


#: margins the tuning split is run at (the chosen one is `budget.MARGIN`)
MARGINS = (0.0, 0.5, 1.0, 1.645)
BUDGET = 0.5


def _budget_rows(cells: Cells, spec: str, seeds: list[int], margin: float | None,
                 probes: int = PROBES) -> list[tuple[int, dict[str, Any]]]:
    return [(s, cells.data[k]) for s in seeds
            if (k := budget_key(spec, s, margin, probes)) in cells.data]


def _budget_line(label: str, rs: list[dict[str, Any]]) -> str:
    ok = sum(r["test_drop"] <= BUDGET for r in rs)
    val = fmt([r["val_drop"] for r in rs])
    se = f" (SE {fmt([r['val_se'] for r in rs])})" if "val_se" in rs[0] else ""
    tse = fmt([r["test_se"] for r in rs]) if "test_se" in rs[0] else "-"
    return (f"| {label} | {len(rs)} | {fmt([r['ratio'] for r in rs], 1)} | "
            f"{fmt([r['test_drop'] for r in rs])} | {tse} | {val}{se} | {ok}/{len(rs)} |")


def _seed_line(seed: int, r: dict[str, Any]) -> str:
    path = "; ".join(f"{x['name']} {x['field']}="
                     f"{x['chosen'] if x['chosen'] is not None else 'left out'}"
                     f" ({len(x['probes'])} probes)" for x in r["search"])
    se = f" ± {r['val_se']:.2f}" if "val_se" in r else ""
    tse = f"{r['test_se']:.2f}" if "test_se" in r else "-"
    return (f"|  | seed {seed}: {path} | {r['ratio']:.1f} | {r['test_drop']:.2f} | {tse} | "
            f"{r['val_drop']:.2f}{se} | {'yes' if r['test_drop'] <= BUDGET else 'no'} |")


def calibration_lines(cells: Cells, seeds: list[int], tuning: str) -> list[str]:
    """How often a probe the rule accepts at the whole budget exceeds it on the test split,
    per margin, over every probe of the tuning runs (deduplicated)."""
    pop: dict[tuple[float, ...], dict[str, float]] = {}
    for m in MARGINS:
        for s, r in _budget_rows(cells, tuning, seeds, m):
            for row in r.get("population", []):
                pop[(s, round(row["val_drop"], 4), round(row["val_se"], 4),
                     round(row["test_drop"], 4))] = row
    rows = list(pop.values())
    if not rows:
        return []
    out = [f"{len(rows)} distinct probes of the `{tuning}` runs (all stages), each measured "
           "against its baseline on the validation and the test split:", "",
           "| margin z | accepted (drop + z SE <= 0.5 on validation) | of those, test drop > 0.5 "
           "pt | mean test drop of the accepted |", "|---:|---:|---:|---:|"]
    for m in MARGINS:
        acc = [r for r in rows if r["val_drop"] + m * r["val_se"] <= BUDGET + 1e-9]
        bad = sum(r["test_drop"] > BUDGET + 1e-9 for r in acc)
        mean = fmt([r["test_drop"] for r in acc]) if acc else "-"
        out.append(f"| {m:g} | {len(acc)} | {bad} | {mean} |")
    return out


def budget_table(cells: Cells, seeds: list[int], specs: list[str],
                 tuning: str = TUNING) -> list[str]:
    from xaicompress.pipeline.budget import MARGIN

    head = ["| run | seeds | x smaller | test drop pt | test SE pt | validation drop pt "
            "| within 0.5 pt (test) |", "|---|---|---:|---:|---:|---:|---|"]
    lines = [f"Margin chosen on `{tuning}` (validation = {BUDGET_VAL:.0%} of the training split, "
             f"{PROBES} probes per stage): z = {MARGIN:g}. SE = standard error of the paired "
             "drop (baseline and compressed model on the same images); the validation drop "
             "of the kept model was chosen among several probes on the same images "
             "(optimistic). The margin was swept with the lenet5 config of that day (2 + 6 "
             "epochs of pruning fine-tuning); the z = 1 rows were rerun with the shipped "
             "config (6 + 15), the z = 0.5 rows were not.", "",
             "#### Tuning split: margin swept", "", *head]
    for m in MARGINS:
        rs = [r for _, r in _budget_rows(cells, tuning, seeds, m)]
        if rs:
            lines.append(_budget_line(f"`{tuning}` z = {m:g}", rs))
    lines += ["", *calibration_lines(cells, seeds, tuning), "",
              f"#### Checked with z = {MARGIN:g} (not tuned on)", "", *head]
    checked = []
    for spec in specs:
        rows = _budget_rows(cells, spec, seeds, MARGIN)
        if rows:
            lines.append(_budget_line(f"`{spec}`", [r for _, r in rows]))
            lines += [_seed_line(s, r) for s, r in rows]
            checked += [r for _, r in rows]
    if checked:
        ok = sum(r["test_drop"] <= BUDGET for r in checked)
        left = sum(any(x["chosen"] is None for x in r["search"]) for r in checked)
        lines += ["", f"Within the budget on the test split in {ok} of {len(checked)} check "
                  f"runs; {left} of them left a stage out (no setting of it kept the budget "
                  "with the margin). The test split is a noisy judge too: its paired SE is "
                  f"{fmt([r['test_se'] for r in checked])} pt (1,000 images), so one run's "
                  "test drop is itself uncertain by about twice that (95%)."]
        tuned = [r for _, r in _budget_rows(cells, tuning, seeds, MARGIN)]
        gap = [r["test_drop"] - r["val_drop"] for r in checked]
        lines += ["", "Test drop minus validation drop of the kept model: "
                  f"{fmt([r['test_drop'] - r['val_drop'] for r in tuned])} pt on `{tuning}`, "
                  f"{fmt(gap)} pt on the check splits: a margin chosen on one split and 3 "
                  "seeds did not carry over. The margin bounds each probe, not the chain: "
                  "each of the three greedy stages keeps its strongest passing probe and the "
                  "next starts from it, all judged on the same validation images, which "
                  "makes the kept model's validation drop optimistic by an amount that varies "
                  "from run to run (docs/design.md, known limitations)."]
    lines += ["", "#### Before: no margin, validation 10% (400 images)", "", *head]
    for spec in specs:
        rows = _budget_rows(cells, spec, seeds, None)
        if rows:
            lines.append(_budget_line(f"`{spec}`", [r for _, r in rows]))
            lines += [_seed_line(s, r) for s, r in rows]
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="grid,bn,budget")
    add_seeds(ap)
    ap.add_argument("--models", default="lenet5,resnet20", help="grid models (comma list)")
    ap.add_argument("--kinds", default="structured,structured_rec,unstructured,"
                    "unstructured_rec,share,quantize")
    ap.add_argument("--budget-data", default="mnist5k,mnist5k?split=1",
                    help="splits the budget is checked on (comma list)")
    ap.add_argument("--tuning-data", default=TUNING,
                    help="the split the margin is chosen on (its probes are evaluated too)")
    ap.add_argument("--margin", type=float, default=None,
                    help="the budget's margin in standard errors (default: the library's)")
    ap.add_argument("--budget-probes", type=int, default=PROBES,
                    help="stage runs per searched stage in the budget part")
    ap.add_argument("--out", default="/tmp/xaicompress-post-training",
                    help="folder of the budget runs' outputs and caches")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the tables")
    ap.add_argument("--cells", default=str(CELLS), help="JSON file of finished cells")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    global OUT
    OUT = Path(args.out)
    seeds = args.seeds
    models, kinds = args.models.split(","), args.kinds.split(",")
    parts, specs = args.parts.split(","), args.budget_data.split(",")
    known: dict[str, Any] = {}
    for other in sorted(RESULTS.glob("post_training_cells*.json")):
        if other.resolve() != Path(args.cells).resolve():
            known.update(json.loads(other.read_text()))
    cells = Cells(Path(args.cells), known)
    if not args.report_only:
        if "bn" in parts:
            run_bn(seeds, cells)
        if "budget" in parts:
            from xaicompress.pipeline.budget import MARGIN

            margin = MARGIN if args.margin is None else args.margin
            run_budget(seeds, cells, specs, Path(args.out) / "budget", margin,
                       args.budget_probes, {args.tuning_data})
        if "grid" in parts:
            run_grid(models, seeds, cells, kinds)
    merged = Cells(CELLS)
    for extra in sorted(RESULTS.glob("post_training_cells*.json")):
        merged.data.update(json.loads(extra.read_text()))
    write_report(merged, seeds, models, kinds, specs)


def goal_lines(cells: Cells, summary: dict[str, Any], seeds: list[int], specs: list[str]
               ) -> list[str]:
    """The issue's goals, met or missed, from the numbers above."""
    ahead = sum(v["diff"] >= 1.0 for v in summary.values())
    behind = sum(v["diff"] < -0.5 for v in summary.values())
    ok1 = summary and ahead >= len(summary) / 2 and behind == 0
    out = [f"- DeepLIFT ahead of the best other criterion by >= 1 pt in at least half the "
           f"settings and never behind by more than 0.5 pt: ahead in {ahead} of "
           f"{len(summary)}, behind in {behind}: **{'met' if ok1 else 'missed'}**.",
           "  " + room_line(summary)]
    best = {}
    for tag in ("True", "True|rec"):
        for crit in ("deeplift", "l1", "random"):
            v = [cells.data[k]["test"] for s in seeds
                 if (k := f"bn|resnet20|{s}|global|{crit}|{tag}") in cells.data]
            if v:
                best[(tag, crit)] = v
    if best:
        (tag, crit), v = max(best.items(), key=lambda kv: mean_std(kv[1])[0])
        how = "BatchNorm re-estimation" + (" + reconstruction" if "rec" in tag else "")
        met = mean_std(v)[0] >= 80
        out.append(f"- resnet20 one-shot global 0.5 >= 80% before fine-tuning: best {fmt(v)}% "
                   f"({crit}, {how}, {len(v)} seed(s)): **{'met' if met else 'missed'}**.")
    from xaicompress.pipeline.budget import MARGIN

    for spec in specs:
        rs = [r for _, r in _budget_rows(cells, spec, seeds, MARGIN)]
        if not rs:
            continue
        within = sum(r["test_drop"] <= 0.5 for r in rs)
        big = sum(r["ratio"] >= 60 for r in rs)
        goal = ">= 60x at <= 0.5 pt test drop" if spec == "mnist5k" else \
            "test drop <= 0.5 pt on a second split"
        met = within == len(rs) and (big == len(rs) or spec != "mnist5k") and len(rs) == 3
        out.append(f"- `compress --max-drop 0.5` (margin z = {MARGIN:g}) on `{spec}`, {goal}: "
                   f"{len(rs)} seed(s) run, "
                   f"{fmt([r['ratio'] for r in rs], 1)}x, test drop "
                   f"{fmt([r['test_drop'] for r in rs])} pt, within budget in {within}/"
                   f"{len(rs)}: **{'met' if met else 'missed'}**.")
    return out


def room_line(summary: dict[str, Any]) -> str:
    """How many settings leave room to be ahead by 1 pt at all, and DeepLIFT's record there."""
    roomy = [v for v in summary.values() if v["room"] >= 1.0]
    ahead = sum(v["diff"] >= 1.0 for v in roomy)
    behind = sum(v["diff"] < -0.5 for v in roomy)
    return (f"In {len(summary) - len(roomy)} of the {len(summary)} settings the best other "
            "criterion loses less than 1 pt against the uncompressed model (column room), so "
            "no criterion can be ahead of it by 1 pt there; in the "
            f"{len(roomy)} others DeepLIFT is ahead by >= 1 pt in {ahead} and behind by more "
            f"than 0.5 pt in {behind}.")


#: the issue's four grid models (the report says which were not run)
ISSUE_MODELS = ("lenet5", "vgg11", "resnet20", "timm:mobilenetv2_100")


def scale_line(cells: Cells, seeds: list[int]) -> str:
    """Which of the issue's models the grid ran, on how many seeds (read from the cells)."""
    ran = {m: sum(f"{m}|{s}|base" in cells.data for s in seeds) for m in ISSUE_MODELS}
    done = [f"{m} ({n} seed{'s' if n > 1 else ''})" for m, n in ran.items() if n]
    missing = [m for m, n in ran.items() if not n]
    return ("The grid ran on " + ", ".join(done) + "." +
            (f" Not run: {', '.join(missing)}." if missing else ""))


def write_report(cells: Cells, seeds: list[int], models: list[str], kinds: list[str],
                 specs: list[str]) -> None:
    summary, lines = grid_summary(cells, models, seeds, kinds)
    ahead = sum(v["diff"] >= 1.0 for v in summary.values())
    behind = sum(v["diff"] < -0.5 for v in summary.values())
    md = ["## Post-training compression (script-written)", "",
          "One-shot, no fine-tuning, 1,024 calibration images (BatchNorm re-estimated, biases "
          "corrected), criteria on 512 of them; validation = 10% of the training split; "
          f"seeds {seeds}; torch on one CPU thread. `benchmarks/post_training.py`. "
          f"{scale_line(cells, seeds)} The budget part with {PROBES} probes per stage (CLI "
          f"default 6), validation {BUDGET_VAL:.0%} of the training split there.", "",
          "### Goals (issue 16)", "", *goal_lines(cells, summary, seeds, specs), "",
          "### DeepLIFT (one variant per compression, chosen on validation) vs the best other "
          "criterion (chosen per setting on validation), test accuracy", "",
          f"DeepLIFT ahead by >= 1 pt in {ahead} of {len(summary)} settings, behind by more "
          f"than 0.5 pt in {behind}. {room_line(summary)}", "", *lines, "",
          "### resnet20, one-shot 0.5, BatchNorm re-estimation (test accuracy %)", "",
          *bn_table(cells, seeds), "",
          "### Accuracy budget: `compress --config configs/lenet5-mnist.yaml --max-drop 0.5`",
          "", *budget_table(cells, seeds, specs), "", "### All cells", ""]
    for model in models:
        md += full_table(cells, model, seeds, kinds)
    write_section("post_training", "\n".join(md))
    write_json("post_training", {"summary": summary, "cells": cells.data, "seeds": seeds})


if __name__ == "__main__":
    main()
