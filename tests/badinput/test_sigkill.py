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

import pytest
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
        if not p.is_file() or p.name.endswith(".tmp") or p.name.startswith(".xaicompress"):
            continue  # a killed writer's temporary file (never a final name), the manifest
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


@pytest.mark.slow
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
    assert not list(out.rglob(".xaicompress-*.tmp"))  # the rerun swept the killed runs' temps


SIGNAL_CONFIG = {
    "model": "lenet5", "data": "mnist5k", "seed": 0, "train": {"epochs": 0.5},
    "stages": [
        {"type": "prune_unstructured", "criterion": "l1", "ratio": 0.8, "finetune_epochs": 2},
        {"type": "share", "criterion": "none", "clusters": 16},
    ],
    "export": {"onnx": False},
    "report": {"fidelity_samples": 16, "heatmaps": 0, "latency_repeats": 1},
}


def _interrupt_after_baseline(tmp_path: Path, sig: int) -> tuple[subprocess.CompletedProcess,
                                                                  Path, list[str]]:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(SIGNAL_CONFIG))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "xaicompress", "compress", "--config", str(cfg),
           "--out", str(out)]
    env = {**os.environ, "XAICOMPRESS_NO_PROGRESS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 300
    while not list((out / "cache").glob("00-baseline-*.safetensors")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # inside the first stage's fine-tuning
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), out, cmd


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_run_says_what_was_kept_and_resumes(tmp_path, sig, code):
    done, out, cmd = _interrupt_after_baseline(tmp_path, sig)
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert signal.Signals(sig).name in lines[0] and "kept in" in lines[0]
    assert "the baseline" in lines[0] and "resume" in lines[0]
    assert not list(out.rglob(".xaicompress-*.tmp"))  # no half-written file
    assert not (out / "report.json").exists() and not (out / "model.xcpk").exists()
    _check_every_file_loads(out)
    env = {**os.environ, "XAICOMPRESS_NO_PROGRESS": "1"}
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "1 from cache" in rerun.stdout  # the baseline was reused
    assert (out / "report.json").is_file()


def test_deferred_signal_is_raised_after_the_block():
    from xaicompress.interrupt import Interrupted, deferred, handle_signals

    steps = []
    with handle_signals(), pytest.raises(Interrupted) as exc:
        with deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            steps.append("finished the block")
    assert steps == ["finished the block"] and exc.value.exit_code == 143
