"""GPU checks (issue 19): skipped without CUDA. Not yet run: the session that wrote them had
no GPU (docs/RESULTS.md). Run with `python -m pytest -q tests/test_gpu.py` on a GPU machine.

- every step leaves its model on the GPU it was placed on, and writes CPU files that load
  on a CPU-only machine to the same outputs (within float tolerance);
- DeepLIFT relevance on the GPU agrees with the CPU's to 1e-4 relative;
- amp (bf16 / fp16 with a GradScaler) trains a finite float32 checkpoint;
- `compress` with 2 ranks (NCCL on 2 GPUs; 2 processes sharing one GPU over gloo, which
  NCCL refuses) matches the 1-rank run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REL_TOL = 1e-4


@pytest.fixture
def cuda_runtime():
    from xaicompress.device import make_runtime, use_runtime

    with use_runtime(make_runtime("cuda")) as rt:
        yield rt


def _on_cuda(model: torch.nn.Module) -> bool:
    return all(t.device.type == "cuda" for t in (*model.parameters(), *model.buffers()))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / max(float(a.abs().max()), 1e-30))


def test_every_step_stays_on_the_gpu_and_writes_cpu_files(tmp_path, mnist, cuda_runtime):
    from xaicompress.checkpoint import load_checkpoint, probe_outputs, save_checkpoint
    from xaicompress.export.packed import load_packed, write_packed
    from xaicompress.pipeline.config import (
        FinetuneStage,
        PruneStructuredStage,
        PruneUnstructuredStage,
        QuantizeStage,
        ShareStage,
    )
    from xaicompress.pipeline.stages import run_stage
    from xaicompress.train import train_checkpoint

    ckpt = train_checkpoint("lenet5", "mnist5k", epochs=1, bundle=mnist)
    assert _on_cuda(ckpt.model)
    stages = [
        PruneStructuredStage(type="prune_structured", ratio=0.3, samples=128,
                             finetune_epochs=0.2),
        PruneUnstructuredStage(type="prune_unstructured", ratio=0.5, samples=128,
                               finetune_epochs=0.2),
        ShareStage(type="share", clusters=16, samples=128, finetune_epochs=0.2),
        FinetuneStage(type="finetune", epochs=0.2),
    ]
    for st in stages:
        ckpt = run_stage(ckpt, mnist, st, 0)
        assert _on_cuda(ckpt.model), st.type
    quant = run_stage(train_checkpoint("lenet5", "mnist5k", epochs=1, bundle=mnist), mnist,
                      QuantizeStage(type="quantize", avg_bits=4, samples=128, qat_epochs=0.2,
                                    act_bits=8), 0)
    assert _on_cuda(quant.model)
    for i, c in enumerate((ckpt, quant)):
        path = save_checkpoint(c, tmp_path / f"m{i}.safetensors")
        back = load_checkpoint(path)
        assert all(t.device.type == "cpu" for t in back.model.state_dict().values())
        assert torch.equal(probe_outputs(back.model, back.spec.input_shape),
                           probe_outputs(c.model, c.spec.input_shape))  # CPU copy: exact
        packed = load_packed(write_packed(c, tmp_path / f"m{i}.xcpk"))
        assert torch.equal(probe_outputs(packed.model, packed.spec.input_shape),
                           probe_outputs(c.model, c.spec.input_shape))


@pytest.mark.parametrize("model_name", ["lenet5", "resnet20"])
def test_relevance_cpu_and_gpu_agree(mnist, model_name):
    from xaicompress.models import create_model
    from xaicompress.relevance import compute_relevance, get_criterion

    torch.manual_seed(0)
    model = create_model(model_name, mnist.input_shape, mnist.num_classes).eval()
    crit = get_criterion("deeplift")
    cpu = compute_relevance(model, crit, mnist, samples=256, seed=0)
    gpu = compute_relevance(model.to("cuda"), crit, mnist, samples=256, seed=0)
    for layer in cpu.units:
        assert _rel_err(cpu.units[layer], gpu.units[layer]) <= REL_TOL, layer
        assert _rel_err(cpu.weights[layer], gpu.weights[layer]) <= REL_TOL, layer
        assert gpu.units[layer].device.type == "cpu"  # a result, on the CPU


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains_a_finite_float32_checkpoint(tmp_path, run_cli, amp):
    out = tmp_path / f"{amp}.safetensors"
    code, stdout, err = run_cli("train", "--model", "lenet5", "--data", "mnist5k", "--epochs",
                                "1", "--device", "cuda", "--amp", amp, "--out", out)
    assert code == 0, err
    assert float(stdout.split("test accuracy ")[1].split("%")[0]) > 90.0
    from xaicompress.checkpoint import load_checkpoint

    back = load_checkpoint(out)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all()
               for t in back.model.state_dict().values() if t.is_floating_point())


def test_cuda_index_beyond_the_gpus_is_exit_2(run_cli, tmp_path):
    n = torch.cuda.device_count()
    code, _, err = run_cli("train", "--device", f"cuda:{n}", "--out", tmp_path / "m.st")
    assert code == 2 and f"GPU index {n} does not exist" in err


CONFIG = {
    "model": "lenet5", "data": "mnist5k", "seed": 0, "train": {"epochs": 2},
    "stages": [{"type": "prune_structured", "ratio": 0.5, "scope": "layer", "samples": 256,
                "finetune_epochs": 0.5},
               {"type": "share", "clusters": 16, "samples": 256}],
    "export": {"onnx": False},
    "report": {"fidelity_samples": 32, "heatmaps": 0, "latency_repeats": 2},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], cwd, **env: str) -> None:
    env = {**os.environ, "XAICOMPRESS_NO_PROGRESS": "1", **env}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.slow
def test_two_ranks_match_one(tmp_path):
    """2 ranks: NCCL on cuda:0 / cuda:1 with two GPUs, else two processes on one GPU over
    gloo (NCCL refuses two ranks on one device)."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    two_gpus = torch.cuda.device_count() >= 2
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "xaicompress", "compress", "--config", str(cfg), "--device",
          "cuda:0", "--out", str(one)], tmp_path)
    device = [] if two_gpus else ["--device", "cuda:0"]  # auto = cuda:LOCAL_RANK
    env = {} if two_gpus else {"XAICOMPRESS_DIST_BACKEND": "gloo"}
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
          f"--master_port={_free_port()}", "-m", "xaicompress", "compress", "--config",
          str(cfg), *device, "--out", str(two)], tmp_path, **env)
    r1 = json.loads((one / "report.json").read_text())
    r2 = json.loads((two / "report.json").read_text())
    assert r2["final"]["params"] == r1["final"]["params"]
    assert abs(r2["final"]["accuracy"] - r1["final"]["accuracy"]) <= 1.0
    assert not list(two.rglob("*.tmp"))
