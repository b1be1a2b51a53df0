"""Kill a `compress` run with SIGKILL at random moments: whatever files exist afterwards
load, and a rerun finishes (resuming from the stage cache)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

CONFIG = {
    "model": "lenet5", "data": "mnist5k", "seed": 0,
    "train": {"epochs": 1},
    "stages": [
        {"type": "prune_structured", "criterion": "l1", "ratio": 0.5, "scope": "layer",
         "finetune_epochs": 0.5},
        {"type": "prune_unstructured", "criterion": "deeplift", "ratio": 0.8,
         "finetune_epochs": 0.5, "samples": 64},
        {"type": "share", "criterion": "none", "clusters": 16},
    ],
    "report": {"fidelity_samples": 32, "heatmaps": 2, "latency_repeats": 2},
}


def _check_every_file_loads(out: Path) -> int:
    from PIL import Image

    from xaicompress.checkpoint import load_checkpoint
    from xaicompress.export.packed import load_packed

    n = 0
    for p in out.rglob("*"):
        if not p.is_file() or p.name.endswith(".tmp"):
            continue  # a killed writer's temporary file: never a final name
        if p.suffix == ".safetensors":
            load_checkpoint(p)
        elif p.suffix == ".xcpk":
            load_packed(p)
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".png":
            with Image.open(p) as im:
                im.verify()
        elif p.suffix == ".onnx":
            import onnx

            onnx.checker.check_model(onnx.load(str(p)))
        elif p.suffix == ".md":
            p.read_text()
        n += 1
    return n


def test_sigkill_at_random_moments_then_rerun(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "xaicompress", "compress", "--config", str(cfg),
           "--out", str(out)]
    env = {**os.environ, "XAICOMPRESS_NO_PROGRESS": "1"}
    rng = random.Random(1234)
    for delay in sorted(rng.uniform(1.5, 15.0) for _ in range(3)):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            _check_every_file_loads(out)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _check_every_file_loads(out) >= 5
    report = json.loads((out / "report.json").read_text())
    assert report["final"]["params"] < report["baseline"]["params"]
    assert not list(out.rglob(".*.tmp"))  # the rerun swept the killed runs' temp files
