"""torch.distributed glue: every command runs unchanged under `torchrun`.

`torchrun --nproc_per_node=N -m xaicompress ...` sets RANK / WORLD_SIZE / MASTER_ADDR; the
CLI calls `init_from_env()` once. The backend is gloo on CPU and nccl on GPU. Data loaders
shard with a DistributedSampler (data/loader.py), relevance sums are all-reduced
(relevance/), training wraps the model in DistributedDataParallel (train.py) and only rank 0
writes files (atomic.py).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_rank0() -> bool:
    return rank() == 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_env() -> bool:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend())
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s value of `obj` on every rank (decide once, act everywhere)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
