"""Writers of bad inputs for the corpus: each takes a folder and returns the path it made."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

MARKER = "PAYLOAD_RAN"


# ------------------------------------------------------------------ checkpoints
def truncated(good: Path, d: Path) -> Path:
    raw = good.read_bytes()
    p = d / "truncated.safetensors"
    p.write_bytes(raw[: len(raw) * 2 // 3])
    return p


def corrupted_header(good: Path, d: Path) -> Path:
    raw = bytearray(good.read_bytes())
    raw[8:40] = b"#" * 32  # garble the JSON header
    p = d / "corrupt.safetensors"
    p.write_bytes(bytes(raw))
    return p


def zero_bytes(good: Path, d: Path) -> Path:
    p = d / "empty.safetensors"
    p.write_bytes(b"")
    return p


def _rewrite(good: Path, d: Path, name: str, tensors_fn=None, meta_fn=None) -> Path:
    with safe_open(str(good), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(good))
    if tensors_fn:
        tensors = tensors_fn(tensors)
    if meta_fn:
        m = json.loads(meta["xaicompress"])
        meta_fn(m)
        meta["xaicompress"] = json.dumps(m)
    p = d / name
    save_file(tensors, str(p), metadata=meta)
    return p


def unknown_model(good: Path, d: Path) -> Path:
    return _rewrite(good, d, "unknown_model.safetensors",
                    meta_fn=lambda m: m["model"].update(name="resnet9000"))


def wrong_shapes(good: Path, d: Path) -> Path:
    def f(t):
        t["fc1.weight"] = torch.zeros(7, 3)
        return t
    return _rewrite(good, d, "wrong_shapes.safetensors", tensors_fn=f)


def wrong_widths(good: Path, d: Path) -> Path:
    return _rewrite(good, d, "wrong_widths.safetensors",
                    meta_fn=lambda m: m["widths"].update({"fc1": {"in": 3, "out": 2}}))


def nan_weights(good: Path, d: Path) -> Path:
    def f(t):
        t["conv1.weight"][0, 0, 0, 0] = float("nan")
        return t
    return _rewrite(good, d, "nan.safetensors", tensors_fn=f)


def inf_weights(good: Path, d: Path) -> Path:
    def f(t):
        t["fc2.bias"][3] = float("inf")
        return t
    return _rewrite(good, d, "inf.safetensors", tensors_fn=f)


def no_metadata(good: Path, d: Path) -> Path:
    p = d / "foreign.safetensors"
    save_file(load_file(str(good)), str(p))
    return p


class _Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def pickle_payload(good: Path, d: Path) -> Path:
    p = d / "evil.safetensors"
    p.write_bytes(pickle.dumps({"state_dict": _Payload(d / MARKER)}))
    return p


def torch_save_payload(good: Path, d: Path) -> Path:
    p = d / "evil_torch.pt"
    torch.save({"x": _Payload(d / MARKER)}, p)
    return p


# ------------------------------------------------------------------------ data
def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in arr.shape) + \
        arr.astype(np.uint8).tobytes()


def idx_dir(d: Path, *, images_magic=0x803, n_labels=None, truncate=0, name="idx") -> Path:
    root = d / name
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 10)):
        imgs = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n_labels if n_labels is not None else n, dtype=np.uint8) % 10
        ib = _idx_bytes(imgs, images_magic)
        (root / f"{split}-images-idx3-ubyte").write_bytes(ib[: len(ib) - truncate])
        (root / f"{split}-labels-idx1-ubyte").write_bytes(_idx_bytes(labels, 0x801))
    return root


def cifar_py_wrong_type(d: Path) -> Path:
    root = d / "cifar_list"
    root.mkdir()
    (root / "data_batch_1").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    (root / "test_batch").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    return root


def cifar_py_payload(d: Path) -> Path:
    root = d / "cifar_evil"
    root.mkdir()
    evil = pickle.dumps({b"data": _Payload(d / MARKER), b"labels": [0]}, protocol=2)
    (root / "data_batch_1").write_bytes(evil)
    (root / "test_batch").write_bytes(evil)
    return root


def cifar_bin_bad_size(d: Path) -> Path:
    root = d / "cifar_bin"
    root.mkdir()
    (root / "data_batch_1.bin").write_bytes(b"\x01" * 3000)
    (root / "test_batch.bin").write_bytes(b"\x01" * 3073)
    return root


def empty_folder(d: Path) -> Path:
    root = d / "empty_images"
    root.mkdir()
    return root


def not_images(d: Path) -> Path:
    root = d / "fake_images"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            (root / cls / f"{i}.png").write_bytes(b"this is not a png")
    return root


# ------------------------------------------------------------------ code in metadata
def factory_payload(good: Path, d: Path) -> Path:
    """A checkpoint whose metadata names `os:system` as its model factory: loading it must
    not run the command (it would create the marker file)."""
    cmd = f"touch {d / MARKER}"
    return _rewrite(good, d, "payload_factory.safetensors",
                    meta_fn=lambda m: m.update(model={**m["model"], "name": "os:system",
                                                      "kwargs": {"command": cmd}}))
