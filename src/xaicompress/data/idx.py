"""MNIST / Fashion-MNIST / KMNIST in the IDX format, parsed with numpy.

Looks in DIR and DIR/raw for the four files, each plain or gzipped::

    train-images-idx3-ubyte  train-labels-idx1-ubyte  t10k-images-idx3-ubyte  t10k-labels-idx1-ubyte

(the ``train-images.idx3-ubyte`` spelling of some mirrors is accepted too).

IDX layout: 4-byte big-endian magic ``0x0000 08 NDIM`` (0x08 = unsigned byte), NDIM
big-endian uint32 dimensions, then the payload. Every file is checked: magic, dimensions,
length exactly header + payload, equal image and label counts, labels in range.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from xaicompress.data.bundle import DatasetBundle, check_fits_memory, tensor_bundle
from xaicompress.data.preprocess import Preprocess
from xaicompress.errors import XaiCompressError

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
_WHAT = {IMAGES_MAGIC: "IDX ubyte images", LABELS_MAGIC: "IDX ubyte labels"}
# A sanity cap on a single dimension, so a corrupt header cannot ask for terabytes.
_MAX_DIM = 1 << 28


def find_idx_file(root: Path, stem: str) -> Path:
    """The file for `stem` (e.g. ``train-images-idx3-ubyte``) in root or root/raw."""
    dotted = stem.replace("-idx", ".idx", 1)
    candidates = [d / (name + gz) for d in (root, root / "raw") for name in (stem, dotted)
                  for gz in ("", ".gz")]
    for c in candidates:
        if c.is_file():
            return c
    raise XaiCompressError(
        f"{root}: missing IDX file {stem} (looked for {stem} or {stem}.gz in {root} and "
        f"{root / 'raw'})"
    )


def _read(f, n: int, path: Path) -> bytes:
    """Up to `n` bytes, read in blocks so a header claiming more than the file holds costs
    only what the file really holds (a plain `f.read(n)` may allocate n bytes up front)."""
    parts: list[bytes] = []
    left = n
    try:
        while left > 0:
            block = f.read(min(left, 1 << 24))
            if not block:
                break
            parts.append(block)
            left -= len(block)
    except (OSError, EOFError, zlib.error) as e:
        raise XaiCompressError(f"{path}: cannot read ({e})") from e
    return b"".join(parts)


def _header(f, path: Path, magic: int) -> tuple[int, ...]:
    head = _read(f, 4, path)
    if len(head) < 4:
        raise XaiCompressError(f"{path}: file too short for an IDX header ({len(head)} bytes)")
    got = int.from_bytes(head, "big")
    if got != magic:
        raise XaiCompressError(
            f"{path}: bad magic number 0x{got:08X}, expected 0x{magic:08X} ({_WHAT[magic]})"
        )
    ndim = magic & 0xFF
    raw_dims = _read(f, 4 * ndim, path)
    if len(raw_dims) < 4 * ndim:
        raise XaiCompressError(f"{path}: truncated IDX header, expected {ndim} dimensions")
    dims = tuple(int(d) for d in np.frombuffer(raw_dims, dtype=">u4"))
    if any(d == 0 or d > _MAX_DIM for d in dims):
        raise XaiCompressError(f"{path}: invalid IDX dimensions {dims}")
    return dims


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one IDX ubyte file with the expected `magic`; return a uint8 array of its dims.

    The size the header claims is checked before the payload is read: against the file's
    real size for a plain file, against `max_data_bytes()` for both (a gzip stream's
    length is known only by inflating it, which `_read` does block by block)."""
    from xaicompress.data.bundle import max_data_bytes

    gz = path.suffix == ".gz"
    opener = gzip.open if gz else open
    try:
        f = opener(path, "rb")
        on_disk = path.stat().st_size
    except OSError as e:
        raise XaiCompressError(f"{path}: cannot open ({e.strerror or e})") from e
    with f:
        dims = _header(f, path, magic)
        header = 4 + 4 * len(dims)
        size = int(np.prod(dims, dtype=np.float64))
        if not gz and header + size != on_disk:
            what = "truncated" if header + size > on_disk else "trailing data"
            raise XaiCompressError(
                f"{path}: {what}: the header claims dimensions {dims} (header {header} + "
                f"payload {size} = {header + size} bytes) but the file has {on_disk} bytes")
        if size > max_data_bytes() // 4:
            raise XaiCompressError(
                f"{path}: the header claims dimensions {dims} ({size / 2**30:.1f} GiB of pixels), "
                f"more than the {max_data_bytes() / 2**30:.1f} GiB allowed for data held in "
                "memory (XAICOMPRESS_MAX_DATA_GB)")
        # One byte more than expected: catches trailing garbage without reading it all.
        payload = _read(f, size + 1, path)
    if len(payload) < size:
        raise XaiCompressError(
            f"{path}: truncated, {header + len(payload)} bytes but expected exactly "
            f"{header + size} (header {header} + payload {size} for dimensions {dims})"
        )
    if len(payload) > size:
        raise XaiCompressError(
            f"{path}: trailing data after the expected {header + size} bytes "
            f"(header {header} + payload {size} for dimensions {dims})"
        )
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


def _read_split(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray, Path, Path]:
    img_path = find_idx_file(root, f"{prefix}-images-idx3-ubyte")
    lab_path = find_idx_file(root, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(img_path, IMAGES_MAGIC)
    labels = read_idx(lab_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise XaiCompressError(
            f"{lab_path}: {len(labels)} labels but {img_path} has {len(images)} images"
        )
    return images, labels, img_path, lab_path


def load_idx(spec: str, root: Path, image_size: int | None = None,
             preprocess: Preprocess | None = None) -> DatasetBundle:
    """IDX train/t10k splits as a bundle with images (1, rows, cols) (or resized)."""
    x_tr, y_tr, img_tr, lab_tr = _read_split(root, "train")
    x_te, y_te, img_te, lab_te = _read_split(root, "t10k")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise XaiCompressError(
            f"{img_te}: images are {x_te.shape[1:]} but {img_tr} has {x_tr.shape[1:]}"
        )
    num_classes = max(int(y_tr.max()) + 1, 2)
    if int(y_te.max()) >= num_classes:
        raise XaiCompressError(
            f"{lab_te}: label {int(y_te.max())} out of range, training labels are "
            f"0..{num_classes - 1}"
        )

    check_fits_memory(spec, len(x_tr) + len(x_te), (1, *x_tr.shape[1:]))

    def images(a: np.ndarray) -> torch.Tensor:
        # uint8 -> float in [0, 1]; the copy also makes the read-only buffer writable.
        return torch.from_numpy(a.astype(np.float32)[:, None] / np.float32(255.0))

    return tensor_bundle(
        spec, images(x_tr), torch.from_numpy(y_tr.astype(np.int64)),
        images(x_te), torch.from_numpy(y_te.astype(np.int64)),
        num_classes=num_classes, classes=[str(i) for i in range(num_classes)],
        image_size=image_size, files=(img_tr, lab_tr, img_te, lab_te), root=root,
        preprocess=preprocess,
    )
