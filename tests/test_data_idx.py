"""IDX (MNIST-family) files written to tmp_path and read back, good and malformed."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from xaicompress.data import load_dataset
from xaicompress.errors import XaiCompressError


def idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx_set(root: Path, *, gz: bool = False, n_train: int = 20, n_test: int = 10,
                  side: int = 28, classes: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % classes,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % classes,
    }
    for name, arr in arrays.items():
        data = idx_bytes(arr, 0x803 if "images" in name else 0x801)
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize(("gz", "sub"), [(False, ""), (True, ""), (False, "raw"), (True, "raw")])
def test_idx_round_trip(tmp_path: Path, gz: bool, sub: str) -> None:
    arrays = write_idx_set(tmp_path / sub if sub else tmp_path, gz=gz)
    b = load_dataset(f"idx:{tmp_path}")
    assert b.input_shape == (1, 28, 28)
    assert (len(b.train), len(b.test), b.num_classes) == (20, 10, 10)
    assert b.classes == [str(i) for i in range(10)]
    x, y = b.train[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.ndim == 0 and int(y) == 3
    # Pixels survive the round trip through normalisation.
    pix = arrays["train-images-idx3-ubyte"][3] / 255.0
    assert torch.allclose(b.input_to_pixel(x[None])[0, 0], torch.from_numpy(pix).float(),
                          atol=1e-5)
    xs = torch.stack([b.train[i][0] for i in range(20)])
    assert abs(float(xs.mean())) < 1e-4 and abs(float(xs.std(unbiased=False)) - 1) < 1e-3
    assert b.test[9][1].item() == 9


def test_idx_dotted_names_and_small_label_count(tmp_path: Path) -> None:
    write_idx_set(tmp_path, classes=3)
    for p in tmp_path.iterdir():
        p.rename(tmp_path / p.name.replace("-idx", ".idx"))
    b = load_dataset(f"idx:{tmp_path}", image_size=16)
    assert b.num_classes == 3 and b.input_shape == (1, 16, 16)


def _expect(tmp_path: Path, name: str, *words: str) -> None:
    with pytest.raises(XaiCompressError) as e:
        load_dataset(f"idx:{tmp_path}")
    msg = str(e.value)
    assert str(tmp_path / name) in msg and msg.startswith(f"idx:{tmp_path}: ")
    for w in words:
        assert w in msg


def test_idx_bad_magic(tmp_path: Path) -> None:
    write_idx_set(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(b"\x00\x00\x08\x02" + p.read_bytes()[4:])
    _expect(tmp_path, p.name, "bad magic number 0x00000802, expected 0x00000803",
            "IDX ubyte images")


def test_idx_truncated_payload(tmp_path: Path) -> None:
    write_idx_set(tmp_path)
    p = tmp_path / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-5])
    _expect(tmp_path, p.name, "truncated")


def test_idx_trailing_bytes(tmp_path: Path) -> None:
    write_idx_set(tmp_path, gz=True)
    p = tmp_path / "train-labels-idx1-ubyte.gz"
    p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes()) + b"\x01"))
    _expect(tmp_path, p.name, "trailing data")


def test_idx_count_mismatch(tmp_path: Path) -> None:
    write_idx_set(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(
        idx_bytes(np.zeros(19, np.uint8), 0x801))
    _expect(tmp_path, "train-labels-idx1-ubyte", "19 labels", "20 images")


def test_idx_test_label_out_of_range(tmp_path: Path) -> None:
    write_idx_set(tmp_path, classes=3)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(
        idx_bytes(np.full(10, 7, np.uint8), 0x801))
    _expect(tmp_path, "t10k-labels-idx1-ubyte", "out of range")


def test_idx_short_header_and_zero_dim(tmp_path: Path) -> None:
    write_idx_set(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(b"\x00\x00")
    _expect(tmp_path, p.name, "too short")
    p.write_bytes(idx_bytes(np.zeros((0, 28, 28), np.uint8), 0x803))
    _expect(tmp_path, p.name, "invalid IDX dimensions")


def test_idx_corrupt_gzip(tmp_path: Path) -> None:
    write_idx_set(tmp_path, gz=True)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(b"not gzip at all")
    _expect(tmp_path, p.name, "cannot read")


def test_idx_missing_file(tmp_path: Path) -> None:
    write_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    _expect(tmp_path, "", "missing IDX file t10k-labels-idx1-ubyte")
