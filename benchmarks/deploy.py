"""Deployable files measured where they are deployed: onnxruntime latency, accuracy and size.

Three parts, each measured side by side in one run (onnxruntime CPU execution provider,
graph optimizations on, 1 and 2 intra-op threads, batch 1 and 64, interleaved rounds,
medians):

- latency: the int8 QDQ ONNX (export/onnx_qdq.py) against the fp32 ONNX of the same
  structurally pruned model (ratio 0.5, L1 criterion, BatchNorm folded in both), on
  resnet20, vgg11, torchvision mobilenet_v2 and resnet18 (3 x 32 x 32 inputs, 10 classes;
  untrained weights, BatchNorm statistics from random inputs: latency does not depend on
  the values), plus resnet20 pruned + int8 against the unpruned fp32 ONNX;
- accuracy: resnet20 and vgg11 trained briefly on mnist5k, pruned 0.5 with a short
  fine-tune, quantized to 8 bits; the calibration method is chosen on a validation split
  (500 training images held out of training), then the test accuracy of the int8 ONNX (as
  onnxruntime runs it, integer kernels) is compared with the PyTorch quantized model's, on
  split 0 and on split 1 (`mnist5k?split=1`);
- size: the demo pipeline (configs/lenet5-mnist.yaml, shortened training) exported as every
  deployable file, each with its size, its ratio to the fp32 ONNX and its accuracy.

Writes benchmarks/results/deploy.json and docs/results/deploy.md. The machine is shared
(2 cores, other jobs running): 2-thread figures are noisier than 1-thread ones.

    python benchmarks/deploy.py                 # everything (~30 min on 2 shared cores)
    python benchmarks/deploy.py --parts latency --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import DOCS_RESULTS, RESULTS, write_json, write_section
from torch.utils.data import TensorDataset

from xaicompress.checkpoint import Checkpoint, ModelSpec
from xaicompress.data import dataset_tensors, load_dataset
from xaicompress.export.calibration import CALIBRATION_METHODS, calibration_samples
from xaicompress.export.onnx import INPUT_NAME
from xaicompress.export.onnx_graph import float_onnx
from xaicompress.export.onnx_qdq import qdq_bytes
from xaicompress.export.runtime import integer_op_counts, ort_predict, session
from xaicompress.metrics import count_macs
from xaicompress.prune import prune_structured
from xaicompress.quant.integer import quantize
from xaicompress.train import accuracy, seed_everything, train

SHAPE = (3, 32, 32)
LATENCY_MODELS = ("resnet20", "vgg11", "mobilenet_v2", "resnet18")
THREADS = (1, 2)
BATCHES = (1, 64)


def build(name: str) -> Checkpoint:
    """An untrained model on 3 x 32 x 32 inputs with BatchNorm statistics of random data."""
    if name in ("mobilenet_v2", "resnet18"):
        from xaicompress.models.vision_import import import_torchvision

        model = getattr(import_torchvision().models, name)(num_classes=10)
        spec = ModelSpec(f"torchvision:{name}", SHAPE, 10)
    else:
        spec = ModelSpec(name, SHAPE, 10)
        model = spec.build()
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(32, *SHAPE))
    return Checkpoint(model.eval(), spec, None)


def _random_set(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, *SHAPE, generator=g),
                         torch.randint(0, 10, (n,), generator=g))


def time_files(files: dict[str, Path], *, rounds: int, per_round: int) -> dict[str, Any]:
    """{threads: {batch: {file label: median ms}}}, files interleaved round by round so
    a load change on the shared machine hits every file alike."""
    out: dict[str, Any] = {}
    for threads in THREADS:
        sessions = {k: session(p, threads=threads) for k, p in files.items()}
        out[str(threads)] = {}
        for batch in BATCHES:
            x = np.random.default_rng(0).standard_normal((batch, *SHAPE)).astype(np.float32)
            times: dict[str, list[float]] = {k: [] for k in files}
            for s in sessions.values():
                for _ in range(3):
                    s.run(None, {INPUT_NAME: x})
            for _ in range(rounds):
                for k, s in sessions.items():
                    for _ in range(per_round):
                        t0 = time.perf_counter()
                        s.run(None, {INPUT_NAME: x})
                        times[k].append((time.perf_counter() - t0) * 1000)
            out[str(threads)][str(batch)] = {k: statistics.median(v) for k, v in times.items()}
    return out


def pruned_int8(base: Checkpoint, train_set: TensorDataset, scope: str
                ) -> tuple[Checkpoint, Checkpoint]:
    """The latency part's models: `base` with half its channels cut by L1 (no refit), and
    that model with 8-bit weights on every layer."""
    pruned = prune_structured(base, "l1", train_set, ratio=0.5, scope=scope, samples=64,
                              reconstruct=False)
    return pruned, quantize(pruned, "none", train_set, avg_bits=8, allocation="uniform",
                            samples=64)


def latency_part(models: list[str], scopes: list[str], rounds: int, per_round: int,
                 tmp: Path) -> dict[str, Any]:
    """Per model and pruning scope ("resnet20 global"): median latencies of the fp32 and
    int8 files (and of the unpruned fp32 file for resnet20), measured side by side."""
    res: dict[str, Any] = {}
    for name in models:
        base = build(name)
        train_set = _random_set(128, 0)
        for scope in scopes:
            t0 = time.time()
            label = f"{name} {scope}"
            pruned, q = pruned_int8(base, train_set, scope)
            files = {"fp32": tmp / f"{name}_fp32.onnx", "int8": tmp / f"{name}_int8.onnx"}
            files["fp32"].write_bytes(float_onnx(pruned)[0].SerializeToString())
            files["int8"].write_bytes(qdq_bytes(q, _random_set(64, 1).tensors[0]))
            if name == "resnet20":
                files["fp32_unpruned"] = tmp / f"{name}_fp32_unpruned.onnx"
                files["fp32_unpruned"].write_bytes(float_onnx(base)[0].SerializeToString())
            ops = integer_op_counts(files["int8"])
            res[label] = {"latency_ms": time_files(files, rounds=rounds, per_round=per_round),
                          "bytes": {k: p.stat().st_size for k, p in files.items()},
                          "macs": {"fp32": count_macs(pruned.model, SHAPE),
                                   "unpruned": count_macs(base.model, SHAPE)},
                          "optimized_ops": dict(ops), "seconds": time.time() - t0}
            print(label, res[label]["latency_ms"], flush=True)
    return res


def latency_table(res: dict[str, Any]) -> str:
    lines = ["| model | threads | batch | fp32 ONNX ms | int8 ONNX ms | int8 / fp32 | "
             "unpruned fp32 ms | pruned int8 / unpruned fp32 |", "|---" * 8 + "|"]
    for name, r in res.items():
        for th, per_batch in r["latency_ms"].items():
            for b, t in per_batch.items():
                un = t.get("fp32_unpruned")
                un_ms = "-" if un is None else f"{un:.3f}"
                un_ratio = "-" if un is None else f"**{t['int8'] / un:.2f}x**"
                lines.append(f"| {name} | {th} | {b} | {t['fp32']:.3f} | {t['int8']:.3f} | "
                             f"**{t['int8'] / t['fp32']:.2f}x** | {un_ms} | {un_ratio} |")
    return "\n".join(lines)


def ops_table(res: dict[str, Any]) -> str:
    lines = ["| model | MACs pruned / unpruned | integer operators onnxruntime runs (optimized "
             "graph) | float Conv / Gemm / MatMul left |", "|---|---|---|---|"]
    for name, r in res.items():
        ops = r["optimized_ops"]
        ints = ", ".join(f"{k} {v}" for k, v in sorted(ops.items()) if k.startswith("Q"))
        floats = sum(ops.get(k, 0) for k in ("Conv", "Gemm", "MatMul"))
        macs = r.get("macs", {})
        m = (f"{macs['fp32'] / 1e6:.1f}M / {macs['unpruned'] / 1e6:.1f}M" if macs else "-")
        lines.append(f"| {name} | {m} | {ints} | {floats} |")
    return "\n".join(lines)


ACCURACY_MODELS = ("resnet20", "vgg11")
VALIDATION = 500


def _split(spec: str, seed: int) -> tuple[Any, Any, Any]:
    """(train without the validation images, validation, test) of a dataset spec."""
    from torch.utils.data import Subset

    b = load_dataset(spec, seed=seed)
    perm = torch.randperm(len(b.train), generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(b.train, perm[VALIDATION:]), Subset(b.train, perm[:VALIDATION]), b.test


def _ort_accuracy(path: Path, dataset: Any) -> float:
    x, y = dataset_tensors(dataset)
    return float((ort_predict(path, x).argmax(1) == y).float().mean() * 100)


def accuracy_model(name: str, split: int, epochs: float, seed: int, tmp: Path,
                   method: str | None) -> dict[str, Any]:
    """Train, prune 0.5 (+ short fine-tune), quantize to 8 bits; accuracy of the PyTorch
    quantized model and of the int8 ONNX per calibration method (all on validation, the
    chosen one on test)."""
    spec_s = "mnist5k" if split == 0 else f"mnist5k?split={split}"
    tr, val, test = _split(spec_s, seed)
    seed_everything(seed)
    spec = ModelSpec(name, (1, 28, 28), 10)
    t0 = time.time()
    base = Checkpoint(train(spec.build(), tr, epochs=epochs, lr=3e-3, seed=seed), spec,
                      spec_s)
    pruned = prune_structured(base, "l1", tr, ratio=0.5, scope="layer", samples=128,
                              finetune_epochs=epochs / 2, seed=seed)
    q = quantize(pruned, "none", tr, avg_bits=8, allocation="uniform", samples=128, seed=seed)
    cal = calibration_samples(tr, 256, seed=seed)
    res: dict[str, Any] = {"split": split, "float_test": accuracy(pruned.model, test),
                           "pytorch_int8": {"validation": accuracy(q.model, val),
                                            "test": accuracy(q.model, test)},
                           "onnx_int8": {}}
    for m in CALIBRATION_METHODS if method is None else [method]:
        path = tmp / f"{name}_{split}_{m}.onnx"
        path.write_bytes(qdq_bytes(q, cal, method=m))
        res["onnx_int8"][m] = {"validation": _ort_accuracy(path, val),
                               "test": _ort_accuracy(path, test)}
    res["seconds"] = time.time() - t0
    print(name, split, res, flush=True)
    return res


def accuracy_part(models: list[str], epochs: float, seed: int, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in models:
        first = accuracy_model(name, 0, epochs, seed, tmp, None)
        # the calibration method: best int8 ONNX accuracy on the validation images
        best = max(first["onnx_int8"], key=lambda m: first["onnx_int8"][m]["validation"])
        second = accuracy_model(name, 1, epochs, seed, tmp, best)
        out[name] = {"chosen_method": best, "splits": [first, second]}
    return out


def accuracy_table(res: dict[str, Any]) -> str:
    lines = ["| model | split | calibration | float pruned % | PyTorch int8 % | int8 ONNX % "
             "(onnxruntime, integer kernels) | ONNX - PyTorch pt |", "|---" * 7 + "|"]
    for name, r in res.items():
        m = r["chosen_method"]
        for sp in r["splits"]:
            pt, ox = sp["pytorch_int8"]["test"], sp["onnx_int8"][m]["test"]
            lines.append(f"| {name} | {sp['split']} | {m} | {sp['float_test']:.2f} | "
                         f"{pt:.2f} | {ox:.2f} | **{ox - pt:+.2f}** |")
    lines += ["", "Validation accuracy of the int8 ONNX per calibration method (split 0, "
              f"{VALIDATION} training images held out; the best is used):", "",
              "| model | PyTorch int8 | " + " | ".join(CALIBRATION_METHODS) + " |",
              "|---" * (2 + len(CALIBRATION_METHODS)) + "|"]
    for name, r in res.items():
        sp = r["splits"][0]
        vals = " | ".join(f"{sp['onnx_int8'][m]['validation']:.2f}" for m in CALIBRATION_METHODS)
        lines.append(f"| {name} | {sp['pytorch_int8']['validation']:.2f} | {vals} |")
    return "\n".join(lines)


def size_part(train_epochs: float | None, seed: int, tmp: Path) -> dict[str, Any]:
    """The demo pipeline (shortened training) and the size of every file it writes."""
    import yaml

    from xaicompress.pipeline.config import validate_config
    from xaicompress.pipeline.run import run_pipeline

    data = yaml.safe_load((Path(__file__).parents[1] / "configs" / "lenet5-mnist.yaml")
                          .read_text())
    data["seed"] = seed
    if train_epochs is not None:
        data["train"]["epochs"] = train_epochs
        for st in data["stages"]:
            st["finetune_epochs"] = min(st.get("finetune_epochs", 0), 1)
    data["report"] = {"fidelity_samples": 32, "heatmaps": 0, "latency_repeats": 10}
    t0 = time.time()
    res = run_pipeline(validate_config(data), tmp / "demo", plots=False)
    rep = res.report
    fp32_onnx = len(float_onnx(res.baseline)[0].SerializeToString())
    from xaicompress.export.xcpk_reader import read_xcpk

    decoded = read_xcpk(str(res.files["packed"])).tensors
    want = res.final.model.state_dict()
    exact = set(decoded) == set(want) and all(
        np.array_equal(decoded[k], want[k].numpy()) for k in want)
    return {"config": data, "seconds": time.time() - t0, "fp32_onnx_bytes": fp32_onnx,
            "reader_exact": bool(exact),
            "baseline_accuracy": rep["baseline"]["accuracy"],
            "packed_accuracy": rep["final"]["accuracy"], "files": rep["deployables"]}


def size_table(res: dict[str, Any]) -> str:
    lines = [f"Original fp32 ONNX: {res['fp32_onnx_bytes'] / 1024:.1f} KB, accuracy "
             f"{res['baseline_accuracy']:.2f}%; the packed model's accuracy "
             f"{res['packed_accuracy']:.2f}%.", "",
             "| file | KB | x smaller than the fp32 ONNX | accuracy % | read by |",
             "|---|---:|---:|---:|---|"]
    for d in res["files"]:
        acc = res["packed_accuracy"] if d["kind"] in ("packed", "checkpoint") else d["accuracy"]
        lines.append(f"| `{d['file']}` | {d['bytes'] / 1024:.1f} | "
                     f"**{d['ratio_fp32_onnx']:.1f}x** | {acc:.2f} | {d['reads_it']} |")
    return "\n".join(lines)


def goals(results: dict[str, Any]) -> list[str]:
    """The issue's figures, each met or missed with the number measured."""
    out = []

    def line(ok: bool, text: str) -> None:
        out.append(f"- {'met' if ok else '**MISSED**'}: {text}")

    for name, r in results.get("latency", {}).items():
        ratios = [t["int8"] / t["fp32"] for per in r["latency_ms"].values()
                  for t in per.values()]
        one = [t["int8"] / t["fp32"] for t in r["latency_ms"]["1"].values()]
        line(max(one) <= 0.6, f"{name}: int8 QDQ / fp32 ONNX of the same pruned model "
             f"{' / '.join(f'{x:.2f}' for x in one)}x at 1 thread (batch 1 / 64; goal <= 0.6), "
             f"{' / '.join(f'{x:.2f}' for x in ratios[len(one):])}x at 2 threads")
        if "fp32_unpruned" in r["latency_ms"]["1"]["1"]:
            un = [t["int8"] / t["fp32_unpruned"] for per in r["latency_ms"].values()
                  for t in per.values()]
            line(max(un[:2]) <= 0.3, f"{name}: pruned 0.5 + int8 / unpruned fp32 ONNX "
                 f"{' / '.join(f'{x:.2f}' for x in un)}x (1 thread b1 / b64, 2 threads "
                 "b1 / b64; goal <= 0.3)")
    for name, r in results.get("accuracy", {}).items():
        m = r["chosen_method"]
        diffs = [sp["onnx_int8"][m]["test"] - sp["pytorch_int8"]["test"] for sp in r["splits"]]
        line(max(abs(d) for d in diffs) <= 0.3, f"{name}: int8 ONNX accuracy - PyTorch "
             f"quantized model's {' / '.join(f'{d:+.2f}' for d in diffs)} pt (split 0 / 1, "
             f"calibration {m}; goal within 0.3)")
    if "size" in results:
        sz = results["size"]
        onnx = next(d for d in sz["files"] if d["kind"] == "onnx")
        line(onnx["ratio_fp32_onnx"] >= 8 and abs(onnx["accuracy"] - sz["packed_accuracy"])
             < 0.05, f"demo pipeline: `{onnx['file']}` {onnx['ratio_fp32_onnx']:.1f}x smaller "
             f"than the fp32 ONNX (goal >= 8), accuracy {onnx['accuracy']:.2f}% vs the packed "
             f"model's {sz['packed_accuracy']:.2f}%")
        if "reader_exact" in sz:
            line(sz["reader_exact"], "the standalone reader decodes the demo's model.xcpk "
                 "to the library's exact weights")
    return out


def _write(results: dict[str, Any], args: Any) -> None:
    """results JSON and the markdown of the parts measured so far."""
    if args.quick:  # a smoke run never overwrites the real figures
        write_json("deploy_quick", results)
        return
    write_json("deploy", results)
    md = ["## Deployable files (benchmarks/deploy.py)", "",
          "onnxruntime CPU execution provider, all graph optimizations, medians of "
          f"{args.rounds} interleaved rounds x {args.per_round} runs. The machine is shared "
          "(2 cores, other jobs running), so 2-thread figures are noisy.", "",
          "Goals (issue 17):", "", *goals(results), ""]
    if "latency" in results:
        md += ["### Latency: int8 QDQ vs fp32 ONNX of the same pruned model", "",
               "Models on 3 x 32 x 32 inputs, untrained (BatchNorm statistics of random "
               "inputs), structurally pruned to half their channels with the L1 criterion: "
               "`global` ranks all channels together (the pipeline's default scope; layers "
               "keep uneven widths), `layer` halves every layer. Both files of a row are the "
               "same pruned model with BatchNorm folded; int8 = 8-bit weights "
               "(`quantize --avg-bits 8 --allocation uniform`) + calibrated uint8 "
               "activations.", "",
               latency_table(results["latency"]), "", ops_table(results["latency"]), ""]
    if "accuracy" in results:
        md += ["### Accuracy: int8 ONNX in onnxruntime vs the PyTorch quantized model", "",
               f"mnist5k, trained {args.epochs} epochs, pruned 0.5 per layer (L1) with "
               f"{args.epochs / 2} epochs of fine-tuning, 8-bit weights; activations "
               "calibrated on 256 training images. Test split of split 0 and of split 1.",
               "", accuracy_table(results["accuracy"]), ""]
    if "size" in results:
        ep = results["size"]["config"]["train"]["epochs"]
        md += ["### Size: the demo pipeline's files", "",
               f"configs/lenet5-mnist.yaml (seed {results['size']['config']['seed']}, "
               f"{ep} baseline epochs"
               + (", the shipped config as it is)." if ep == 15 else
                  ", fine-tuning capped at 1 epoch per stage).") + " x smaller = bytes of "
               "the original model's fp32 ONNX (BatchNorm folded) / bytes of the file.", "",
               size_table(results["size"]), ""]
    write_section("deploy", "\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["latency", "accuracy", "size"],
                    choices=["latency", "accuracy", "size"])
    ap.add_argument("--epochs", type=float, default=2,
                    help="training epochs of the accuracy models (fine-tune: half)")
    ap.add_argument("--demo-epochs", type=float, default=None,
                    help="baseline training epochs of the demo pipeline, fine-tuning capped "
                    "at 1 epoch per stage (default: the shipped config as it is)")
    ap.add_argument("--models", nargs="+", default=list(LATENCY_MODELS))
    ap.add_argument("--scopes", nargs="+", default=["global", "layer"],
                    help="structured pruning scopes of the latency models (ratio 0.5)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: resnet20 only, short "
                    "training, 2 rounds (writes deploy_quick.json only)")
    args = ap.parse_args()
    if args.quick:
        args.models, args.rounds, args.per_round = ["resnet20"], 2, 2
        args.epochs, args.demo_epochs = 0.3, 0.5
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    # parts measured by an earlier run stay (each run replaces the parts it measures)
    old = RESULTS / "deploy.json"
    results: dict[str, Any] = json.loads(old.read_text()) if old.is_file() else {}
    results["config"] = {**results.get("config", {}), **{k: v for k, v in vars(args).items()
                                                         if k != "parts"}}
    with tempfile.TemporaryDirectory() as tmp:
        if "latency" in args.parts:
            results["latency"] = latency_part(args.models, args.scopes, args.rounds,
                                              args.per_round, Path(tmp))
            _write(results, args)
        if "accuracy" in args.parts:
            results["accuracy"] = accuracy_part(
                ["resnet20"] if args.quick else list(ACCURACY_MODELS), args.epochs, args.seed,
                Path(tmp))
            _write(results, args)
        if "size" in args.parts:
            results["size"] = size_part(args.demo_epochs, args.seed, Path(tmp))
    _write(results, args)
    print((DOCS_RESULTS / "deploy.md").read_text())


if __name__ == "__main__":
    main()
