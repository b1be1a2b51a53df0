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

from xaicompress.errors import XaiCompressError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank; 0 unless a process group is initialised (a RANK variable left
    in the environment without torchrun does not make a single process a non-zero rank,
    which would then silently write nothing)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def is_rank0() -> bool:
    return rank() == 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def backend() -> str:
    """gloo for CPU tensors, plus nccl for CUDA tensors where CUDA exists. NCCL alone
    refuses CPU tensors, which a CPU run (`--device cpu`) and the object broadcasts use;
    with a device-mapped backend torch picks per collective (object collectives use gloo).
    XAICOMPRESS_DIST_BACKEND overrides it (e.g. gloo: two ranks sharing one GPU, which
    NCCL refuses)."""
    override = os.environ.get("XAICOMPRESS_DIST_BACKEND", "").strip()
    if override:
        return override
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def collective_device() -> torch.device:
    """Where a collective's scratch tensor lives: this rank's GPU when the run uses one (its
    NCCL path), else the CPU (gloo)."""
    from xaicompress.device import current_device

    return current_device()


def _env_int(name: str, low: int) -> int | None:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or value < low:
        raise XaiCompressError(f"environment variable {name}={raw!r}: expected an integer >= "
                               f"{low} (torchrun sets it; unset it to run in one process)")
    return value


def launch_env() -> tuple[int, int] | None:
    """(rank, world size) when the environment describes a torchrun launch of more than one
    process, None for a single process; any inconsistency is a one-line error."""
    world = _env_int("WORLD_SIZE", 1)
    rank_ = _env_int("RANK", 0)
    _env_int("LOCAL_RANK", 0)
    if world is None or world == 1:
        # A world of one is a single process whatever RANK / LOCAL_RANK say.
        return None
    if rank_ is None or rank_ >= world:
        raise XaiCompressError(f"environment: WORLD_SIZE={world} but RANK="
                               f"{os.environ.get('RANK')!r}; expected a rank 0..{world - 1} "
                               "(launch with torchrun, or unset WORLD_SIZE)")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise XaiCompressError(f"environment: WORLD_SIZE={world} but {' and '.join(missing)} "
                               "not set; launch with torchrun, or unset WORLD_SIZE to run in "
                               "one process")
    return rank_, world


def init_from_env() -> bool:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if launch_env() is None or not dist.is_available():
        return False
    if not dist.is_initialized():
        local = _env_int("LOCAL_RANK", 0) or 0
        if torch.cuda.is_available() and local < torch.cuda.device_count():
            # before the process group, so NCCL binds this rank to its own GPU
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend())
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
