"""Writers of bad inputs for the corpus: each takes a folder and returns the path it made."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
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
    """A copy of `good` with tensors / metadata edited and the checksum re-signed, so the
    loader's deeper checks (not only the checksum) meet the change."""
    from tests.badinput.makers_files import edit_checkpoint

    return edit_checkpoint(good, d, name, tensors_fn=tensors_fn, meta_fn=meta_fn)


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


# ------------------------------------------------------------------ bombs
def idx_header_bomb(d: Path) -> Path:
    """A 16-byte IDX image file whose header claims 2^28 images of 28 x 28."""
    root = idx_dir(d, name="idx_bomb")
    (root / "train-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, 1 << 28, 28, 28))
    return root


def idx_gzip_bomb(d: Path) -> Path:
    """A gzipped IDX file: 2^28 x 28 x 28 claimed, a few bytes real (length unknown
    until inflated)."""
    import gzip

    root = idx_dir(d, name="idx_gz_bomb")
    (root / "train-images-idx3-ubyte").unlink()
    with gzip.open(root / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, 1 << 28, 28, 28) + bytes(4096))
    return root


def idx_label_out_of_range(d: Path) -> Path:
    root = idx_dir(d, name="idx_labels")
    labels = np.full(10, 200, dtype=np.uint8)
    (root / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(labels, 0x801))
    return root


def _cifar_dir(d: Path, name: str, batch: bytes, test: bytes | None = None) -> Path:
    root = d / name
    root.mkdir()
    (root / "data_batch_1").write_bytes(batch)
    (root / "test_batch").write_bytes(test if test is not None else batch)
    return root


def cifar_shared_rows(d: Path) -> Path:
    """A ~1 MB pickle whose 'data' names one 3072-pixel row 300,000 times (memoised):
    numpy would make a (300000, 3072) int64 array of it, 7 GB."""
    row = [0] * 3072
    obj = {b"data": [row] * 300_000, b"labels": [0] * 300_000}
    return _cifar_dir(d, "cifar_rows", pickle.dumps(obj, protocol=2))


class _FakeArray:
    """Pickles as an ndarray that claims shape (300000, 3072) with 4 bytes of data."""

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, (0,), b"b"),
                (1, (300_000, 3072), np.dtype("u1"), False, b"\0\0\0\0"))


def cifar_array_shape_lie(d: Path) -> Path:
    obj = {b"data": _FakeArray(), b"labels": [0] * 300_000}
    return _cifar_dir(d, "cifar_shape", pickle.dumps(obj, protocol=2))


def cifar_bytes_claim(d: Path) -> Path:
    """A pickle whose BINBYTES8 opcode claims 2^40 bytes (the file has 20)."""
    evil = b"\x80\x04\x8e" + (1 << 40).to_bytes(8, "little") + b"abc"
    return _cifar_dir(d, "cifar_claim", evil)


def cifar_nested_labels(d: Path) -> Path:
    data = np.zeros((10, 3072), dtype=np.uint8)
    obj = {b"data": data, b"labels": [[0] * 1000] * 10}
    return _cifar_dir(d, "cifar_labels", pickle.dumps(obj, protocol=2))


def cifar_label_out_of_range(d: Path) -> Path:
    data = np.zeros((4, 3072), dtype=np.uint8)
    obj = {b"data": data, b"labels": [0, 1, 2, 99]}
    return _cifar_dir(d, "cifar_range", pickle.dumps(obj, protocol=2))


def folder_many_classes(d: Path) -> Path:
    """10,001 class folders (each would hold one image): refused before any is scanned."""
    root = d / "many_classes"
    root.mkdir()
    for i in range(10_001):
        (root / f"c{i:05d}").mkdir()
    return root


def _png(path: Path, value: int = 0) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), value).save(path)


def folder_one_class(d: Path) -> Path:
    root = d / "one_class"
    for i in range(6):
        _png(root / "cat" / f"{i}.png", i)
    return root


def folder_train_without_test(d: Path) -> Path:
    root = d / "half_split"
    for c in ("a", "b"):
        for i in range(3):
            _png(root / "train" / c / f"{i}.png", i)
    return root


def folder_test_class_unknown(d: Path) -> Path:
    root = d / "split_classes"
    for split, classes in (("train", ("a", "b")), ("test", ("a", "zebra"))):
        for c in classes:
            for i in range(2):
                _png(root / split / c / f"{i}.png", i)
    return root


def folder_truncated_png(d: Path) -> Path:
    root = d / "truncated_png"
    for c in ("a", "b"):
        for i in range(3):
            _png(root / c / f"{i}.png", 40 * i)
    p = root / "a" / "0.png"
    p.write_bytes(p.read_bytes()[:30])
    return root


# ------------------------------------------------------------------ outputs
def fifo(good: Path, d: Path) -> Path:
    p = d / "pipe.safetensors"
    os.mkfifo(p)
    return p


def link_to_devnull(good: Path, d: Path) -> Path:
    p = d / "null.safetensors"
    p.symlink_to("/dev/null")
    return p


def link_to_fifo(good: Path, d: Path) -> Path:
    os.mkfifo(d / "real_pipe")
    p = d / "via_link.onnx"
    p.symlink_to(d / "real_pipe")
    return p


def dangling_link(good: Path, d: Path) -> Path:
    p = d / "dangling.safetensors"
    p.symlink_to(d / "nowhere" / "x.safetensors")
    return p


def out_with_cache_file(good: Path, d: Path) -> Path:
    root = d / "run_cache_file"
    root.mkdir()
    (root / "cache").write_text("the user's own file called cache")
    return root


def socket_file(good: Path, d: Path) -> Path:
    import socket

    p = d / "sock.safetensors"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    s.close()
    return p


# ------------------------------------------------------------------ configs
def config_file(text: str, name: str = "bad_config.yaml"):
    def make(good: Path, d: Path) -> Path:
        p = d / name
        p.write_text(text)
        return p

    return make


def billion_laughs() -> str:
    levels = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] + [
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
    return "model: {name: lenet5, kwargs: {" + ", ".join(levels) + "}}\n"


def huge_config(good: Path, d: Path) -> Path:
    p = d / "huge.yaml"
    p.write_text("model: lenet5\nname: '" + "x" * (1 << 21) + "'\n")
    return p


def deep_config(good: Path, d: Path) -> Path:
    p = d / "deep.yaml"
    p.write_text("model: lenet5\nname: " + "[" * 20000 + "]" * 20000 + "\n")
    return p


def latin1_config(good: Path, d: Path) -> Path:
    p = d / "latin1.yaml"
    p.write_bytes("model: lenet5\nname: caf\xe9\n".encode("latin-1"))
    return p


def config_dir(good: Path, d: Path) -> Path:
    p = d / "a_folder.yaml"
    p.mkdir()
    return p
