"""Integer ONNX with 8-bit weights: int8 weights (U8S8 kernels) against uint8 weights with
zero point 128 (U8U8, what `export/onnx_qdq.py` writes for integers wider than +-64),
side by side in one run on this machine: each file's outputs against the same file run
without fused integer kernels (optimizations off: Q/DQ around float operators), on
random calibration inputs and a worst-case input (every pixel at the calibrated maximum), and
latency.

x86 U8S8 kernels without AVX-512 VNNI (AVX2) add pairs of uint8 x int8 products in int16
and saturate; U8U8 kernels widen first. This script measures what the choice costs and
buys on the machine it runs on (the row records the machine).

    python benchmarks/int8_weights.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_json  # noqa: E402
from deploy import LATENCY_MODELS, _random_set, build, pruned_int8, time_files  # noqa: E402

from xaicompress.export import onnx_qdq  # noqa: E402
from xaicompress.export.runtime import INTEGER_OPS, integer_op_counts, ort_predict  # noqa: E402


def export(q, path: Path, samples, wide: bool) -> Path:
    """The integer file with full-range weights as uint8 (wide) or as int8 (the former
    export)."""
    saved = onnx_qdq.SATURATION_FREE
    onnx_qdq.SATURATION_FREE = saved if wide else 127
    try:
        path.write_bytes(onnx_qdq.qdq_bytes(q, samples))
    finally:
        onnx_qdq.SATURATION_FREE = saved
    return path


def emulated(path: Path, x: torch.Tensor) -> np.ndarray:
    """The file's outputs with onnxruntime's graph optimizations off: QuantizeLinear /
    DequantizeLinear around float operators, no fused integer kernel."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(LATENCY_MODELS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--per-round", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            base = build(name)
            _, q = pruned_int8(base, _random_set(128, 0), "global")
            calib = _random_set(64, 1).tensors[0]
            # the worst case: inputs at the top of the calibrated range
            bright = torch.full((4, *calib.shape[1:]), float(calib.max()))
            samples = torch.cat([calib, bright])
            files = {k: export(q, Path(tmp) / f"{name}_{k}.onnx", samples, k == "u8u8")
                     for k in ("u8s8", "u8u8")}
            # reference: the same file with onnxruntime's optimizer off, i.e. the Q/DQ
            # nodes and float operators, so the integer kernels' own error is what differs
            x = torch.cat([calib[:16], bright])
            err = {}
            for k, p in files.items():
                want = emulated(p, x)
                got = ort_predict(p, x).numpy()
                err[k] = float(np.abs(got - want).max() / np.abs(want).max())
            fused = {k: sum(v for op, v in integer_op_counts(p).items() if op in INTEGER_OPS)
                     for k, p in files.items()}
            lat = time_files(files, rounds=args.rounds, per_round=args.per_round)
            rows[name] = {"max_error_rel": err, "integer_ops": fused, "latency_ms": lat}
            print(name, rows[name], flush=True)
    write_json("int8_weights", {"machine": machine(), "rows": rows})
    print("\n| model | threads | batch | int8 weights ms | uint8 weights ms | uint8 / int8 |"
          " max error int8 / uint8 (of max output) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, r in rows.items():
        for th, per in r["latency_ms"].items():
            for b, t in per.items():
                print(f"| {name} | {th} | {b} | {t['u8s8']:.2f} | {t['u8u8']:.2f} | "
                      f"{t['u8u8'] / t['u8s8']:.2f} | {r['max_error_rel']['u8s8']:.3f} / "
                      f"{r['max_error_rel']['u8u8']:.3f} |")
    print(f"\nMachine: {machine()}")


if __name__ == "__main__":
    main()
