"""Reductions that make a criterion's sums identical on one process and on many.

Every data-driven criterion accumulates *sums* over samples (and a sample count) and divides
only at the end. Under an initialised torch.distributed process group each rank scores its
shard of the samples; `all_reduce_sums` adds the per-rank sums and counts before the
division, so two ranks give the single-process result over the same samples.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xaicompress.distributed import is_distributed


def all_reduce_sums(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sum every tensor over ranks, in place (no-op on a single process); returns `tensors`.

    The tensors are flattened into one buffer so a whole criterion costs one collective; the
    buffer lives on the tensors' device (the model's: NCCL on a GPU, gloo on the CPU).
    """
    if not is_distributed() or not tensors:
        return tensors
    import torch.distributed as dist

    keys = sorted(tensors)
    device = next((t.device for t in tensors.values() if t.device.type != "cpu"),
                  torch.device("cpu"))
    flat = torch.cat([tensors[k].reshape(-1).to(device, torch.float64) for k in keys])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for k in keys:
        t = tensors[k]
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t).to(t.dtype))
        offset += n
    return tensors


def all_reduce_max(value: float) -> float:
    """Maximum of a Python float over ranks (itself on a single process)."""
    if not is_distributed():
        return value
    import torch.distributed as dist

    from xaicompress.distributed import collective_device

    t = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
