"""CIFAR-10/100 binary and python batches written to tmp_path; safe unpickling."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from xaicompress.data import load_dataset
from xaicompress.data.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES
from xaicompress.errors import XaiCompressError


def batch(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), np.arange(n) % classes


def write_bin(path: Path, data: np.ndarray, labels: np.ndarray, fine: bool = False) -> None:
    lab = np.stack([labels // 5, labels], 1) if fine else labels[:, None]
    path.write_bytes(np.concatenate([lab.astype(np.uint8), data], 1).tobytes())


def write_py(path: Path, data, labels, key: bytes = b"labels", protocol: int = 2) -> None:
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"x", b"data": data, key: labels}, f, protocol=protocol)


def check(b, n_train: int, n_test: int, classes: int, first: np.ndarray) -> None:
    assert b.input_shape == (3, 32, 32) and b.num_classes == classes
    assert (len(b.train), len(b.test)) == (n_train, n_test)
    assert len(b.classes) == classes and len(b.mean) == 3 and len(b.std) == 3
    x, y = b.train[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and y.ndim == 0
    assert torch.allclose(b.input_to_pixel(x[None])[0],
                          torch.from_numpy(first.reshape(3, 32, 32) / 255.0).float(), atol=1e-5)
    xs = b.train.tensors[0]
    assert xs.mean(dim=(0, 2, 3)).abs().max() < 1e-4


def test_cifar10_binary_subset_of_batches(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    x1, y1 = batch(12, 10, 1)
    x3, y3 = batch(8, 10, 3)
    xt, yt = batch(10, 10, 9)
    write_bin(d / "data_batch_1.bin", x1, y1)
    write_bin(d / "data_batch_3.bin", x3, y3)
    write_bin(d / "test_batch.bin", xt, yt)
    b = load_dataset(f"cifar10:{tmp_path}")
    check(b, 20, 10, 10, x1[0])
    assert b.classes == CIFAR10_CLASSES
    assert b.train.tensors[1].tolist() == y1.tolist() + y3.tolist()


def test_cifar100_binary_uses_fine_labels(tmp_path: Path) -> None:
    x, y = batch(20, 100, 1)
    y = (y * 7) % 100
    xt, yt = batch(10, 100, 2)
    write_bin(tmp_path / "train.bin", x, y, fine=True)
    write_bin(tmp_path / "test.bin", xt, yt, fine=True)
    b = load_dataset(f"cifar100:{tmp_path}")
    check(b, 20, 10, 100, x[0])
    assert b.train.tensors[1].tolist() == y.tolist()
    assert len(CIFAR100_CLASSES) == 100 and b.classes[0] == "apple"


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar10_python_version(tmp_path: Path, protocol: int) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    x, y = batch(20, 10, 1)
    xt, yt = batch(10, 10, 2)
    write_py(d / "data_batch_2", x, y.tolist(), protocol=protocol)
    write_py(d / "test_batch", xt, yt.tolist(), protocol=protocol)
    check(load_dataset(f"cifar10:{tmp_path}"), 20, 10, 10, x[0])


def test_cifar100_python_version_str_keys_and_list_data(tmp_path: Path) -> None:
    x, y = batch(20, 100, 1)
    xt, yt = batch(10, 100, 2)
    for name, (a, lab) in {"train": (x, y), "test": (xt, yt)}.items():
        with open(tmp_path / name, "wb") as f:
            pickle.dump({"data": a.tolist(), "coarse_labels": (lab // 5).tolist(),
                         "fine_labels": lab.tolist()}, f, protocol=2)
    check(load_dataset(f"cifar100:{tmp_path}"), 20, 10, 100, x[0])


def _expect(spec: str, path: Path, *words: str) -> None:
    with pytest.raises(XaiCompressError) as e:
        load_dataset(spec)
    assert str(path) in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_cifar_binary_wrong_record_size(tmp_path: Path) -> None:
    x, y = batch(4, 10, 1)
    write_bin(tmp_path / "data_batch_1.bin", x, y)
    write_bin(tmp_path / "test_batch.bin", x, y)
    bad = tmp_path / "test_batch.bin"
    bad.write_bytes(bad.read_bytes()[:-1])
    _expect(f"cifar10:{tmp_path}", bad, "3073-byte record")
    # A cifar10 file read as cifar100 (2 label bytes) has the wrong record size too.
    (tmp_path / "train.bin").write_bytes((tmp_path / "data_batch_1.bin").read_bytes())
    (tmp_path / "test.bin").write_bytes((tmp_path / "data_batch_1.bin").read_bytes())
    _expect(f"cifar100:{tmp_path}", tmp_path / "train.bin", "3074-byte record")


def test_cifar_binary_label_out_of_range(tmp_path: Path) -> None:
    x, y = batch(4, 10, 1)
    write_bin(tmp_path / "data_batch_1.bin", x, y + 10)
    write_bin(tmp_path / "test_batch.bin", x, y)
    _expect(f"cifar10:{tmp_path}", tmp_path / "data_batch_1.bin", "out of range")


def test_cifar_missing_files(tmp_path: Path) -> None:
    _expect(f"cifar10:{tmp_path}", tmp_path, "no cifar10 batches found")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("payload", ["system", "eval"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "pwned"
    evil = _Evil(marker) if payload == "system" else _EvalEvil()
    x, y = batch(4, 10, 1)
    write_py(tmp_path / "data_batch_1", x, y.tolist())
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": evil, b"labels": [0]}, f, protocol=2)
    if payload == "system":
        # Control: the same payload DOES run under plain pickle (aimed at another marker),
        # so the marker staying absent below proves the safe loader never executed it.
        control = tmp_path / "control"
        pickle.loads(pickle.dumps(_Evil(control), protocol=2))  # noqa: S301 - on purpose
        assert control.exists()
    with pytest.raises(XaiCompressError) as e:
        load_dataset(f"cifar10:{tmp_path}")
    msg = str(e.value)
    assert str(tmp_path / "test_batch") in msg and "refused" in msg
    assert ("system" if payload == "system" else "eval") in msg
    assert not marker.exists()


@pytest.mark.parametrize(
    ("obj", "words"),
    [
        ([1, 2, 3], ["holds a list", "expected a dict"]),
        ({b"data": np.zeros((2, 3072), np.uint8)}, ["keys", "'labels'"]),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, ["uint8 N x 3072"]),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, ["uint8 N x 3072"]),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, ["expected 2 integers"]),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, ["out of range"]),
    ],
)
def test_python_batch_wrong_content(tmp_path: Path, obj, words: list[str]) -> None:
    x, y = batch(4, 10, 1)
    write_py(tmp_path / "data_batch_1", x, y.tolist())
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump(obj, f, protocol=2)
    _expect(f"cifar10:{tmp_path}", tmp_path / "test_batch", *words)


def test_python_batch_garbage_bytes(tmp_path: Path) -> None:
    x, y = batch(4, 10, 1)
    write_py(tmp_path / "data_batch_1", x, y.tolist())
    (tmp_path / "test_batch").write_bytes(b"\x80\x02garbage")
    _expect(f"cifar10:{tmp_path}", tmp_path / "test_batch", "not a valid CIFAR python pickle")
