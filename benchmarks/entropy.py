"""Entropy coding and entropy-constrained sharing (issue 18): the shipped configs past 100x.

    python benchmarks/entropy.py                       # 3 seeds, lenet5 + lenet300 (+ resnet20)
    python benchmarks/entropy.py --models lenet5 --seeds 0 --data 'mnist5k?split=2'
    python benchmarks/entropy.py --tune lenet5 --seeds 0,1,2,3,4,5 --size-kb 2.2,2.4,2.7
                                                       # the validation sweep (split 2)

For every model and seed, on the test split of `mnist5k` and of `mnist5k?split=1` (10,000
other real digits' partition; the configs were chosen on `mnist5k?split=2`, `--tune`):
  shipped   configs/<model>-mnist.yaml as shipped (relevance-weighted entropy-constrained
            sharing, entropy-coded file)
  plain     the same with criterion none in the share stage (plain entropy-constrained
            assignment), at the same budget
  dc        Deep Compression's recipe at no larger a packed file (first split only): the
            shipped structured pruning, magnitude (l1) unstructured pruning of every layer
            at the ratio (bisection) that makes the file fit, plain k-means at 2 index bits
            on average (nearest assignment, criterion none, centroid fine-tuning),
            entropy-coded indices and positions (our range coder stands in for Huffman:
            it is never larger)
Also the encode (packed_bytes) and decode (packed_from_bytes) time of each final file, and
its bits per weight after coding per layer. Results: benchmarks/results/entropy.json and
docs/results/entropy.md. Every pipeline stage is cached (benchmarks/results/cache/entropy),
so the variants share their baseline and pruning stages and a rerun resumes.

`--tune MODEL` is the validation sweep the configs were chosen from: the shipped config of
MODEL on `mnist5k?split=2`, one run per seed and budget, with the share stage's budget set
by `--size-kb` (its size_kb values, the packed file's size in KiB: lenet5's config budgets
the file) or `--budgets` (its avg_bits values: lenet300, resnet20); the config's other
budget, if it has one, is dropped. Without either, the config's own budget. `--share`,
`--structured` and `--unstructured` take JSON options of the share / prune_structured /
prune_unstructured stages (`--share` wins over the budget; a null drops an option), e.g.

    python benchmarks/entropy.py --tune lenet5 --seeds 0,1,2,3,4,5 --size-kb 2.4 \
        --structured '{"finetune_epochs": 4}' --unstructured '{"ratio": 0.75}'

Each row (benchmarks/results/entropy_tune_MODEL.json, or `--tune-file`) records the
validation drop (`val_drop`: baseline - final accuracy on the validation split carved from
the training data, report.json `baseline.val_accuracy` - `final.val_accuracy`), on which
the choices are made, and the test drop of that split (`drop`), only shown; the docs'
validation table (`--merge`) has both, '-' for older rows without the validation drop.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, ROOT, fmt, machine, write_json, write_section  # noqa: E402

CACHE = RESULTS / "cache" / "entropy"
GOALS = {"lenet5": (100, 0.5), "lenet300": (100, 0.5), "resnet20": (40, 0.5)}
SPLITS = ("mnist5k", "mnist5k?split=1")
TUNE_SPLIT = "mnist5k?split=2"


def _config(model: str, data: str, share: dict[str, Any] | None = None,
            unstructured: dict[str, Any] | None = None,
            structured: dict[str, Any] | None = None) -> Any:
    from xaicompress.pipeline import load_config
    from xaicompress.pipeline.config import validate_config

    cfg = load_config(ROOT / "configs" / f"{model}-mnist.yaml")
    raw = cfg.model_dump(mode="json", exclude_none=True)
    raw["data"] = data
    raw["report"] = {**raw.get("report", {}), "fidelity": False, "heatmaps": 0,
                     "latency_repeats": 1}
    raw["export"] = {"packed": True, "onnx": False}
    for st in raw["stages"]:
        if st["type"] == "share" and share is not None:
            st.update(share)
            for k in [k for k, v in share.items() if v is None]:
                st.pop(k, None)  # None = the option left out (another budget replaces it)
        if st["type"] == "prune_unstructured" and unstructured is not None:
            st.update(unstructured)
        if st["type"] == "prune_structured" and structured is not None:
            st.update(structured)
    raw.pop("name", None)
    return validate_config(raw, f"{model} variant")


#: finetune_qat keyword arguments (library constants, not options) a tuning run sets
QAT_KWARGS: dict[str, float] = {}


def _qat_cache() -> Path:
    """The stage cache of a run with QAT_KWARGS: a folder of its own (the stage keys do not
    see library constants), seeded with the shared cache's entries before the share stage."""
    import shutil

    if not QAT_KWARGS:
        return CACHE
    folder = CACHE.parent / ("entropy-qat-" + "-".join(f"{k}{v}" for k, v in
                                                          sorted(QAT_KWARGS.items())))
    folder.mkdir(parents=True, exist_ok=True)
    for f in CACHE.glob("0[0-2]-*.safetensors"):
        if not (folder / f.name).exists():
            shutil.copy2(f, folder / f.name)
    return folder


def _patch_qat() -> None:
    import functools

    from xaicompress.quant import codebook, share_qat

    if QAT_KWARGS:
        kw = {k: int(v) if k in ("reassigns", "augment") else v for k, v in QAT_KWARGS.items()}
        codebook.finetune_qat = functools.partial(share_qat.finetune_qat, **kw)


def run(model: str, data: str, seed: int, tag: str, **variant: Any) -> dict[str, Any]:
    """One pipeline run; the numbers the tables need."""
    from xaicompress.export.packed import packed_bytes, packed_from_bytes
    from xaicompress.pipeline import run_pipeline

    cfg = _config(model, data, **variant).with_seed(seed)
    safe = data.replace("?", "_").replace("=", "")
    if QAT_KWARGS:
        tag += "-qat-" + "-".join(f"{k}{v}" for k, v in sorted(QAT_KWARGS.items()))
        variant = {**variant, "qat_kwargs": dict(QAT_KWARGS)}
    folder = RESULTS / "entropy" / f"{model}-{safe}-seed{seed}-{tag}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    _patch_qat()
    t0 = time.perf_counter()
    res = run_pipeline(cfg, folder, cache_dir=_qat_cache(), plots=False)
    wall = time.perf_counter() - t0
    raw = packed_bytes(res.final)
    enc = _median_time(lambda: packed_bytes(res.final))
    dec = _median_time(lambda: packed_from_bytes(raw))
    r = res.report
    base_val, final_val = r["baseline"].get("val_accuracy"), r["final"].get("val_accuracy")
    return {"model": model, "data": data, "seed": seed, "tag": tag, "variant": variant,
            "ratio": r["compression_ratio"], "drop": r["accuracy_drop"],
            "accuracy": r["final"]["accuracy"], "baseline_accuracy": r["baseline"]["accuracy"],
            # on the validation split carved from the training data (None without one)
            "val_drop": None if base_val is None or final_val is None else
            round(base_val - final_val, 4),
            "val_accuracy": final_val, "baseline_val_accuracy": base_val,
            "file_bytes": r["final"]["size_bytes"], "fp32_bytes": r["baseline"]["fp32_bytes"],
            "encode_ms": 1e3 * enc, "decode_ms": 1e3 * dec, "wall_s": wall, "machine": machine(),
            "layers": {n: {k: v for k, v in lay.items() if k in (
                "weights", "sparsity", "clusters", "coded_bits_per_weight")}
                for n, lay in r["layers"].items()}}


def _number_or_word(v: str) -> float | str:
    try:
        return float(v)
    except ValueError:
        return v


def _floats(text: str | None) -> list[float] | None:
    return None if text is None else [float(v) for v in text.split(",")]


def _median_time(fn: Any, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _share_stage(model: str) -> dict[str, Any]:
    """The budget options of the shipped config's share stage."""
    from xaicompress.pipeline import load_config

    cfg = load_config(ROOT / "configs" / f"{model}-mnist.yaml")
    st = next(s for s in cfg.stages if s.type == "share")
    return {"avg_bits": st.avg_bits, "clusters": st.clusters, "size_kb": st.size_kb}


BUDGET_KEYS = ("avg_bits", "size_kb")


def _tune_shares(model: str, avg_bits: list[float] | None, size_kb: list[float] | None,
                 share: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The share options of each budget of a sweep: avg_bits or size_kb values (neither:
    the config's own budget, or the one --share sets), --share winning; the config's other
    budget is dropped (None: avg_bits and size_kb cannot both be set)."""
    if avg_bits is not None and size_kb is not None:
        raise SystemExit("give --budgets (avg_bits) or --size-kb, not both")
    st = _share_stage(model)
    share = share or {}
    if avg_bits is not None:
        budgets = [{"avg_bits": b} for b in avg_bits]
    elif size_kb is not None:
        budgets = [{"size_kb": b} for b in size_kb]
    elif any(k in share for k in BUDGET_KEYS):
        budgets = [{}]
    else:
        budgets = [{k: st[k]} for k in BUDGET_KEYS if st[k] is not None][:1] or [{}]
    out = []
    for b in budgets:
        opts = {**b, **share}  # share wins
        for k, other in (BUDGET_KEYS, BUDGET_KEYS[::-1]):
            if opts.get(k) is not None and st[other] is not None and other not in opts:
                opts[other] = None
        out.append(opts)
    return out


def _tag(variant: dict[str, Any]) -> str:
    """A run folder's name: the share options, then the other stages' (prefixed)."""
    return "tune-" + "-".join(
        f"{'' if part == 'share' else part + '.'}{k}{'None' if v is None else v}"
        for part, opts in variant.items() for k, v in sorted(opts.items()))


def dc_at_size(model: str, data: str, seed: int, target_bytes: int,
               steps: int = 3) -> dict[str, Any]:
    """Deep Compression's recipe at no larger a file than `target_bytes`: the shipped
    structured stage, then magnitude (l1) unstructured pruning of every layer at the
    smallest ratio (bisection on [0.8, 0.99]) whose file fits, plain k-means at 2 index bits
    on average (nearest, criterion none, MILP allocation, centroid fine-tuning) and the
    entropy-coded file."""
    # Deep Compression fine-tunes the centroids (QAT re-runs the entropy assignment, which
    # the nearest assignment does not have); a shipped size_kb budget gives way to avg_bits
    share = {"criterion": "none", "assignment": "nearest", "avg_bits": 2.0, "clusters": None,
             "size_kb": None, "finetune": "centroids"}
    lo, hi = 0.8, 0.99
    best = None
    for _ in range(steps):
        mid = round((lo + hi) / 2, 3)
        r = run(model, data, seed, f"dc{mid}", share=share,
                unstructured={"criterion": "l1", "ratio": mid, "layers": "all"})
        if r["file_bytes"] <= target_bytes:
            best, hi = r, mid
        else:
            lo = mid
    if best is None:
        best = run(model, data, seed, f"dc{hi}", share=share,
                   unstructured={"criterion": "l1", "ratio": hi, "layers": "all"})
    return best


def evaluate(models: list[str], seeds: list[int], splits: tuple[str, ...], dc: bool,
             plain: bool = True) -> list[dict[str, Any]]:
    rows = []
    for model in models:
        for data in splits:
            for seed in seeds:
                shipped = run(model, data, seed, "shipped")
                rows.append(shipped)
                if plain:
                    rows.append(run(model, data, seed, "plain", share={"criterion": "none"}))
                if dc and data == splits[0]:
                    rows.append({**dc_at_size(model, data, seed, shipped["file_bytes"]),
                                 "tag": "dc"})
                print(json.dumps({k: rows[-1][k] for k in ("model", "data", "seed", "ratio",
                                                           "drop")}), flush=True)
    return rows


def tune(model: str, seeds: list[int], budgets: list[float] | None = None,
         share: dict[str, Any] | None = None, unstructured: dict[str, Any] | None = None,
         structured: dict[str, Any] | None = None, size_kb: list[float] | None = None,
         path: Path | None = None) -> list[dict[str, Any]]:
    """The validation sweep: the shipped config with other share budgets (`budgets`:
    avg_bits, `size_kb`: the file's KiB; `_tune_shares`) and the share / unstructured /
    structured options given, on TUNE_SPLIT; appended to the sweep's earlier rows in `path`
    (default benchmarks/results/entropy_tune_<model>.json; a row of the same options and
    seed is replaced). Each row has the validation drop (`val_drop`, the deciding one) and
    the test drop of TUNE_SPLIT (`drop`)."""
    path = path or RESULTS / f"entropy_tune_{model}.json"
    rows: list[dict[str, Any]] = []
    for opts in _tune_shares(model, budgets, size_kb, share):
        for seed in seeds:
            variant = {"share": opts}
            if unstructured:
                variant["unstructured"] = unstructured
            if structured:
                variant["structured"] = structured
            r = run(model, TUNE_SPLIT, seed, _tag(variant), **variant)
            rows.append(r)
            # read again just before writing: two sweeps may run side by side
            old = json.loads(path.read_text()) if path.is_file() else []
            write_json(f"entropy_tune_{model}", [
                x for x in old if (x["variant"], x["seed"]) != (r["variant"], seed)] + [r],
                path=path)
            print(json.dumps({k: r[k] for k in ("model", "seed", "ratio", "val_drop", "drop",
                                                "file_bytes", "wall_s")} | variant),
                  flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], seeds: list[int]) -> str:
    lines = ["## Entropy coding and entropy-constrained sharing (issue 18)", "",
             "`python benchmarks/entropy.py`: the shipped configs (relevance-weighted "
             "entropy-constrained sharing with quantization-aware training, `finetune: qat`, "
             "entropy-coded packed file), the same with plain (unweighted) entropy-constrained "
             "assignment at the same budget, and (unless `--no-dc`) Deep Compression's recipe "
             "(magnitude pruning, plain k-means, entropy coding) at no larger a file; seeds "
             f"{', '.join(map(str, seeds))}; configs chosen on "
             f"`{TUNE_SPLIT}`, reported on the test splits of `mnist5k` and `mnist5k?split=1`. "
             "x smaller = fp32 weights / packed file bytes; drop = baseline - final accuracy "
             "(points).", "",
             "| model | data | variant | x smaller | drop (pt) | file bytes | encode ms | "
             "decode ms | goal |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["data"], r["tag"]), []).append(r)
    for (model, data, tag), rs in groups.items():
        ratio = [r["ratio"] for r in rs]
        drop = [r["drop"] for r in rs]
        goal = ""
        if tag == "shipped" and model in GOALS:
            x, pt = GOALS[model]
            met = min(ratio) >= x and sum(drop) / len(drop) <= pt
            goal = f"{x}x at <= {pt} pt: {'met' if met else 'missed'}"
        lines.append(f"| {model} | `{data}` | {tag} | {fmt(ratio, 1)} | {fmt(drop)} | "
                     f"{fmt([r['file_bytes'] for r in rs], 0)} | "
                     f"{fmt([r['encode_ms'] for r in rs], 1)} | "
                     f"{fmt([r['decode_ms'] for r in rs], 1)} | {goal} |")
    lines += ["", "Relevance-weighted minus plain assignment at the same budget (paired by seed, "
              "accuracy points; goal >= +0.5): " + "; ".join(_paired(rows)) + ".",
              "", "Bits per weight after coding, per layer (shipped config, first seed, "
              "`mnist5k`; indices, positions, codebook and scales included, / all weights of "
              "the layer):", ""]
    for r in rows:
        if r["tag"] == "shipped" and r["data"] == SPLITS[0] and r["seed"] == seeds[0]:
            lines.append(f"- {r['model']}: " + ", ".join(
                f"{n} {lay['coded_bits_per_weight']:.3f} ({lay['weights']:,} w, "
                f"{100 * lay['sparsity']:.0f}% zero)" for n, lay in r["layers"].items()
                if lay.get("coded_bits_per_weight") is not None))
    return "\n".join(lines)


def _paired(rows: list[dict[str, Any]]) -> list[str]:
    """Per model and data: mean ± std over seeds of plain drop - shipped drop."""
    by = {(r["model"], r["data"], r["tag"], r["seed"]): r for r in rows}
    out = []
    for (model, data, tag, seed) in sorted(by):
        if tag != "shipped" or (model, data, "plain", seed) not in by:
            continue
        if out and out[-1][0] == (model, data):
            out[-1][1].append(by[(model, data, "plain", seed)]["drop"] - by[
                (model, data, tag, seed)]["drop"])
        else:
            out.append(((model, data), [by[(model, data, "plain", seed)]["drop"] - by[
                (model, data, tag, seed)]["drop"]]))
    return [f"{m} `{d}` {fmt(v)} pt ({len(v)} seeds)" for (m, d), v in out]


#: hand-written notes on the figures, appended to the section by every merge
NOTES = ROOT / "benchmarks" / "notes" / "entropy.md"


def merge() -> None:
    rows, notes = [], []
    for model in GOALS:
        p = RESULTS / f"entropy_{model}.json"
        if p.is_file():
            data = json.loads(p.read_text())
            rows += data["rows"]
            notes.append(f"{model}: seeds {', '.join(map(str, data['seeds']))}")
    seeds = sorted({r["seed"] for r in rows})
    write_json("entropy", {"seeds": seeds, "rows": rows})
    # what the numbers say, written by hand (kept across regenerations)
    hand = NOTES.read_text() if NOTES.is_file() else ""
    write_section("entropy", markdown(rows, seeds) + "\n\nRuns per model: " +
                  "; ".join(notes) + ".\n\n" + _validation() + _speed() +
                  ("\n\n" + hand.lstrip("\n") if hand else ""))


def _val_drop(rs: list[dict[str, Any]]) -> str:
    """Mean ± std of the rows' validation drops; '-' where no row has one (older rows), the
    count where only some have."""
    vals = [r["val_drop"] for r in rs if r.get("val_drop") is not None]
    if not vals:
        return "-"
    return fmt(vals) + (f" ({len(vals)} of {len(rs)} seeds)" if len(vals) < len(rs) else "")


def _validation() -> str:
    """The validation runs (TUNE_SPLIT) the configs were chosen from, one row per variant:
    the validation drop decides, the test drop of TUNE_SPLIT is only shown."""
    lines = [f"Validation runs on `{TUNE_SPLIT}` (the share stage's options as changed from "
             "the config of the time, null = dropped, then those of other stages; "
             "`qat_kwargs`: `finetune_qat` constants of the run, "
             "rows without them and with `finetune: qat` ran at the final defaults; older "
             "rows predate the QAT share). The configs are chosen on the validation drop "
             "(baseline - final accuracy on the validation split carved from the training "
             "data; '-': older rows, which did not record it); the test drop is that of "
             f"`{TUNE_SPLIT}`'s test split, only shown:", "",
             "| model | options | seeds | x smaller | validation drop (pt) | test drop (pt) |",
             "|---|---|---|---:|---:|---:|"]
    for p in sorted(RESULTS.glob("entropy_tune_*.json")):
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in json.loads(p.read_text()):
            opts = {k: v for k, v in r["variant"].items() if k != "share"}
            key = json.dumps(r["variant"].get("share", {})) + (
                f" {json.dumps(opts)}" if opts else "")
            # rows of another machine are other models for the same seed (docs/design.md)
            model = r["model"] + (f" ({r['machine']})" if r.get("machine") else "")
            groups.setdefault(f"{model}|{key}", []).append(r)
        for key, rs in groups.items():
            model, opts = key.split("|", 1)
            seeds = ", ".join(str(r["seed"]) for r in rs)
            lines.append(f"| {model} | `{opts}` | {seeds} | {fmt([r['ratio'] for r in rs], 1)} "
                         f"| {_val_drop(rs)} | {fmt([r['drop'] for r in rs])} |")
    return "\n".join(lines) + "\n\n"


def _speed() -> str:
    p = RESULTS / "entropy_speed.json"
    if not p.is_file():
        return ""
    t = json.loads(p.read_text())["cpu_seconds_median"]
    return ("Share stage CPU time on a pruned LeNet-5 (`benchmarks/entropy_speed.py`, relevance "
            "given, no fine-tuning, 1 thread, median of 3): " + ", ".join(
                f"{k} {v:.2f} s" for k, v in t.items()) + ".")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lenet5,lenet300")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data", default=",".join(SPLITS))
    ap.add_argument("--no-dc", action="store_true", help="skip Deep Compression's recipe")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain assignment")
    ap.add_argument("--fresh", action="store_true", help="drop the model's earlier rows "
                    "(default: keep those of other data / seeds / variants)")
    ap.add_argument("--tune", default=None, help="model: the validation sweep instead")
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--budgets", default=None, help="with --tune: comma-separated "
                        "avg_bits values of the share stage (a config's size_kb is dropped)")
    budget.add_argument("--size-kb", default=None, help="with --tune: comma-separated "
                        "size_kb values of the share stage, the packed file's KiB (a "
                        "config's avg_bits is dropped); neither: the config's own budget")
    ap.add_argument("--tune-file", type=Path, default=None, help="with --tune: the rows' "
                    "JSON (default benchmarks/results/entropy_tune_<model>.json)")
    ap.add_argument("--share", default=None, help="with --tune: JSON of share options "
                    "(they win over the budget; null drops an option)")
    ap.add_argument("--qat", default=None, help="with --tune: finetune_qat keyword "
                    "arguments, e.g. latent_scale=0.05,other_lr=0.01,reassigns=4")
    ap.add_argument("--structured", default=None,
                    help="with --tune: JSON of structured-pruning options")
    ap.add_argument("--unstructured", default=None,
                    help="with --tune: JSON of unstructured-pruning options")
    ap.add_argument("--merge", action="store_true", help="combine the per-model results "
                    "(entropy_<model>.json) into entropy.json / docs/results/entropy.md")
    args = ap.parse_args()
    if args.merge:
        merge()
        return
    import torch

    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.qat:
        QAT_KWARGS.update({k: _number_or_word(v) for k, v in (kv.split("=") for kv in
                                                               args.qat.split(","))})
    if args.tune:
        tune(args.tune, seeds, _floats(args.budgets),
             json.loads(args.share) if args.share else None,
             json.loads(args.unstructured) if args.unstructured else None,
             json.loads(args.structured) if args.structured else None,
             size_kb=_floats(args.size_kb), path=args.tune_file)
        return
    rows = evaluate(args.models.split(","), seeds, tuple(args.data.split(",")),
                    not args.no_dc, not args.no_plain)
    for model in args.models.split(","):
        # rows of other data / seeds (a run per split side by side) are kept
        p = RESULTS / f"entropy_{model}.json"
        new = [r for r in rows if r["model"] == model]
        done = {(r["data"], r["seed"], r["tag"]) for r in new}
        old = [r for r in json.loads(p.read_text())["rows"] if (r["data"], r["seed"], r["tag"])
               not in done and r["data"] in args.data.split(",") + list(SPLITS)] \
            if p.is_file() and not args.fresh else []
        write_json(f"entropy_{model}", {"seeds": sorted({r["seed"] for r in old + new}),
                                        "rows": old + new})
    merge()


if __name__ == "__main__":
    main()
