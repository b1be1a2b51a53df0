"""Deterministic DataLoaders, seeded subsets and tensor stacking."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from xaicompress.errors import XaiCompressError


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def make_loader(dataset: Dataset, batch_size: int = 128, *, shuffle: bool = False,
                seed: int = 0, drop_last: bool = False) -> DataLoader:
    """A single-process DataLoader whose order depends only on `seed`.

    Shuffling uses a `torch.Generator` seeded with `seed` (each new iteration draws the next
    permutation, so epochs differ but runs repeat). Under an initialised torch.distributed
    process group a `DistributedSampler(shuffle, seed, drop_last)` is used instead; the
    caller must then call ``loader.sampler.set_epoch(epoch)`` to vary the order per epoch.
    Inside a command running on a GPU (`xaicompress.device.use_runtime`) batches come in
    pinned memory from `--workers` worker processes (the order is the sampler's, in the
    main process, so workers do not change the numbers); elsewhere no workers, no pinning.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise XaiCompressError(f"batch size {batch_size!r}: expected an integer >= 1")
    if _distributed():
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                          drop_last=drop_last, **_device_kwargs())
    generator = None
    if shuffle:
        generator = torch.Generator()
        generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      drop_last=drop_last, **_device_kwargs())


def _device_kwargs() -> dict[str, Any]:
    """DataLoader options of the running command's device (`--workers`, pinned memory)."""
    from xaicompress.device import runtime

    rt = runtime()
    return {"num_workers": rt.workers, "pin_memory": rt.pin_memory,
            "persistent_workers": rt.workers > 0}


def subset(dataset: Dataset, n: int, *, seed: int = 0) -> Dataset:
    """The first `n` items of a `seed`-ed random permutation (no stratification).

    ``n >= len(dataset)`` returns `dataset` itself. Used to pick relevance samples.
    """
    if n < 0:
        raise XaiCompressError(f"sample count {n}: expected a number >= 0")
    size = len(dataset)  # type: ignore[arg-type]
    if n >= size:
        return dataset
    generator = torch.Generator()
    generator.manual_seed(seed)
    indices = torch.randperm(size, generator=generator)[:n].tolist()
    return Subset(dataset, indices)


def _as_tensor_view(dataset: Dataset) -> tuple[TensorDataset, list[int] | None] | None:
    """(TensorDataset, indices or None) when items can be sliced without a Python loop."""
    if isinstance(dataset, TensorDataset):
        return dataset, None
    if isinstance(dataset, Subset):
        inner = _as_tensor_view(dataset.dataset)
        if inner is not None:
            base, idx = inner
            mapped = [idx[i] for i in dataset.indices] if idx is not None else list(
                dataset.indices)
            return base, mapped
    return None


def dataset_tensors(dataset: Dataset, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the first `n` items (all when None) into x (n, C, H, W) float32, y (n,) int64."""
    size = len(dataset)  # type: ignore[arg-type]
    n = size if n is None else min(max(n, 0), size)
    view = _as_tensor_view(dataset)
    if view is not None:
        base, idx = view
        x_all, y_all = base.tensors[0], base.tensors[1]
        if idx is None:
            return x_all[:n].float(), y_all[:n].long()
        sel = torch.as_tensor(idx[:n], dtype=torch.long)
        return x_all[sel].float(), y_all[sel].long()
    if n == 0:
        raise XaiCompressError("cannot stack 0 items of a dataset: the dataset is empty")
    xs, ys = zip(*(dataset[i] for i in range(n)), strict=True)
    return torch.stack(list(xs)).float(), torch.stack(
        [torch.as_tensor(y) for y in ys]).long()
