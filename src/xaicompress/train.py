"""Train, fine-tune and evaluate classifiers; deterministic for a given seed."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from xaicompress.data import make_loader
from xaicompress.device import (
    autocast,
    current_device,
    grad_scaler,
    model_device,
    runtime,
    to_model_device,
)
from xaicompress.distill import LossFn, cross_entropy, distillation
from xaicompress.errors import XaiCompressError
from xaicompress.progress import track


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(
    model: nn.Module,
    train_set: Dataset,
    *,
    epochs: float = 10,
    lr: float | None = None,
    optimizer: str = "adam",
    batch_size: int = 64,
    weight_decay: float = 0.0,
    seed: int = 0,
    after_step: Callable[[nn.Module], None] | None = None,
    params: list[torch.nn.Parameter] | None = None,
    description: str = "train",
    augment: int | None = 0,
    amp: str | None = None,
    loss: LossFn = cross_entropy,
) -> nn.Module:
    """Train `model` in place with a cosine schedule, on the model's device; returns it.

    after_step: called after every optimizer step (e.g. to re-apply pruning masks).
    params: the parameters to optimise (default: all that require grad).
    epochs may be fractional (e.g. 0.5 trains on half an epoch of batches).
    augment: random translations of up to this many pixels (0 = none, None = image height
        // 12, i.e. 2 px on 28x28 and none on 8x8); a cheap regulariser that matters on small
        training sets such as mnist5k's 4,000 images.
    amp: mixed precision, off | bf16 | fp16 (fp16 with a GradScaler, CUDA only); None = the
        running command's `--amp` (off outside one).
    loss: loss(logits, x, y) of a batch (default cross-entropy; `distill.distillation` adds
        a teacher's term).
    """
    if epochs <= 0:
        return model
    seed_everything(seed)
    from xaicompress.distributed import world_size

    # batch_size is the global batch: under torchrun each of N ranks takes 1/N of it, so
    # a distributed run makes the same number of steps with the same effective batch.
    loader = make_loader(train_set, max(1, batch_size // world_size()), shuffle=True,
                         seed=seed, drop_last=False)
    steps_per_epoch = len(loader)
    total = max(1, int(round(epochs * steps_per_epoch)))
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr or 3e-3,
                                                      weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr or 0.05, momentum=0.9, weight_decay=weight_decay,
                              nesterov=True)
    else:
        raise XaiCompressError(f"--optimizer {optimizer!r}: expected 'adam' or 'sgd'")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    net = _maybe_ddp(model)
    net.train()
    step_fn = _Step(net, opt, amp if amp is not None else runtime().amp, loss)
    step = 0
    epoch = 0
    with _progress(total, description) as advance:
        while step < total:
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
            for batch in loader:
                x, y = to_model_device(batch, model)
                shift = x.shape[-2] // 12 if augment is None else augment
                if shift:
                    x = random_shift(x, shift)
                step_fn(x, y)
                sched.step()
                if after_step is not None:
                    after_step(model)
                step += 1
                advance()
                if step >= total:
                    break
            epoch += 1
    model.eval()
    return model


class _Step:
    """One optimizer step, in mixed precision when asked: the forward pass and the loss
    under autocast, the backward pass through a GradScaler (enabled for fp16 only; off, it
    is exactly loss.backward(); opt.step())."""

    def __init__(self, net: nn.Module, opt: torch.optim.Optimizer, amp: str,
                 loss: LossFn = cross_entropy) -> None:
        self.net, self.opt, self.amp, self.loss = net, opt, amp, loss
        self.device = model_device(net)
        self.scaler = grad_scaler(self.device, amp)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp):
            loss = self.loss(self.net(x), x, y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()


def random_shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image (N, C, H, W) by a random integer offset in [-s, s]^2, filling
    with the image's own border value (the background after normalisation). The offsets
    come from the CPU generator whatever x's device, so a GPU run shifts as a CPU run."""
    n, _, h, w = x.shape
    dev = x.device
    pad = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (n,)).to(dev)
    dx = torch.randint(0, 2 * max_shift + 1, (n,)).to(dev)
    rows = (dy[:, None] + torch.arange(h, device=dev)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=dev)[None, :])[:, None, None, :]
    idx_n = torch.arange(n, device=dev)[:, None, None, None]
    idx_c = torch.arange(x.shape[1], device=dev)[None, :, None, None]
    return pad[idx_n, idx_c, rows, cols]


def _maybe_ddp(model: nn.Module) -> nn.Module:
    from xaicompress.distributed import is_distributed

    if is_distributed():
        device = model_device(model)
        # a CUDA model: DDP on this rank's GPU (NCCL all-reduces its gradients there)
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


class _progress:
    def __init__(self, total: int, description: str):
        self.total, self.description = total, description

    def __enter__(self) -> Callable[[], None]:
        self._it = iter(track(range(self.total), self.description, self.total))
        return lambda: next(self._it, None)

    def __exit__(self, *exc: object) -> None:
        for _ in self._it:  # drain so the bar closes cleanly
            pass


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> tuple[torch.Tensor,
                                                                                torch.Tensor]:
    """Logits (N, K) and labels (N,) over the whole dataset, in order (run on the model's
    device, returned on the CPU)."""
    model.eval()
    outs, ys = [], []
    # Evaluation always sees the whole set on every rank: no DistributedSampler here.
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        outs.append(model(to_model_device(x, model)).cpu())
        ys.append(y)
    return torch.cat(outs), torch.cat(ys)


def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent."""
    logits, y = predict(model, dataset, batch_size)
    return float((logits.argmax(1) == y).float().mean() * 100)


def train_checkpoint(model_name: str, data_spec: str, *, epochs: float = 15, seed: int = 0,
                     optimizer: str = "adam", lr: float | None = None, batch_size: int = 64,
                     model_kwargs: dict | None = None, augment: int | None = None,
                     bundle=None, preprocess=None):  # noqa: ANN001,ANN201
    """Build `model_name` for `data_spec`, train it, and return a Checkpoint.

    bundle: the already loaded DatasetBundle of `data_spec` (loaded here when None, with
    `preprocess`, a `data.preprocess.Preprocess`). The checkpoint records the complete
    preprocessing the training saw (the data's statistics unless `preprocess` set them)."""
    from xaicompress.checkpoint import Checkpoint, ModelSpec
    from xaicompress.data import load_dataset

    if bundle is None:
        bundle = load_dataset(data_spec, seed=seed, preprocess=preprocess)
    spec = ModelSpec(model_name, tuple(bundle.input_shape), bundle.num_classes,
                     dict(model_kwargs or {}), bundle.preprocess)
    seed_everything(seed)
    model = spec.build().to(current_device())  # built on the CPU (same init), then placed
    train(model, bundle.train, epochs=epochs, lr=lr, optimizer=optimizer,
          batch_size=batch_size, seed=seed, augment=augment)
    cfg = {"stage": "train", "epochs": epochs, "seed": seed, "optimizer": optimizer, "lr": lr,
           "batch_size": batch_size, "augment": augment}
    if runtime().amp != "off":  # absent when off: float32 checkpoints' metadata unchanged
        cfg["amp"] = runtime().amp
    ckpt = Checkpoint(model, spec, data_spec, history=[cfg])
    ckpt.metrics = {"accuracy": accuracy(model, bundle.test)}
    return ckpt


def finetune_checkpoint(ckpt, train_set: Dataset, *, epochs: float = 1, lr: float | None = None,  # noqa: ANN001
                        seed: int = 0, optimizer: str = "adam", batch_size: int = 64,
                        description: str = "fine-tune", augment: int | None = None,
                        distill: float = 0.0, teacher: nn.Module | None = None,
                        ):  # noqa: ANN201
    """Fine-tune a copy of `ckpt` keeping its compression constraints (masks, codebooks,
    integer grids) by re-imposing them after every step. Returns the new Checkpoint.

    Weight sharing and QAT have their own, better fine-tuning (centroid training, STE);
    this projection is exact for pruning masks. augment: as in `train` (None = the same
    random shifts the default training uses, so fine-tuning does not overfit small sets).
    distill: weight of distillation (`xaicompress.distill`; 0 = off) from `teacher`
    (default: `ckpt`'s own model; a pruning step passes the model before its cut).
    """
    out = ckpt.copy()
    if epochs <= 0:
        return out
    out.state.apply(out.model)
    train(out.model, train_set, epochs=epochs, lr=lr if lr is not None else 5e-4, seed=seed,
          optimizer=optimizer, batch_size=batch_size, after_step=out.state.apply,
          description=description, augment=augment,
          loss=distillation(teacher if teacher is not None else ckpt.model, distill))
    out.history.append({"stage": "finetune", "epochs": epochs, "seed": seed})
    return out
