"""Weight sharing benchmark: plain vs relevance-weighted k-means, with and without centroid
fine-tuning, and the packed size; plus per-layer clusters from `--avg-bits 3` vs k = 8.

lenet5 and lenet300 on mnist5k, k = 2, 4, 8, 16, 32 for every layer. Trained base models are
cached per (model, seed) in benchmarks/results/cache/. Writes
benchmarks/results/weight_sharing.json, docs/img/sharing_*.png and
docs/results/weight_sharing.md.

    python benchmarks/weight_sharing.py --seeds 0 1 2          # full run
    python benchmarks/weight_sharing.py --quick                # smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from xaicompress.atomic import atomic_save_figure, atomic_write_text
from xaicompress.checkpoint import load_checkpoint, save_checkpoint
from xaicompress.data import load_dataset
from xaicompress.export.packed import packed_report
from xaicompress.quant.codebook import finetune_shared, share_weights
from xaicompress.relevance import compute_relevance, get_criterion, list_criteria
from xaicompress.train import accuracy, train_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CACHE = RESULTS / "cache"
IMG = ROOT / "docs" / "img"
DOC = ROOT / "docs" / "results" / "weight_sharing.md"
#: criterion label -> spec; |w|-weighted is l1
CRITERIA = {"plain": "none", "l1": "l1", "taylor": "taylor", "deeplift": "deeplift"}


def base_model(model: str, seed: int, epochs: float, quick: bool):  # noqa: ANN201
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / (f"base_{model}_s{seed}.safetensors" if not quick
                    else f"share_quick_{model}_s{seed}.safetensors")
    if path.is_file():
        return load_checkpoint(path)
    ckpt = train_checkpoint(model, "mnist5k", epochs=epochs, lr=3e-3, seed=seed)
    save_checkpoint(ckpt, path)
    return ckpt


def run(models: list[str], seeds: list[int], ks: list[int], quick: bool,
        ft_epochs: float, samples: int) -> dict:
    bundle = load_dataset("mnist5k")
    test = bundle.test
    criteria = {k: v for k, v in CRITERIA.items() if v in list_criteria()}
    rows = []
    for model in models:
        for seed in seeds:
            base = base_model(model, seed, 2 if quick else 15, quick)
            base_acc = accuracy(base.model, test)
            base_bytes = packed_report(base).file_bytes
            rels = {}
            for label, spec in criteria.items():
                t0 = time.perf_counter()
                rels[label] = compute_relevance(base.model, get_criterion(spec), bundle,
                                                samples=samples, seed=seed)
                print(f"{model} s{seed} relevance {label}: {time.perf_counter() - t0:.1f}s",
                      flush=True)
            configs = [(label, k, None) for k in ks for label in criteria]
            configs += [(label, None, 3.0) for label in criteria if label in ("plain",
                                                                              "deeplift")]
            for label, k, avg in configs:
                crit = get_criterion(criteria[label])
                sh = share_weights(base, crit, bundle, clusters=k, avg_bits=avg, seed=seed,
                                   relevance=rels[label])
                ft = finetune_shared(sh, bundle.train, epochs=ft_epochs, seed=seed)
                rep = packed_report(sh)
                info = sh.history[-1]
                row = {"model": model, "seed": seed, "criterion": label, "k": k,
                       "avg_bits": avg, "base_acc": base_acc, "base_bytes": base_bytes,
                       "acc": accuracy(sh.model, test), "acc_ft": accuracy(ft.model, test),
                       **{f"size_{n}": v for n, v in rep.as_dict().items()
                          if n != "parts_bits"},
                       "ks": {n: r["k"] for n, r in info["layers"].items()}}
                rows.append(row)
                print(f"{model} s{seed} {label:8s} k={k} avg={avg}: base {base_acc:.2f} "
                      f"acc {row['acc']:.2f} ft {row['acc_ft']:.2f} "
                      f"bytes {rep.file_bytes} (payload +{100 * rep.payload_overhead:.3f}% "
                      f"header {rep.header_bytes} B)", flush=True)
    return {"models": models, "seeds": seeds, "ks": ks, "criteria": list(criteria),
            "finetune_epochs": ft_epochs, "samples": samples, "quick": quick, "rows": rows}


def _ms(vals: list[float]) -> str:
    if not vals:
        return "-"
    m = statistics.mean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{m:.2f} ± {s:.2f}"


def _sel(rows: list[dict], **kw) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


def report(res: dict) -> str:
    rows = res["rows"]
    lines = ["## Weight sharing (relevance-weighted k-means, issue 5)", "",
             f"mnist5k, seeds {res['seeds']}, {res['samples']} relevance samples, "
             f"{res['finetune_epochs']} epoch of centroid fine-tuning (Adam, centroid lr 0.02/k "
             "within [1e-3, 1e-2], other parameters 1e-3), "
             "codebooks fp16, every Conv/Linear layer shared with the same k. "
             "Accuracy in %, mean ± std over seeds; Δ = shared − dense base of the same seed.",
             ""]
    for model in res["models"]:
        base = [r["base_acc"] for r in _sel(rows, model=model, criterion="plain",
                                             k=res["ks"][0])]
        lines += [f"### {model} (dense base {_ms(base)} %, "
                  f"{_sel(rows, model=model)[0]['base_bytes']} B packed fp32)", "",
                  "| k | criterion | acc | Δ no FT | acc after FT | Δ FT | packed B |",
                  "|---|---|---|---|---|---|---|"]
        for k in res["ks"] + [None]:
            for label in res["criteria"]:
                sel = _sel(rows, model=model, k=k, criterion=label)
                if not sel:
                    continue
                name = f"{k}" if k else "avg 3 bits"
                lines.append(
                    f"| {name} | {label} | {_ms([r['acc'] for r in sel])} | "
                    f"{_ms([r['acc'] - r['base_acc'] for r in sel])} | "
                    f"{_ms([r['acc_ft'] for r in sel])} | "
                    f"{_ms([r['acc_ft'] - r['base_acc'] for r in sel])} | "
                    f"{statistics.mean(r['size_file_bytes'] for r in sel):.0f} |")
        lines.append("")
    lines += ["### Goals", ""] + goals(res) + [""]
    over = [r["size_payload_overhead"] for r in rows]
    fo = [r["size_file_overhead"] for r in rows]
    lines += [f"Packed file vs theoretical bit count (indices + codebooks + fp32 biases): "
              f"payload overhead max {100 * max(over):.3f} % (byte alignment), whole file "
              f"incl. header {100 * min(fo):.2f}–{100 * max(fo):.2f} % (header "
              f"{min(r['size_header_bytes'] for r in rows)}–"
              f"{max(r['size_header_bytes'] for r in rows)} B: zlib JSON with spec, "
              "encodings, history).", "",
              "![accuracy vs k](../img/sharing_accuracy.png)", ""]
    return "\n".join(lines)


def goals(res: dict) -> list[str]:
    rows = res["rows"]
    out = []

    def delta(model, k, label, ft):
        return [r[("acc_ft" if ft else "acc")] - r["base_acc"]
                for r in _sel(rows, model=model, k=k, criterion=label)]

    for model in res["models"]:
        for k, ft, tol in ((16, False, 0.3), (4, True, 0.5), (2, True, 2.0)):
            d = delta(model, k, "plain", ft)
            best = max(((statistics.mean(delta(model, k, c, ft)), c) for c in res["criteria"]
                        if delta(model, k, c, ft)), default=(float("nan"), "-"))
            if not d:
                continue
            m = statistics.mean(d)
            out.append(f"- {model} k={k} {'with' if ft else 'without'} fine-tuning within "
                       f"{tol} pt: plain Δ {m:+.2f} pt, best ({best[1]}) Δ {best[0]:+.2f} pt "
                       f"-> {'met' if max(m, best[0]) >= -tol else 'MISSED'}")
        for k in (2, 4):
            for c in ("deeplift", "taylor"):
                if c not in res["criteria"] or not delta(model, k, "plain", False):
                    continue
                dr = statistics.mean(delta(model, k, c, False))
                dp = statistics.mean(delta(model, k, "plain", False))
                dl = statistics.mean(delta(model, k, "l1", False))
                ok = dr - dp >= 1 and dr - dl >= 1
                out.append(f"- {model} k={k} no FT: {c} − plain {dr - dp:+.2f} pt, {c} − "
                           f"|w| {dr - dl:+.2f} pt (goal ≥ +1 on both) -> "
                           f"{'met' if ok else 'MISSED'}")
        for label in ("deeplift", "plain"):
            a = _sel(rows, model=model, k=None, criterion=label)
            b = _sel(rows, model=model, k=8, criterion=label)
            if a and b:
                ma, mb = (statistics.mean(r["acc"] for r in a),
                          statistics.mean(r["acc"] for r in b))
                fa, fb = (statistics.mean(r["acc_ft"] for r in a),
                          statistics.mean(r["acc_ft"] for r in b))
                out.append(f"- {model} avg 3 bits ({label}) vs k=8: {ma:.2f} vs {mb:.2f} "
                           f"(FT {fa:.2f} vs {fb:.2f}); clusters per layer "
                           f"{a[0]['ks']} -> {'met' if ma >= mb - 1e-9 else 'MISSED'}")
    return out


def plot(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, axes = plt.subplots(1, len(res["models"]), figsize=(6 * len(res["models"]), 4),
                             squeeze=False)
    for ax, model in zip(axes[0], res["models"], strict=True):
        for i, label in enumerate(res["criteria"]):
            for ft, style in ((False, "-"), (True, "--")):
                ys = [statistics.mean(r["acc_ft" if ft else "acc"]
                                      for r in _sel(rows, model=model, k=k, criterion=label))
                      for k in res["ks"]]
                ax.plot(res["ks"], ys, style, marker="o", color=f"C{i}",
                        label=f"{label}{' + FT' if ft else ''}")
        base = statistics.mean(r["base_acc"] for r in _sel(rows, model=model))
        ax.axhline(base, color="k", lw=0.8, ls=":", label="dense")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("clusters per layer k")
        ax.set_ylabel("test accuracy %")
        ax.set_title(f"{model} / mnist5k")
        ax.legend(fontsize=7)
    fig.tight_layout()
    IMG.mkdir(parents=True, exist_ok=True)
    atomic_save_figure(fig, IMG / "sharing_accuracy.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", default=["lenet5", "lenet300"])
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, lenet5, k 2/16")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.seeds, args.models, args.ks, args.samples = [0], ["lenet5"], [2, 16], 64
    t0 = time.perf_counter()
    res = run(args.models, args.seeds, args.ks, args.quick, 0.25 if args.quick else 1,
              args.samples)
    res["seconds"] = time.perf_counter() - t0
    name = "weight_sharing_quick" if args.quick else "weight_sharing"
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / f"{name}.json", json.dumps(res, indent=1))
    md = report(res)
    if not args.quick:
        plot(res)
        DOC.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(DOC, md + "\n")
    print(md)
    print(f"done in {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
