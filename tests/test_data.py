"""Embedded datasets (mnist5k, digits), the bundle's pixel maps, loaders and subsets."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from xaicompress.data import (
    DatasetBundle,
    dataset_tensors,
    load_dataset,
    make_loader,
    parse_data_spec,
    subset,
)
from xaicompress.data.embedded import _mnist5k_arrays
from xaicompress.errors import XaiCompressError


def test_mnist5k_shapes_and_split(mnist: DatasetBundle) -> None:
    assert mnist.spec == "mnist5k" and parse_data_spec(mnist.spec).kind == "mnist5k"
    assert mnist.input_shape == (1, 28, 28) and mnist.num_classes == 10
    assert (len(mnist.train), len(mnist.test)) == (4000, 1000)
    assert mnist.classes == [str(i) for i in range(10)]
    x, y = mnist.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.ndim == 0


def test_mnist5k_stratified(mnist: DatasetBundle) -> None:
    _, y_all = _mnist5k_arrays()
    total = np.bincount(y_all, minlength=10)
    for ds, n in ((mnist.train, 4000), (mnist.test, 1000)):
        counts = np.bincount(ds.tensors[1].numpy(), minlength=10)
        assert np.all(np.abs(counts - total * n / 5000) <= 1)


def test_mnist5k_normalisation(mnist: DatasetBundle) -> None:
    x = mnist.train.tensors[0]
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std(unbiased=False)) - 1) < 1e-3
    black = torch.zeros(2, 1, 28, 28)
    expected = -mnist.mean[0] / mnist.std[0]
    assert torch.allclose(mnist.pixel_to_input(black), torch.full_like(black, expected))
    assert torch.allclose(mnist.input_to_pixel(mnist.pixel_to_input(black + 0.5)), black + 0.5)
    assert float(mnist.input_to_pixel(x).min()) >= -1e-5
    assert float(mnist.input_to_pixel(x).max()) <= 1 + 1e-5


def test_mnist5k_same_split_every_call_and_fast(mnist: DatasetBundle) -> None:
    _mnist5k_arrays.cache_clear()
    start = time.perf_counter()
    again = load_dataset("mnist5k", seed=123)
    assert time.perf_counter() - start < 2.0
    assert torch.equal(again.train.tensors[0], mnist.train.tensors[0])
    assert torch.equal(again.test.tensors[1], mnist.test.tensors[1])
    assert again.mean == mnist.mean and again.std == mnist.std


def test_mnist5k_resized() -> None:
    b = load_dataset("mnist5k", image_size=32)
    assert b.input_shape == (1, 32, 32) and b.train[0][0].shape == (1, 32, 32)


def test_digits() -> None:
    b = load_dataset("digits")
    assert b.input_shape == (1, 8, 8) and b.num_classes == 10
    assert (len(b.train), len(b.test)) == (1437, 360)
    counts = np.bincount(b.test.tensors[1].numpy(), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    assert abs(float(b.train.tensors[0].mean())) < 1e-4


def _toy(n: int = 10) -> TensorDataset:
    return TensorDataset(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1),
                         torch.arange(n))


def test_make_loader_deterministic() -> None:
    ds = _toy(20)

    def order(seed: int) -> list[int]:
        return torch.cat([y for _, y in make_loader(ds, 4, shuffle=True, seed=seed)]).tolist()

    assert order(0) == order(0) != order(1)
    assert sorted(order(0)) == list(range(20))
    plain = make_loader(ds, 6)
    assert torch.cat([y for _, y in plain]).tolist() == list(range(20))
    assert len(make_loader(ds, 6, drop_last=True)) == 3
    with pytest.raises(XaiCompressError):
        make_loader(ds, 0)


def test_subset_and_dataset_tensors() -> None:
    ds = _toy(10)
    s = subset(ds, 4, seed=3)
    assert len(s) == 4 and s.indices == subset(ds, 4, seed=3).indices
    assert subset(ds, 10) is ds and subset(ds, 99) is ds
    x, y = dataset_tensors(s)
    assert x.shape == (4, 1, 1, 1) and y.tolist() == list(s.indices)
    x, y = dataset_tensors(ds, 3)
    assert y.tolist() == [0, 1, 2] and x.dtype == torch.float32 and y.dtype == torch.int64
    assert dataset_tensors(subset(s, 2, seed=1), 1)[1].shape == (1,)

    class Plain(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 5

        def __getitem__(self, i: int):
            return torch.full((1, 2, 2), float(i)), torch.tensor(i)

    x, y = dataset_tensors(Plain(), 2)
    assert x.shape == (2, 1, 2, 2) and y.tolist() == [0, 1]
    with pytest.raises(XaiCompressError):
        subset(ds, -1)


def test_make_loader_uses_distributed_sampler(tmp_path) -> None:
    import torch.distributed as dist
    from torch.utils.data.distributed import DistributedSampler

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        loader = make_loader(_toy(12), 5, shuffle=True, seed=7, drop_last=True)
        assert isinstance(loader.sampler, DistributedSampler)
        assert loader.sampler.seed == 7 and loader.sampler.shuffle
        assert len(loader) == 2
    finally:
        dist.destroy_process_group()


def test_split_option_gives_another_partition_of_the_same_images():
    from xaicompress.data import load_dataset

    a, b = load_dataset("mnist5k"), load_dataset("mnist5k?split=1")
    assert len(a.train) == len(b.train) == 4000 and len(a.test) == len(b.test) == 1000
    xa = torch.stack([a.test[i][0] for i in range(len(a.test))])
    xb = torch.stack([b.test[i][0] for i in range(len(b.test))])
    assert not torch.equal(xa, xb)  # other test images ...
    ya = torch.tensor([int(a.test[i][1]) for i in range(len(a.test))])
    yb = torch.tensor([int(b.test[i][1]) for i in range(len(b.test))])
    assert torch.equal(ya.bincount(), yb.bincount())  # ... with the same class balance
    assert torch.equal(load_dataset("mnist5k?split=0").test[7][0], a.test[7][0])


def test_split_option_is_checked():
    from xaicompress.data import load_dataset

    for bad in ("mnist5k?split=-1", "mnist5k?split=x", "mnist5k?split=1001"):
        with pytest.raises(XaiCompressError, match="split"):
            load_dataset(bad)
    with pytest.raises(XaiCompressError, match="embedded"):
        load_dataset("idx:/nowhere?split=1")
