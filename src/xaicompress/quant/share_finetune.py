"""Codebook fine-tuning of a shared model: indices fixed, centroids trained (Deep Compression).

Every shared layer's weight is re-parametrised as codebook[indices] * mask, so autograd sums
the gradients of a centroid's members into that centroid. The optimiser is Adam, whose step
is about its learning rate whatever the gradient's size: so each codebook's rate is set
relative to the spread of that layer's weights (`lr_scale` * std), not to 1/k, which made the
step of a narrow layer's centroids as large as the layer itself and diverged at k = 2.
Biases, BatchNorm and unshared layers train at `other_lr`; the best state (the start
included) is kept: by the loss on the validation split when one is given (`val_set`, what
the pipeline and the share stage pass: `bundle.val`), so the choice is made on data the
fine-tuning does not train on; by the training loss when none is (a library call without
one), so fine-tuning never returns a model worse on its own data. The loss, not the accuracy:
on a few hundred images the accuracy moves by whole images and ties; the cross-entropy is a
finer, less selection-prone reading of the same images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import Dataset

from xaicompress.checkpoint import Checkpoint
from xaicompress.data import make_loader
from xaicompress.device import autocast, grad_scaler, model_device, runtime, to_model_device
from xaicompress.distill import LossFn, cross_entropy, distillation
from xaicompress.distributed import world_size
from xaicompress.encoding import Codebook, CompressionState
from xaicompress.encoding.codebook import codebook_dtype_of, round_to_dtype
from xaicompress.errors import XaiCompressError
from xaicompress.progress import track
from xaicompress.relevance.distributed import all_reduce_sums
from xaicompress.train import _maybe_ddp, random_shift, seed_everything

#: codebook Adam rate = LR_SCALE * std of the layer's kept weights. The result hardly depends
#: on it: 0.02..0.2 within 0.5 pt at k = 2 and 4 (lenet5 / lenet300, 2 seeds, biases 1e-3);
#: 0.05 / 0.1 / 0.2 within 0.2 pt with biases at 3e-2 (3 seeds). A rate relative to the
#: layer's spread keeps a narrow layer's centroids from jumping past each other.
LR_SCALE = 0.05
#: Adam rate of biases, BatchNorm and unshared weights. With the indices fixed these are most
#: of what one epoch can still move: plain k = 2, lenet5 / lenet300, 3 seeds, Δ vs dense after
#: one epoch at batch 32: 1e-2 -3.1 / -6.1 pt, 3e-2 -2.4 / -4.7 pt (1e-3 at batch 64: -12.8 /
#: -41.2); k = 4 improved too; at k >= 8 fine-tuning moved no mean by more than 0.25 pt
#: (docs/results/weight_sharing.md)
OTHER_LR = 3e-2
#: batch of the one fine-tuning epoch: smaller batches give the few trainable values (k per
#: layer, and the biases) more steps in the same pass over the data
BATCH_SIZE = 32
#: global gradient-norm clip: a guard against one wild batch; measured neutral on the average
#: (k = 2 and 4, lenet5 / lenet300, 2 seeds)
CLIP_NORM = 1.0


class SharedWeight(nn.Module):
    """Parametrisation weight = codebook[indices] * mask.

    codebook: trainable (k,); indices: int64 weight shape; mask: float weight shape.
    Autograd's gather backward sums the gradients of a centroid's members, which is exactly
    the centroid gradient of Deep Compression.
    """

    def __init__(self, codebook: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.codebook = nn.Parameter(codebook.detach().clone().float())
        self.register_buffer("indices", indices.detach().clone().long())
        self.register_buffer("mask", mask.detach().clone().float())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:  # noqa: ARG002 (replaced)
        return self.codebook[self.indices] * self.mask


def centroid_lr(weights: torch.Tensor, mask: torch.Tensor | None = None,
                scale: float = LR_SCALE) -> float:
    """Adam learning rate of one layer's codebook: `scale` * std of its kept weights.

    weights: the layer's effective weights (any shape); mask: bool, same shape (None = all
    kept). Floored at 1e-6 so a layer of identical weights still trains.
    """
    w = weights.detach().float().reshape(-1)
    if mask is not None:
        w = w[mask.reshape(-1).bool()]
    std = float(w.std()) if w.numel() > 1 else float(w.abs().mean()) if w.numel() else 0.0
    return max(1e-6, scale * (std if math.isfinite(std) else 0.0))


@torch.no_grad()
def _mean_loss(model: nn.Module, train_set: Dataset, batch_size: int = 512) -> float:
    """Mean cross-entropy over `train_set` (or a validation set); under torch.distributed
    each rank scores its shard and the sums are added, so every rank sees the same number
    (and keeps the same state)."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for batch in make_loader(train_set, batch_size, shuffle=False):
        x, y = to_model_device(batch, model)
        total += float(F.cross_entropy(model(x), y, reduction="sum"))
        n += len(y)
    model.train(was)
    sums = all_reduce_sums({"loss": torch.tensor([total], dtype=torch.float64),
                            "n": torch.tensor([float(n)], dtype=torch.float64)})
    return float(sums["loss"]) / max(1.0, float(sums["n"]))


def _check_options(epochs: float, rates: dict[str, float | None]) -> None:
    for label, value in rates.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise XaiCompressError(f"codebook fine-tuning {label} {value}: expected a positive "
                                   "number")
    if not math.isfinite(epochs) or epochs < 0:
        raise XaiCompressError(f"--finetune-epochs {epochs}: expected a number >= 0")


def _parametrize(out: Checkpoint, shared: dict[str, Codebook], lr: float | None,
                 lr_scale: float, centroid_lrs: Mapping[str, float] | None) -> dict[str, float]:
    """Make every shared layer's weight codebook[indices] * mask; returns the codebook rates."""
    modules = dict(out.model.named_modules())
    rates: dict[str, float] = {}
    for name, cb in shared.items():
        w = modules[name].weight
        lc = out.state.layers[name]
        mask = (lc.mask.keep if lc.mask is not None else torch.ones(w.shape, dtype=torch.bool)
                ).to(w.device)
        rates[name] = (float(centroid_lrs[name]) if centroid_lrs and name in centroid_lrs
                       else lr if lr is not None else centroid_lr(w, mask, lr_scale))
        if not (math.isfinite(rates[name]) and rates[name] > 0):
            raise XaiCompressError(f"codebook fine-tuning: learning rate {rates[name]} of layer "
                                   f"{name!r}: expected a positive number")
        parametrize.register_parametrization(modules[name], "weight",
                                             SharedWeight(cb.values, cb.indices, mask).to(
                                                 w.device))  # the state is on the CPU
        # never read by the forward: frozen, so DDP does not wait for its gradient
        modules[name].parametrizations.weight.original.requires_grad_(False)
    return rates


def _param_groups(model: nn.Module, shared: dict[str, Codebook], rates: dict[str, float],
                  other_lr: float) -> list[dict[str, Any]]:
    """One Adam group per codebook (its own rate), one for everything else."""
    books = {f"{n}.parametrizations.weight.0.codebook": n for n in shared}
    groups: list[dict[str, Any]] = [{"params": [], "lr": other_lr}]
    for n, p in model.named_parameters():
        if n.endswith("parametrizations.weight.original"):
            continue  # replaced by the codebook: never read, never trained
        if n in books:
            groups.append({"params": [p], "lr": rates[books[n]]})
        else:
            groups[0]["params"].append(p)
    return [g for g in groups if g["params"]]


def _unparametrize(model: nn.Module, shared: dict[str, Codebook]) -> dict[str, torch.Tensor]:
    """Remove the parametrisations; returns the trained codebooks."""
    modules = dict(model.named_modules())
    new = {}
    for name in shared:
        new[name] = modules[name].parametrizations.weight[0].codebook.detach().clone()
        parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=False)
        modules[name].weight.requires_grad_(True)  # frozen above, trainable again
    return new


def train_step(net: nn.Module, batch: Any, opt: torch.optim.Optimizer, scaler: Any,
               sched: Any, params: list[torch.Tensor], *, augment: int | None,
               clip: float | None, amp: str, loss: LossFn = cross_entropy) -> None:
    """One optimiser step of a shared model's fine-tuning (centroids or QAT) on `batch`:
    random shifts of up to `augment` pixels (None: 1/12 of the height), `loss` (default
    cross-entropy; `distill.distillation` adds a teacher's term) under autocast, the
    global gradient norm clipped to `clip` (None: off), the scheduler stepped.
    net: the model, or its DDP wrapper under torchrun."""
    model = net.module if hasattr(net, "module") else net
    device = model_device(model)
    x, y = to_model_device(batch, model)
    shift = x.shape[-2] // 12 if augment is None else augment
    if shift:
        x = random_shift(x, shift)
    opt.zero_grad(set_to_none=True)
    with autocast(device, amp):
        value = loss(net(x), x, y)
    scaler.scale(value).backward()
    if clip is not None:
        scaler.unscale_(opt)  # clip the true gradients, not scaled ones
        torch.nn.utils.clip_grad_norm_(params, clip)
    scaler.step(opt)
    scaler.update()
    sched.step()


@dataclass
class _Run:
    """One fine-tuning run: the loop, and the best state by the loss on `select_set` (the
    validation split, or the training split when there is none)."""

    out: Checkpoint
    train_set: Dataset
    groups: list[dict[str, Any]]
    others: CompressionState
    clip: float | None
    augment: int | None
    keep_best: bool
    amp: str = "off"
    select_set: Dataset | None = None
    loss: LossFn = cross_entropy
    losses: list[float] = field(default_factory=list)
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    step: int = 0

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.out.model.state_dict().items()}

    def record(self) -> None:
        data = self.select_set if self.select_set is not None else self.train_set
        self.losses.append(_mean_loss(self.out.model, data))
        # NaN never compares smaller: a diverged state is never kept
        if self.best is None or self.losses[-1] < self.best[0]:
            self.best = (self.losses[-1], self.step, self.snapshot())

    def train(self, loader: Any, total: int) -> None:
        model = self.out.model
        params = [p for g in self.groups for p in g["params"]]
        opt = torch.optim.Adam(self.groups)
        net = _maybe_ddp(model)  # gradients averaged over ranks under torchrun
        scaler = grad_scaler(model_device(model), self.amp)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        per_epoch = len(loader)
        if self.keep_best:
            self.record()
        with torch.enable_grad():
            model.train()
            it = iter(track(range(total), "codebook fine-tune", total))
            epoch = 0
            while self.step < total:
                if hasattr(loader.sampler, "set_epoch"):
                    loader.sampler.set_epoch(epoch)
                for batch in loader:
                    train_step(net, batch, opt, scaler, sched, params, augment=self.augment,
                               clip=self.clip, amp=self.amp, loss=self.loss)
                    self.others.apply(model)
                    self.step += 1
                    next(it, None)
                    if self.keep_best and (self.step % per_epoch == 0 or self.step == total):
                        self.record()
                    if self.step >= total:
                        break
                epoch += 1
            for _ in it:  # close the progress bar
                pass
        if self.best is not None:
            model.load_state_dict(self.best[2])


def finetune_shared(ckpt: Checkpoint, train_set: Dataset, *, epochs: float = 1,
                    lr: float | None = None, seed: int = 0, batch_size: int = BATCH_SIZE,
                    lr_scale: float = LR_SCALE, other_lr: float = OTHER_LR,
                    clip: float | None = CLIP_NORM, keep_best: bool = True,
                    augment: int | None = 0, centroid_lrs: Mapping[str, float] | None = None,
                    val_set: Dataset | None = None, distill: float = 0.0,
                    teacher: nn.Module | None = None) -> Checkpoint:
    """Train the centroids of every shared layer of a copy of `ckpt` (indices fixed).

    train_set: (x (C, H, W), label) pairs. epochs may be fractional; the cosine schedule
    spans them all. lr: one Adam rate for every parameter (overrides the two below);
    lr_scale: codebook rate = lr_scale * std of the layer's kept weights; other_lr: rate of
    biases, BatchNorm and unshared layers (their masks / integer grids re-imposed after every
    step). clip: max global gradient norm (None = off). keep_best: evaluate the loss at the
    start and after every epoch and keep the best state: on `val_set` (the validation
    split) when given, else on `train_set`. augment: random shifts
    of up to this many pixels. centroid_lrs: layer -> codebook rate, for the layers it names
    (overrides lr and lr_scale there). distill: weight of distillation from `teacher`
    (default `ckpt`'s model; `xaicompress.distill`, 0 = off). Pruned weights stay zero;
    centroids are rounded to their codebook dtype at the end so packing stays lossless. The
    input is not modified.
    """
    _check_options(epochs, {"--lr": lr, "lr_scale": lr_scale, "other_lr": other_lr,
                            "clip": clip})
    loss = distillation(teacher if teacher is not None else ckpt.model, distill)
    out = ckpt.copy()
    if epochs == 0:
        return out
    shared = {n: lc.codebook for n, lc in out.state.layers.items() if lc.codebook is not None}
    if not shared:
        raise XaiCompressError("codebook fine-tuning: the checkpoint has no shared layers; "
                               "run weight sharing first")
    out.state.apply(out.model)
    dtypes = {n: codebook_dtype_of(cb.values) for n, cb in shared.items()}
    rates = _parametrize(out, shared, lr, lr_scale, centroid_lrs)
    others = CompressionState({n: lc for n, lc in out.state.layers.items() if n not in shared})
    run = _Run(out, train_set, _param_groups(out.model, shared, rates,
                                             lr if lr is not None else other_lr),
               others, clip, augment, keep_best, runtime().amp, val_set, loss)
    seed_everything(seed)
    # batch_size is the global batch, as in train.train: each of N ranks takes 1/N of it
    loader = make_loader(train_set, max(1, batch_size // world_size()), shuffle=True, seed=seed)
    try:
        run.train(loader, max(1, int(round(epochs * len(loader)))))
    finally:
        new = _unparametrize(out.model, shared)
    for name, old in shared.items():
        cb = torch.from_numpy(round_to_dtype(new[name].cpu().numpy(), dtypes[name]))
        if not torch.isfinite(cb).all():
            raise XaiCompressError(f"codebook fine-tuning diverged on layer {name!r}; try a "
                                   "smaller --lr")
        out.state.layers[name].weights = Codebook(cb, old.indices)
    out.state.apply(out.model)
    out.model.eval()
    out.history.append({"stage": "finetune_shared", "epochs": epochs, "seed": seed,
                        "lr": lr, "lr_scale": lr_scale, "other_lr": other_lr, "clip": clip,
                        "centroid_lr": rates, "batch_size": batch_size, "augment": augment,
                        "distill": distill,
                        "best_by": "val_loss" if val_set is not None else "train_loss",
                        ("val_loss" if val_set is not None else "train_loss"): run.losses,
                        "kept_step": run.best[1] if run.best else run.step})
    return out
