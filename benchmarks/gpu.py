"""GPU figures (issue 19): relevance and fine-tuning throughput on the GPU vs the CPU for
resnet20 (3 x 32 x 32) and resnet18 (torchvision, 3 x 112 x 112), and torchrun with 1 and 2
ranks giving the same relevance (to 1e-5 relative).

    python benchmarks/gpu.py [--quick]

Without a GPU it measures nothing: it prints so and records that in
benchmarks/results/gpu.json and docs/results/gpu.md (no number is made up). Inputs are
random tensors: throughput does not depend on pixel values. Each figure is measured side
by side in one run (CPU and GPU on the same machine, same batches, same model).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_json, write_section  # noqa: E402

MODELS = {"resnet20": (3, 32, 32), "resnet18": (3, 112, 112)}
#: the random inputs are already "normalised": DeepLIFT's black reference is then 0
NORM = {"pixel_mean": (0.0, 0.0, 0.0), "pixel_std": (1.0, 1.0, 1.0)}


def _model(name: str, shape: tuple[int, int, int]) -> Any:
    if name == "resnet18":
        from xaicompress.models.vision_import import import_torchvision

        return import_torchvision().models.resnet18(num_classes=10)
    from xaicompress.models import create_model

    return create_model(name, shape, 10)


def _data(shape: tuple[int, int, int], n: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(n, *shape, generator=g),
                                          torch.randint(0, 10, (n,), generator=g))


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def relevance_rate(model: Any, data: Any, device: Any, samples: int) -> float:
    """DeepLIFT (units and per-sample weights) images per second on `device`."""
    from xaicompress.relevance import compute_relevance, get_criterion

    model = model.to(device).eval()
    crit = get_criterion("deeplift")
    compute_relevance(model, crit, data, samples=min(32, samples), batch_size=32,
                      **NORM)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    compute_relevance(model, crit, data, samples=samples, batch_size=64, **NORM)
    _sync(device)
    return samples / (time.perf_counter() - t0)


def finetune_rate(model: Any, data: Any, device: Any, amp: str, batches: int) -> float:
    """Training images per second (Adam, batch 64) on `device` with `amp`."""
    from xaicompress.device import make_runtime, use_runtime
    from xaicompress.train import train

    model = model.to(device)
    epochs = batches * 64 / len(data)
    with use_runtime(make_runtime(str(device), amp=amp)):
        train(model, data, epochs=epochs / batches, augment=0)  # warm-up (one batch)
        _sync(device)
        t0 = time.perf_counter()
        train(model, data, epochs=epochs, augment=0)
        _sync(device)
    return batches * 64 / (time.perf_counter() - t0)


def throughput(quick: bool) -> list[dict[str, Any]]:
    import torch

    rows = []
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for name, shape in MODELS.items():
        cpu_samples = 32 if quick or name == "resnet18" else 128
        data = _data(shape, 1024)
        row: dict[str, Any] = {"model": name, "input": list(shape)}
        torch.manual_seed(0)
        base = _model(name, shape)
        row["relevance_cpu_img_s"] = relevance_rate(_copy(base), data, cpu, cpu_samples)
        row["relevance_gpu_img_s"] = relevance_rate(_copy(base), data, gpu,
                                                    256 if quick else 1024)
        batches_cpu, batches_gpu = (2, 10) if quick else (5, 50)
        row["finetune_cpu_img_s"] = finetune_rate(_copy(base), data, cpu, "off", batches_cpu)
        for amp in ("off", "bf16"):
            row[f"finetune_gpu_{amp}_img_s"] = finetune_rate(_copy(base), data, gpu, amp,
                                                             batches_gpu)
        rows.append(row)
        print(json.dumps(row))
    return rows


def _copy(model: Any) -> Any:
    import copy

    return copy.deepcopy(model)


# ---------------------------------------------------------------- torchrun agreement
def _worker(out: str) -> None:
    """Under torchrun: resnet20 relevance of 256 fixed samples, rank 0 saves the units."""
    import torch
    from safetensors.torch import save_file

    from xaicompress.device import make_runtime, use_runtime
    from xaicompress.distributed import init_from_env, is_rank0, shutdown
    from xaicompress.relevance import compute_relevance, get_criterion

    init_from_env()
    try:
        device = os.environ.get("XC_DEVICE", "auto")
        with use_runtime(make_runtime(device)) as rt:
            torch.manual_seed(0)
            model = _model("resnet20", MODELS["resnet20"]).to(rt.device).eval()
            rel = compute_relevance(model, get_criterion("deeplift"),
                                    _data(MODELS["resnet20"], 256), samples=256, **NORM)
            if is_rank0():
                save_file({k: v.contiguous() for k, v in rel.to_tensors().items()}, out)
    finally:
        shutdown()


def torchrun_agreement(cpu: bool = False) -> dict[str, Any]:
    """Relevance of 1 and 2 ranks compared: on the GPU(s), or (cpu=True) gloo on the CPU."""
    import torch
    from safetensors.torch import load_file

    two_gpus = torch.cuda.device_count() >= 2
    with tempfile.TemporaryDirectory() as tmp:
        outs = {}
        for n in (1, 2):
            out = str(Path(tmp) / f"rel{n}.safetensors")
            env = {**os.environ, "XAICOMPRESS_NO_PROGRESS": "1"}
            if cpu:
                env.update(XC_DEVICE="cpu", OMP_NUM_THREADS="1")
            elif n == 2 and not two_gpus:  # NCCL refuses two ranks on one GPU
                env.update(XAICOMPRESS_DIST_BACKEND="gloo", XC_DEVICE="cuda:0")
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            subprocess.run([sys.executable, "-m", "torch.distributed.run",
                            f"--nproc_per_node={n}", f"--master_port={port}", __file__,
                            "--worker", out], env=env, check=True, timeout=1200)
            outs[n] = load_file(out)
    worst = max(float((outs[1][k].double() - outs[2][k].double()).abs().max()
                      / max(float(outs[1][k].abs().max()), 1e-30)) for k in outs[1])
    backend = ("gloo on the CPU" if cpu else "nccl" if two_gpus else "gloo (2 ranks on 1 GPU)")
    return {"ranks": [1, 2], "backend": backend,
            "max_rel_diff": worst, "within_1e-5": worst <= 1e-5}


# ---------------------------------------------------------------- report
def _markdown(result: dict[str, Any]) -> str:
    if not result["measured"]:
        t = result["cpu_torchrun"]
        return ("## GPU (issue 19)\n\nGPU figures not measured: " + result["reason"] + ". The "
                "code is written to run on a GPU (docs/design.md \"Devices\") but has never run "
                "on one; `python benchmarks/gpu.py` on a GPU machine fills this table, and "
                "`python -m pytest -q tests/test_gpu.py` runs the GPU checks.\n\n"
                f"Measured on the CPU instead: torchrun 1 vs 2 ranks ({t['backend']}), resnet20 "
                f"DeepLIFT relevance of 256 random inputs: max relative difference "
                f"{t['max_rel_diff']:.1e} (target 1e-5: "
                f"{'met' if t['within_1e-5'] else 'missed'}).\n")
    lines = ["## GPU (issue 19)", "", f"{result['gpu']}, torch {result['torch']}; images/s "
             "(random inputs, DeepLIFT units + per-sample weights; fine-tuning Adam batch 64).",
             "", "| model | relevance CPU | relevance GPU | x | fine-tune CPU | GPU fp32 | "
             "GPU bf16 |", "|---|---|---|---|---|---|---|"]
    for r in result["throughput"]:
        lines.append(f"| {r['model']} | {r['relevance_cpu_img_s']:.0f} | "
                     f"{r['relevance_gpu_img_s']:.0f} | "
                     f"{r['relevance_gpu_img_s'] / r['relevance_cpu_img_s']:.1f} | "
                     f"{r['finetune_cpu_img_s']:.0f} | {r['finetune_gpu_off_img_s']:.0f} | "
                     f"{r['finetune_gpu_bf16_img_s']:.0f} |")
    t = result["torchrun"]
    lines += ["", f"torchrun 1 vs 2 ranks ({t['backend']}): max relative difference of the "
              f"relevance {t['max_rel_diff']:.1e} (target 1e-5: "
              f"{'met' if t['within_1e-5'] else 'missed'})."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer samples and steps")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker)
        return
    import torch

    torch.set_num_threads(min(torch.get_num_threads(), 16))
    result: dict[str, Any] = {"torch": torch.__version__}
    if not torch.cuda.is_available():
        reason = (f"no GPU available (torch {torch.__version__}, "
                  f"{'CPU-only build' if torch.version.cuda is None else 'no CUDA device'})")
        print(f"benchmarks/gpu.py: {reason}; no GPU figure measured (CPU torchrun check only)")
        result.update(measured=False, reason=reason, cpu_torchrun=torchrun_agreement(cpu=True))
    else:
        result.update(measured=True, gpu=torch.cuda.get_device_name(0),
                      gpus=torch.cuda.device_count(), quick=args.quick,
                      throughput=throughput(args.quick), torchrun=torchrun_agreement())
    write_json("gpu", result)
    write_section("gpu", _markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
