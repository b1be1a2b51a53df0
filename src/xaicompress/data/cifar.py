"""CIFAR-10 / CIFAR-100 in the official binary or python (pickled) versions.

Searched in DIR and in the folders the archives unpack to (``cifar-10-batches-bin``,
``cifar-10-batches-py``, ``cifar-100-binary``, ``cifar-100-python``):

* cifar10 binary: ``data_batch_{1..5}.bin`` + ``test_batch.bin``; records of 1 label byte
  + 3072 pixel bytes (1024 R, 1024 G, 1024 B, each 32 x 32 row-major).
* cifar100 binary: ``train.bin`` + ``test.bin``; records of coarse + fine label byte + 3072
  pixel bytes. The fine label (100 classes) is used.
* python versions: the same names without ``.bin`` (cifar100: ``train``, ``test``), each a
  pickled dict with ``data`` (N x 3072 uint8) and ``labels`` / ``fine_labels``, read with
  `safe_pickle.safe_load` (never plain `pickle.load`).

Any subset of the five cifar10 data batches is accepted (at least one), so small test
files work. Binary is preferred when both versions are present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from xaicompress.data.bundle import DatasetBundle, check_fits_memory, tensor_bundle
from xaicompress.data.preprocess import Preprocess
from xaicompress.data.safe_pickle import safe_load
from xaicompress.errors import XaiCompressError

PIXELS = 3 * 32 * 32
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]
CIFAR100_CLASSES = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl
boy bridge bus butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud
cockroach couch crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster
house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle
mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree
plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew
skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank
telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf
woman worm""".split()

_LAYOUT = {
    # kind: (num label bytes, train names, test name, sub-folders for bin, for py)
    "cifar10": (1, [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "cifar-10-batches-bin", "cifar-10-batches-py"),
    "cifar100": (2, ["train"], "test", "cifar-100-binary", "cifar-100-python"),
}


def _find(root: Path, kind: str) -> tuple[list[Path], Path, bool]:
    """(train files, test file, is_binary): the first folder/version with a complete set."""
    _, train_names, test_name, bin_dir, py_dir = _LAYOUT[kind]
    for folder in (root, root / bin_dir, root / py_dir):
        for binary in (True, False):
            ext = ".bin" if binary else ""
            test = folder / (test_name + ext)
            train = [folder / (n + ext) for n in train_names if (folder / (n + ext)).is_file()]
            if train and test.is_file():
                return train, test, binary
    names = ", ".join(train_names + [test_name])
    raise XaiCompressError(
        f"{root}: no {kind} batches found; expected {names} (with or without .bin) in {root}, "
        f"{root / bin_dir} or {root / py_dir}"
    )


def read_binary(path: Path, label_bytes: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch -> (N, 3, 32, 32) uint8 images and (N,) int64 labels (fine for 100)."""
    record = label_bytes + PIXELS
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise XaiCompressError(f"{path}: cannot read ({e.strerror or e})") from e
    if raw.size == 0 or raw.size % record:
        raise XaiCompressError(
            f"{path}: size {raw.size} bytes is not a positive multiple of the {record}-byte "
            f"record ({label_bytes} label byte(s) + {PIXELS} pixels)"
        )
    rows = raw.reshape(-1, record)
    labels = rows[:, label_bytes - 1].astype(np.int64)
    _check_labels(path, labels, num_classes)
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32), labels


def _key(d: dict, *names: str):
    for name in names:
        for k in (name, name.encode()):
            if k in d:
                return d[k]
    return None


def _labels_array(path: Path, labels: object, n: int, key: str) -> np.ndarray:
    """The label list as int64, checked to be `n` plain integers before any conversion (a
    list of shared nested lists would make numpy allocate far more than the file holds)."""
    if isinstance(labels, np.ndarray):
        ok = labels.ndim == 1 and len(labels) == n and np.issubdtype(labels.dtype, np.integer)
        got = f"{labels.dtype} {labels.shape}"
    else:
        ok = isinstance(labels, (list, tuple)) and len(labels) == n and all(
            type(v) is int for v in labels)
        got = f"{type(labels).__name__} of {len(labels) if hasattr(labels, '__len__') else '?'}"
    if not ok:
        raise XaiCompressError(f"{path}: '{key}' is {got}, expected {n} integers")
    return np.asarray(labels, dtype=np.int64)


def _data_array(path: Path, data: object) -> np.ndarray:
    """'data' as a uint8 (N, 3072) array. An array's bytes are in the file; a list (some
    re-pickled batches hold one) is accepted when it claims no more values than the file
    has bytes, so shared rows (a small pickle naming one row 300,000 times) cannot make
    numpy allocate gigabytes."""
    if isinstance(data, list):
        # size first (cheap), then shapes, then element types (no nested lists inside)
        rows_ok = bool(data) and len(data) * PIXELS <= path.stat().st_size and all(
            isinstance(r, list) and len(r) == PIXELS for r in data) and all(
            type(v) is int for r in data for v in r)
        if not rows_ok:
            raise XaiCompressError(
                f"{path}: 'data' is a list of {len(data)} rows, expected rows of {PIXELS} "
                "values stored in the file (more values claimed than the file has bytes?)")
        try:
            data = np.asarray(data, dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as e:
            raise XaiCompressError(f"{path}: 'data' rows are not integers ({e})") from e
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != PIXELS or \
            data.shape[0] == 0 or not np.issubdtype(data.dtype, np.integer):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else \
            type(data).__name__
        raise XaiCompressError(f"{path}: 'data' is {got}, expected uint8 N x {PIXELS}")
    if data.dtype != np.uint8 and (data.min() < 0 or data.max() > 255):
        raise XaiCompressError(f"{path}: 'data' has values outside 0..255, expected uint8")
    return data


def read_python(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One python (pickled) batch -> (N, 3, 32, 32) uint8 images and (N,) int64 labels."""
    obj = safe_load(path)
    if not isinstance(obj, dict):
        raise XaiCompressError(
            f"{path}: pickle holds a {type(obj).__name__}, expected a dict with 'data' and "
            f"'labels' (or 'fine_labels')"
        )
    data = _key(obj, "data")
    labels = _key(obj, "fine_labels", "labels") if num_classes == 100 else _key(obj, "labels")
    label_key = "fine_labels" if num_classes == 100 else "labels"
    if data is None or labels is None:
        keys = sorted(k.decode("latin1") if isinstance(k, bytes) else str(k) for k in obj)
        raise XaiCompressError(
            f"{path}: pickled dict has keys {keys}, expected 'data' and '{label_key}'"
        )
    data = _data_array(path, data)
    lab = _labels_array(path, labels, len(data), label_key)
    _check_labels(path, lab, num_classes)
    return data.astype(np.uint8).reshape(-1, 3, 32, 32), lab


def _check_labels(path: Path, labels: np.ndarray, num_classes: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise XaiCompressError(f"{path}: label {bad} out of range 0..{num_classes - 1}")


def load_cifar(spec: str, kind: str, root: Path, image_size: int | None = None,
               preprocess: Preprocess | None = None) -> DatasetBundle:
    """CIFAR-10/100 as a bundle with images (3, 32, 32) (or resized)."""
    num_classes = 10 if kind == "cifar10" else 100
    label_bytes = _LAYOUT[kind][0]
    train_files, test_file, binary = _find(root, kind)

    def read(path: Path) -> tuple[np.ndarray, np.ndarray]:
        if binary:
            return read_binary(path, label_bytes, num_classes)
        return read_python(path, num_classes)

    parts = [read(p) for p in train_files]
    x_te, y_te = read(test_file)
    check_fits_memory(spec, sum(len(p[0]) for p in parts) + len(x_te), (3, 32, 32))
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / np.float32(255.0))

    return tensor_bundle(
        spec, images(x_tr), torch.from_numpy(y_tr), images(x_te), torch.from_numpy(y_te),
        num_classes=num_classes,
        classes=list(CIFAR10_CLASSES if kind == "cifar10" else CIFAR100_CLASSES),
        image_size=image_size, files=(*train_files, test_file), root=root,
        preprocess=preprocess,
    )
