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
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import DOCS_RESULTS, write_json, write_section
from torch.utils.data import TensorDataset

from xaicompress.checkpoint import Checkpoint, ModelSpec
from xaicompress.export.onnx import INPUT_NAME
from xaicompress.export.onnx_graph import float_onnx
from xaicompress.export.onnx_qdq import qdq_bytes
from xaicompress.export.runtime import integer_op_counts, session
from xaicompress.prune import prune_structured
from xaicompress.quant.integer import quantize

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


def latency_part(models: list[str], rounds: int, per_round: int, tmp: Path) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for name in models:
        t0 = time.time()
        base = build(name)
        train_set = _random_set(128, 0)
        pruned = prune_structured(base, "l1", train_set, ratio=0.5, scope="layer", samples=64)
        q = quantize(pruned, "none", train_set, avg_bits=8, allocation="uniform", samples=64)
        files = {"fp32": tmp / f"{name}_fp32.onnx", "int8": tmp / f"{name}_int8.onnx"}
        files["fp32"].write_bytes(float_onnx(pruned)[0].SerializeToString())
        files["int8"].write_bytes(qdq_bytes(q, _random_set(64, 1).tensors[0]))
        if name == "resnet20":
            files["fp32_unpruned"] = tmp / f"{name}_fp32_unpruned.onnx"
            files["fp32_unpruned"].write_bytes(float_onnx(base)[0].SerializeToString())
        ops = integer_op_counts(files["int8"])
        res[name] = {"latency_ms": time_files(files, rounds=rounds, per_round=per_round),
                     "bytes": {k: p.stat().st_size for k, p in files.items()},
                     "optimized_ops": dict(ops), "seconds": time.time() - t0}
        print(name, res[name]["latency_ms"], flush=True)
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
    lines = ["| model | integer operators onnxruntime runs (optimized graph) | float Conv / "
             "Gemm / MatMul left |", "|---|---|---|"]
    for name, r in res.items():
        ops = r["optimized_ops"]
        ints = ", ".join(f"{k} {v}" for k, v in sorted(ops.items()) if k.startswith("Q"))
        floats = sum(ops.get(k, 0) for k in ("Conv", "Gemm", "MatMul"))
        lines.append(f"| {name} | {ints} | {floats} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["latency"],
                    choices=["latency"])
    ap.add_argument("--models", nargs="+", default=list(LATENCY_MODELS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    results: dict[str, Any] = {"config": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        if "latency" in args.parts:
            results["latency"] = latency_part(args.models, args.rounds, args.per_round,
                                              Path(tmp))
    write_json("deploy", results)
    md = ["# Deployable files (benchmarks/deploy.py)", "",
          "onnxruntime CPU execution provider, all graph optimizations, medians of "
          f"{args.rounds} interleaved rounds x {args.per_round} runs. The machine is shared "
          "(2 cores, other jobs running), so 2-thread figures are noisy.", ""]
    if "latency" in results:
        md += ["## Latency: int8 QDQ vs fp32 ONNX of the same pruned model", "",
               latency_table(results["latency"]), "", ops_table(results["latency"]), ""]
    write_section("deploy", "\n".join(md))
    print((DOCS_RESULTS / "deploy.md").read_text())


if __name__ == "__main__":
    main()
