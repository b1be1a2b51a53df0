"""Where models run: device choice, batch placement, and the per-run settings of a device.

The PyTorch idiom, followed everywhere: the *caller* places the model (`model.to(device)`,
done by the commands and the pipeline right after loading or building it), and every loop
moves each batch to the model's device (`to_model_device(batch, model)`), so a library
function works on whatever device its model sits on. Compression state (masks, codebooks,
integer grids, activation scales) is kept on the CPU, where files are written from, and
each encoding moves its tensors to the weight's device where it meets the weight.

A command resolves its `--device` once (`resolve_device`) and runs inside `use_runtime`,
which also carries the DataLoader settings of that device (pinned memory and worker
processes on CUDA), the mixed precision of training (`amp`) and the deterministic switch.
Outside `use_runtime` (a library caller) nothing changes: no workers, no pinning, float32.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from xaicompress.errors import XaiCompressError

#: what `--device` accepts (cuda:N with N an index below torch.cuda.device_count())
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
#: `--amp` choices; autocast applies to training and fine-tuning only, never to relevance
AMP_CHOICES = ("off", "bf16", "fp16")
#: DataLoader worker processes on CUDA when `--workers` is not given (0 on the CPU, where
#: the tensors are already in memory and workers only add process start-up)
CUDA_WORKERS = 2


def _local_rank() -> int | None:
    raw = os.environ.get("LOCAL_RANK", "").strip()
    if not raw or os.environ.get("WORLD_SIZE", "1").strip() in ("", "1"):
        return None
    try:
        return int(raw)
    except ValueError:
        return None  # distributed.launch_env reports a malformed LOCAL_RANK


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch.device of a `--device` value: auto | cpu | cuda | cuda:N.

    auto is the GPU when CUDA is available, else the CPU. Under torchrun (WORLD_SIZE > 1)
    `auto` and `cuda` mean this rank's GPU, cuda:LOCAL_RANK. `cuda` without CUDA, or an
    index beyond the GPUs present, is a one-line XaiCompressError (exit 2 on the CLI).
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "auto").strip().lower()
    if text == "cpu":
        return torch.device("cpu")
    if text == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if text not in ("auto", "cuda") and not text.startswith("cuda:"):
        raise XaiCompressError(f"--device {spec!r}: expected one of {', '.join(DEVICE_CHOICES)}")
    if not torch.cuda.is_available():
        raise XaiCompressError(f"--device {spec}: CUDA is not available on this machine (torch "
                               f"{torch.__version__}, {_why_no_cuda()}); use --device cpu "
                               "or auto")
    count = torch.cuda.device_count()
    if text.startswith("cuda:"):
        index_text = text.split(":", 1)[1]
        if not index_text.isdigit():
            raise XaiCompressError(f"--device {spec!r}: expected cuda:N with N a GPU index")
        index = int(index_text)
    else:
        index = _local_rank() or 0
    if index >= count:
        raise XaiCompressError(f"--device {spec}: GPU index {index} does not exist; this "
                               f"machine has {count} GPU(s), cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def _why_no_cuda() -> str:
    return "a CPU-only build" if torch.version.cuda is None else "no GPU visible"


def model_device(model: nn.Module) -> torch.device:
    """The device of `model`'s first parameter (or buffer); the CPU for a model with none."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    """`batch` (a tensor, or a tuple / list / dict of them) on `device`; non-blocking when
    the tensor is in pinned memory (the copy then overlaps the previous step's kernels)."""
    if isinstance(batch, Tensor):
        if batch.device == device:
            return batch
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def to_model_device(batch: Any, model: nn.Module) -> Any:
    """`batch` on the device of `model` (see `to_device`)."""
    return to_device(batch, model_device(model))


def cpu_copy(model: nn.Module) -> nn.Module:
    """`model` itself when it is on the CPU, else a deep copy moved there (files are written
    and checked from CPU tensors; the model in use stays where it is)."""
    import copy

    if model_device(model).type == "cpu":
        return model
    return copy.deepcopy(model).to("cpu")


# ---------------------------------------------------------------- the run's settings
@dataclass(frozen=True)
class Runtime:
    """A command's device settings: the device, DataLoader workers, training precision."""

    device: torch.device = torch.device("cpu")
    workers: int = 0
    amp: str = "off"
    deterministic: bool = False

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"


_CURRENT: list[Runtime] = [Runtime()]


def runtime() -> Runtime:
    """The settings of the command running now (CPU, no workers, float32 outside one)."""
    return _CURRENT[-1]


def current_device() -> torch.device:
    return runtime().device


def make_runtime(device: str = "auto", workers: int | None = None, amp: str = "off",
                 deterministic: bool = False) -> Runtime:
    """Resolve a command's options (`workers` None = 0 on the CPU, CUDA_WORKERS on CUDA)."""
    dev = resolve_device(device)
    if amp not in AMP_CHOICES:
        raise XaiCompressError(f"--amp {amp!r}: expected one of {', '.join(AMP_CHOICES)}")
    if amp == "fp16" and dev.type != "cuda":
        raise XaiCompressError("--amp fp16: needs a CUDA device (on the CPU use --amp bf16 "
                               "or off)")
    if workers is None:
        workers = CUDA_WORKERS if dev.type == "cuda" else 0
    return Runtime(dev, int(workers), amp, bool(deterministic))


@contextlib.contextmanager
def use_runtime(rt: Runtime) -> Iterator[Runtime]:
    """Run the block with `rt` as the current settings (restored afterwards)."""
    if rt.device.type == "cuda":
        torch.cuda.set_device(rt.device)
    previous = torch.are_deterministic_algorithms_enabled()
    if rt.deterministic:
        set_deterministic(True)
    _CURRENT.append(rt)
    try:
        yield rt
    finally:
        _CURRENT.pop()
        if rt.deterministic:
            torch.use_deterministic_algorithms(previous)


def set_deterministic(on: bool = True) -> None:
    """`torch.use_deterministic_algorithms(on)`: on CUDA the same seed then gives the same
    numbers run after run (kernels without a deterministic version raise instead of
    running). cuBLAS needs CUBLAS_WORKSPACE_CONFIG=:4096:8 set before its first use; it is
    set here when absent. cuDNN's autotuner is switched off (it picks kernels by timing)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(on)


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """True float32 matmuls and convolutions in the block: TF32 off (cuDNN allows it for
    convolutions by default on Ampere and later, ~1e-3 relative error) and autocast off.
    Relevance runs inside: DeepLIFT's contributions must sum to f(x) - f(ref) within 1e-4,
    and a CPU and a GPU run of the same model must agree to that."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with contextlib.ExitStack() as stack:
            for kind in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                stack.enter_context(torch.autocast(kind, enabled=False))
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


# ---------------------------------------------------------------- mixed precision
def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of an `--amp` value (None for off)."""
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast to `amp`'s dtype on `device` (a no-op for off). fp16 on the CPU is refused:
    CPU autocast supports bf16, and fp16 needs the GradScaler, which is a CUDA tool."""
    dtype = amp_dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    if device.type == "cpu" and dtype is torch.float16:
        raise XaiCompressError("--amp fp16: needs a CUDA device (on the CPU use --amp bf16 "
                               "or off)")
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """A GradScaler, enabled for fp16 only (bf16 has float32's range: no loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")
