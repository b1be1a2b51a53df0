"""What the tool writes and what it leaves alone: atomic writes, temporary files, links,
full disks, a stale model.onnx, the cache noticing changed data, the environment, a
non-UTF-8 data folder, a user's own model next to its checkpoint, fidelity off."""

from __future__ import annotations

import errno
import json
import math
import os
import struct

import numpy as np
import pytest
import yaml

from xaicompress import atomic
from xaicompress.errors import XaiCompressError
from xaicompress.pipeline import run_pipeline, validate_config

QUICK = {"model": "lenet5", "data": "digits", "train": {"epochs": 0.2},
         "export": {"onnx": False}, "report": {"heatmaps": 0, "latency_repeats": 1,
                                               "fidelity_samples": 8}}


# ------------------------------------------------------------------ atomic writes
def test_long_target_names_work_and_temp_names_are_short(tmp_path):
    for n in (252, 255):
        p = tmp_path / ("m" * (n - 12) + ".safetensors")
        atomic.atomic_write_bytes(p, b"x" * 10)
        assert p.read_bytes() == b"x" * 10
    fd, tmp = atomic._create_temp(tmp_path)
    os.close(fd)
    assert atomic.TEMP_NAME.fullmatch(tmp.name) and len(tmp.name) < 40


def test_only_our_temp_files_are_swept(tmp_path):
    mine = [tmp_path / ".notes.tmp", tmp_path / ".model.safetensors.abc123.tmp",
            tmp_path / "x.tmp", tmp_path / ".xaicompress-short.tmp"]
    for p in mine:
        p.write_text("the user's")
    fd, ours = atomic._create_temp(tmp_path)
    os.close(fd)
    (tmp_path / ".xaicompress-0123456789abcdef.tmp").mkdir()  # a folder: never removed
    assert atomic.remove_stale_temps(tmp_path) == 1
    assert not ours.exists() and all(p.read_text() == "the user's" for p in mine)
    assert (tmp_path / ".xaicompress-0123456789abcdef.tmp").is_dir()


def test_a_link_to_a_file_is_written_through(tmp_path):
    target = tmp_path / "real.bin"
    target.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    atomic.atomic_write_bytes(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_full_disk_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch, where):
    p = tmp_path / "m.bin"
    p.write_bytes(b"precious")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "write":
        monkeypatch.setattr(atomic.os, "fdopen", lambda fd, *a, **k: _Full(fd))
    else:
        monkeypatch.setattr(atomic.os, where, full)
    with pytest.raises(XaiCompressError, match="m.bin: cannot write .No space left"):
        atomic.atomic_write_bytes(p, b"new content")
    monkeypatch.undo()
    assert p.read_bytes() == b"precious" and os.listdir(tmp_path) == ["m.bin"]


class _Full:
    def __init__(self, fd):
        self.fd = fd

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_devices_and_fifos_are_refused_never_replaced(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    for p in (tmp_path / "fifo", "/dev/null"):
        with pytest.raises(XaiCompressError, match="refusing to replace"):
            atomic.atomic_write_bytes(p, b"x")
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
    assert os.listdir(tmp_path) == ["fifo"]


# ------------------------------------------------------------------ environment
def test_rank_without_torchrun_is_a_normal_single_process_run(tmp_path, run_cli,
                                                               monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "3")
    out = tmp_path / "m.safetensors"
    code, _, err = run_cli("train", "--data", "digits", "--epochs", "0.1", "--out", out)
    assert code == 0, err
    assert out.is_file()


# ------------------------------------------------------------------ data
def test_folder_with_a_non_utf8_name_works(tmp_path, run_cli):
    from PIL import Image

    root = tmp_path / os.fsdecode(b"caf\xe9-images")
    for c in ("a", "b"):
        for i in range(5):
            (root / c).mkdir(parents=True, exist_ok=True)
            Image.new("L", (8, 8), 20 * i + (100 if c == "b" else 0)).save(root / c / f"{i}.png")
    out = tmp_path / "m.safetensors"
    code, stdout, err = run_cli("train", "--data", f"folder:{root}?size=8", "--epochs", "0.5",
                                "--out", out)
    assert code == 0, err
    assert out.is_file() and "test accuracy" in stdout


def _write_idx(root, n_train=40, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 255, (n, 8, 8), dtype=np.uint8)
        labels = (np.arange(n) % 4).astype(np.uint8)
        (root / f"{split}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 0x803, n, 8, 8) + imgs.tobytes())
        (root / f"{split}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x801, n) + labels.tobytes())


def test_cache_notices_changed_data_files(tmp_path):
    data = tmp_path / "idx"
    _write_idx(data)
    cfg = validate_config({**QUICK, "data": f"idx:{data}", "stages": [
        {"type": "prune_unstructured", "criterion": "l1", "ratio": 0.5}]})
    out = tmp_path / "out"
    assert run_pipeline(cfg, out, plots=False).cached == [False, False]
    assert run_pipeline(cfg, out, plots=False).cached == [True, True]
    # same size, same spec string, one pixel changed, mtime put back: still noticed
    img = data / "train-images-idx3-ubyte"
    st = img.stat()
    raw = bytearray(img.read_bytes())
    raw[100] ^= 0xFF
    img.write_bytes(bytes(raw))
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run_pipeline(cfg, out, plots=False).cached == [False, False]


# ------------------------------------------------------------------ outputs of compress
def test_rerun_removes_only_its_own_stale_outputs(tmp_path):
    out = tmp_path / "out"
    cfg = {**QUICK, "export": {"onnx": True, "packed": True}}
    run_pipeline(validate_config(cfg), out, plots=False)
    assert (out / "model.onnx").is_file() and (out / "model.xcpk").is_file()
    (out / "notes.txt").write_text("mine")
    run_pipeline(validate_config({**cfg, "export": {"onnx": False, "packed": True}}), out,
                 plots=False)
    assert not (out / "model.onnx").exists()  # ours and unchanged: not left as if current
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "model.xcpk").is_file()
    # a file of that name the user changed since is kept
    run_pipeline(validate_config(cfg), out, plots=False)
    (out / "model.onnx").write_bytes(b"the user's own onnx")
    run_pipeline(validate_config({**cfg, "export": {"onnx": False}}), out, plots=False)
    assert (out / "model.onnx").read_bytes() == b"the user's own onnx"
    listed = json.loads((out / ".xaicompress-outputs.json").read_text())["files"]
    assert "model.onnx" not in listed and "report.json" in listed


def test_user_temp_files_survive_compress(tmp_path):
    out = tmp_path / "out"
    (out / "cache").mkdir(parents=True)
    for p in (out / ".draft.tmp", out / "cache" / ".x.safetensors.tmp"):
        p.write_text("keep me")
    run_pipeline(validate_config(QUICK), out, plots=False)
    assert (out / ".draft.tmp").read_text() == "keep me"
    assert (out / "cache" / ".x.safetensors.tmp").read_text() == "keep me"


USER_MODEL = '''
import torch
import torch.nn as nn


class Gate(nn.Module):
    # a softmax over channels has no DeepLIFT rule: fidelity and heatmaps are skipped,
    # the rest works
    def forward(self, x):
        return x * torch.softmax(x, dim=1)


def build(in_channels, image_size, num_classes):
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), Gate(),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * image_size ** 2, num_classes))
'''


def test_users_own_model_from_its_checkpoint_and_no_deeplift_rule(tmp_path, monkeypatch):
    from xaicompress.checkpoint import save_checkpoint
    from xaicompress.train import train_checkpoint

    (tmp_path / "usernets_out.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = save_checkpoint(train_checkpoint("usernets_out:build", "digits", epochs=0.2),
                           tmp_path / "mine.safetensors")
    stages = [{"type": "prune_unstructured", "criterion": "l1", "ratio": 0.5}]
    untrusted = validate_config({"checkpoint": str(ckpt), "data": "digits", "stages": stages})
    with pytest.raises(XaiCompressError, match="usernets_out:build"):
        run_pipeline(untrusted, tmp_path / "no")
    assert not (tmp_path / "no").exists()
    cfg = validate_config({"checkpoint": str(ckpt), "model": "usernets_out:build", "data": "digits",
                           "stages": stages, "report": {"heatmaps": 2, "latency_repeats": 1}})
    res = run_pipeline(cfg, tmp_path / "yes")
    fid = res.report["stages"][0]["fidelity"]
    assert "DeepLIFT cannot explain this model" in fid["skipped"] and "softmax" in fid["skipped"]
    assert math.isnan(fid["cosine"]) and fid["agreement"] > 0
    assert res.report["final"]["nonzero_params"] < res.report["baseline"]["nonzero_params"]
    assert (tmp_path / "yes" / "report.md").is_file()
    # cached rerun: the cache entries of the user's factory are trusted the same way
    assert run_pipeline(cfg, tmp_path / "yes").cached == [True, True]


def test_fidelity_can_be_switched_off(tmp_path):
    cfg = validate_config({**QUICK, "report": {**QUICK["report"], "fidelity": False},
                           "stages": [{"type": "prune_unstructured", "criterion": "l1",
                                       "ratio": 0.5}]})
    fid = run_pipeline(cfg, tmp_path / "o", plots=False).report["stages"][0]["fidelity"]
    assert "switched off" in fid["skipped"] and math.isnan(fid["top10_overlap"])
    # report.json is strict JSON (a JavaScript or Go parser refuses NaN): null in the file
    text = (tmp_path / "o" / "report.json").read_text()

    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    written = json.loads(text, parse_constant=refuse)["stages"][0]["fidelity"]
    assert written["cosine"] is None and written["top10_overlap"] is None
    assert written["agreement"] == fid["agreement"]


def test_compare_starting_from_a_checkpoint(tmp_path, run_cli):
    from xaicompress.checkpoint import save_checkpoint
    from xaicompress.train import train_checkpoint

    ckpt = save_checkpoint(train_checkpoint("lenet5", "digits", epochs=0.2),
                           tmp_path / "m.safetensors")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"checkpoint": str(ckpt), "data": "digits", "stages": [
        {"type": "prune_unstructured", "criterion": "l1", "ratio": 0.5}],
        "export": {"onnx": False}, "report": {"heatmaps": 0, "latency_repeats": 1,
                                              "fidelity_samples": 8}}))
    code, _, err = run_cli("compare", "--config", cfg, "--criteria", "l1,random", "--seeds",
                           "0", "--out", tmp_path / "cmp", "--json")
    assert code == 0, err
    assert set(json.loads((tmp_path / "cmp" / "compare.json").read_text())["summary"]) == {
        "l1", "random"}


def test_share_uses_the_checkpoints_data(tmp_path, run_cli):
    from xaicompress.checkpoint import load_checkpoint, save_checkpoint
    from xaicompress.train import train_checkpoint

    ckpt = save_checkpoint(train_checkpoint("lenet5", "digits", epochs=0.2),
                           tmp_path / "m.safetensors")
    out = tmp_path / "s.safetensors"
    code, _, err = run_cli("share", ckpt, "--clusters", "4", "--criterion", "l1", "--out", out)
    assert code == 0, err  # digits, not the old default mnist5k (which does not fit)
    assert load_checkpoint(out).data == "digits"


def test_solver_output_is_silenced(capfd):
    from xaicompress.quant.allocate import _quiet_native_output

    with _quiet_native_output():
        os.write(1, b"HighsMipSolverData::noise\n")
        os.write(2, b"more noise\n")
    os.write(1, b"after\n")
    got = capfd.readouterr()
    assert "noise" not in got.out + got.err and "after" in got.out
