"""Datasets by spec string: embedded (mnist5k, digits), idx, cifar10/100 and image folders.

``load_dataset("mnist5k")`` returns a `DatasetBundle` whose train/test items are
``(x float32 (C, H, W) normalised, y int64 scalar)``; see `xaicompress.data.spec` for the
spec grammar and `make_loader` / `subset` / `dataset_tensors` for iterating.
"""

from xaicompress.data.bundle import DatasetBundle
from xaicompress.data.load import load_dataset
from xaicompress.data.loader import dataset_tensors, make_loader, subset
from xaicompress.data.spec import DEFAULT_SPEC, KINDS, DataSpec, parse_data_spec

__all__ = [
    "DEFAULT_SPEC",
    "KINDS",
    "DataSpec",
    "DatasetBundle",
    "dataset_tensors",
    "load_dataset",
    "make_loader",
    "parse_data_spec",
    "subset",
]
