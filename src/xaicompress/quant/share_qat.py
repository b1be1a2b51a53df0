"""Entropy-constrained quantization-aware training of a shared model (ECQx, Becking et al.).

Centroid fine-tuning (`share_finetune`) keeps every weight in the cluster the assignment
gave it. Here the
assignment learns as the network does:

- every shared layer keeps full-precision *latent* weights, started at the weights before
  sharing (pruned ones fixed at 0). The forward pass sees the shared weight
  codebook[indices] (the zero cluster exactly 0) and passes its gradient unchanged to the
  latent weights (straight-through estimator);
- at every training step, before the forward pass, each kept latent weight is assigned to
  the cluster minimising relevance * (w - c)^2 + lambda * code length, with the layer's
  current cluster shares, and every centroid becomes the relevance-weighted mean of its
  members (one round of the share stage's own assignment, `entropy_share.assign`, at the
  lambda of the last budgeted assignment): weights move between clusters as they learn,
  and the zero cluster grows where relevance is low (or gives back a weight that learned to
  matter). ECQ / ECQx assign at every step the same way;
- `reassigns` times per epoch (and at the end) the step's assignment is replaced by the
  budgeted one (the caller's `reassign`: the share stage's assignment started from the
  current centroids, lambda searched again so that the real coder's size fits `avg_bits`);
- the state kept is the best on the validation split among the start and the state after
  every budgeted re-assignment: each of them fits the budget. Without a validation split
  the last state is kept.

The relevance that weights the assignment is the one scored before sharing (rescoring it
every epoch would double the stage's time on LeNet-5).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import Dataset

from xaicompress.checkpoint import Checkpoint
from xaicompress.data import make_loader
from xaicompress.device import grad_scaler, model_device, runtime
from xaicompress.distill import LossFn, cross_entropy, distillation
from xaicompress.distributed import world_size
from xaicompress.encoding import CompressionState, LayerEncoding
from xaicompress.errors import XaiCompressError
from xaicompress.quant.share_finetune import (
    BATCH_SIZE,
    CLIP_NORM,
    centroid_lr,
    train_step,
)
from xaicompress.train import _maybe_ddp, predict, seed_everything

#: the fine-tunings of a shared model: centroids only (indices fixed, `share_finetune`) or
#: quantization-aware with re-assignment (this module; entropy assignment only)
FINETUNES = ("centroids", "qat")
#: re-assignments per epoch (the last epoch ends with trained centroids, not a fresh
#: assignment: the final period only trains)
REASSIGNS = 2
#: latent-weight Adam rate = LATENT_SCALE * std of the layer's kept weights before sharing.
#: lenet5 on mnist5k?split=2 at 0.9 coded bits, 3 epochs, 3 seeds, mean test drop: 0.01 1.23,
#: 0.02 1.47, 0.05 0.80, 0.1 1.07 pt (docs/results/entropy.md)
LATENT_SCALE = 0.05
#: Adam rate of biases and the rest: centroid fine-tuning's 3e-2 (`share_finetune.OTHER_LR`)
#: moves them most while the indices are fixed; here the weights themselves train (same
#: sweep: 3e-2 0.80, 1e-2 0.73 pt; at latent scale 0.02: 1.47 / 1.30)
QAT_OTHER_LR = 1e-2
#: what the kept state maximises on the validation split: "loss" (the negative mean
#: cross-entropy) or "accuracy". The loss is the smoother statistic: it chases the noise of
#: a few hundred images less. lenet5 at 2.4 KiB on mnist5k?split=2, seeds 0-2, test drop:
#: accuracy 0.6 / 0.1 / 1.1 pt, loss 0.2 / 0.0 / 0.9 (docs/results/entropy.md)
SELECT_BY = "loss"

#: (layer -> latent weight (the module's shape), layer -> start centroids) -> (layer ->
#: encoding within the budget, what was chosen)
Reassign = Callable[[Mapping[str, torch.Tensor], Mapping[str, Any] | None],
                    tuple[dict[str, LayerEncoding], dict[str, Any]]]


class LatentShared(nn.Module):
    """Parametrization latent weight -> codebook[indices] * nonzero, the gradient of the
    output passed straight through to the latent weight (at positions `keep`, the weights
    pruning kept).

    While training, every forward pass first assigns each kept latent weight to the cluster
    minimising relevance * (w - c)^2 + lambda * code length (the entropy-constrained rule,
    with the layer's current cluster shares), then sets each centroid to the relevance-
    weighted mean of its members (the zero centroid stays 0): one round of the assignment
    per step, so the loss always sees where the latent weights are and a weight changes
    cluster as soon as its latent value crosses a boundary.

    relevance float weight shape (the assignment's sample weights; 0 where pruned); indices
    int64 weight shape; nonzero float weight shape (0 in the zero cluster); codebook (k,);
    bits (k,) code length of each cluster in bits.
    """

    def __init__(self, enc: LayerEncoding, relevance: torch.Tensor, lam: float) -> None:
        super().__init__()
        self.register_buffer("relevance", relevance.detach().clone().float())
        self.register_buffer("keep", (relevance > 0).float())
        self.register_buffer("indices", torch.zeros_like(relevance, dtype=torch.long))
        self.register_buffer("nonzero", torch.zeros_like(relevance, dtype=torch.float32))
        self.register_buffer("codebook", torch.zeros(1))
        self.register_buffer("bits", torch.zeros(1))
        #: True: use the stored assignment as it is (the state being measured or kept)
        self.frozen = False
        self.lam = lam
        self.zero = 0
        self.load(enc, lam)

    def load(self, enc: LayerEncoding, lam: float) -> None:
        """Take the codebook, indices and zero cluster of an encoding (an assignment within
        the budget) and its lambda."""
        cb = enc.codebook
        assert cb is not None
        self.lam = float(lam)
        self.codebook = cb.values.detach().clone().float().to(self.keep.device)
        zero = cb.zero_entry()
        assert zero is not None
        self.zero = zero
        self.indices.copy_(cb.indices.reshape(self.indices.shape))
        self.nonzero.copy_((self.indices != self.zero).float())
        self._code_lengths()

    def _code_lengths(self) -> None:
        counts = torch.bincount(self.indices.reshape(-1), minlength=self.codebook.numel())
        # an empty cluster costs as if half a weight were in it (as `entropy_share.assign`)
        self.bits = -torch.log2(counts.double().clamp_min(0.5) / self.indices.numel()).float()

    @torch.no_grad()
    def step_assign(self, latent: torch.Tensor) -> None:
        """One round of the entropy-constrained assignment of the kept latent weights."""
        at = self.keep.reshape(-1) > 0
        w = latent.detach().reshape(-1)[at].float()
        r = self.relevance.reshape(-1)[at]
        cost = r[:, None] * (w[:, None] - self.codebook[None, :]) ** 2
        cost += self.lam * self.bits[None, :]
        labels = cost.argmin(dim=1)
        idx = torch.full_like(self.indices.reshape(-1), self.zero)
        idx[at] = labels
        self.indices.copy_(idx.reshape(self.indices.shape))
        self.nonzero.copy_((self.indices != self.zero).float())
        k = self.codebook.numel()
        sums = torch.zeros(k, dtype=torch.float64, device=w.device).index_add_(
            0, labels, (r * w).double())
        mass = torch.zeros(k, dtype=torch.float64, device=w.device).index_add_(
            0, labels, r.double())
        book = torch.where(mass > 0, sums / mass.clamp_min(1e-300), self.codebook.double())
        book[self.zero] = 0.0
        self.codebook = book.float()
        self._code_lengths()

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        if not self.frozen:
            self.step_assign(latent)
        q = self.codebook[self.indices] * self.nonzero
        return q + (latent - latent.detach()) * self.keep


@dataclass
class _QatRun:
    """The loop: latent weights and the rest trained, the assignment stepped with them,
    re-assigned under the budget after every period; the best such state on validation."""

    out: Checkpoint
    layers: dict[str, LatentShared]
    reassign: Reassign
    val: Dataset | None
    clip: float | None
    augment: int | None
    amp: str
    loss: LossFn = cross_entropy
    #: what the best state maximises on validation (`SELECT_BY`)
    select_by: str = SELECT_BY
    #: (score, step, encodings, other tensors, validation %) of the best state so far
    best: tuple[float, int, dict[str, LayerEncoding], dict[str, torch.Tensor],
                float | None] | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    step: int = 0

    def record(self, entry: dict[str, Any], encs: Mapping[str, LayerEncoding]) -> None:
        """Validation accuracy of the state `encs` (within the budget, as packed), now
        loaded into the layers."""
        for p in self.layers.values():
            p.frozen = True
        acc = loss = score = None
        if self.val is not None:
            logits, y = predict(self.out.model, self.val)
            acc = float((logits.argmax(1) == y).float().mean() * 100)
            loss = float(torch.nn.functional.cross_entropy(logits, y))
            score = acc if self.select_by == "accuracy" else -loss
            self.out.model.train()
        for p in self.layers.values():
            p.frozen = False
        self.log.append({"step": self.step, **entry, "val_accuracy": acc, "val_loss": loss})
        # the later state wins ties (it has trained longer); without validation: the last
        if self.best is None or score is None or score >= self.best[0]:
            others = {k: v.detach().clone() for k, v in self.out.model.state_dict().items()
                      if ".parametrizations." not in k}
            self.best = (score if score is not None else -math.inf, self.step, dict(encs),
                         others, acc)

    def do_reassign(self) -> None:
        """The budgeted assignment of the latent weights, started from the current
        centroids (a weight changes cluster where its latent value crossed a boundary, not
        by a fresh clustering), loaded and measured."""
        modules = dict(self.out.model.named_modules())
        latents = {n: modules[n].parametrizations.weight.original.detach().cpu()
                   for n in self.layers}
        if not all(bool(torch.isfinite(w).all()) for w in latents.values()):
            raise XaiCompressError("quantization-aware sharing diverged; try a smaller "
                                   "--finetune-lr")
        before = {n: p.nonzero.detach().cpu().bool() for n, p in self.layers.items()}
        try:
            encs, info = self.reassign(latents, {n: p.codebook.detach().cpu().double().numpy()
                                                 for n, p in self.layers.items()})
        except XaiCompressError as exc:
            # no budgeted state this period: keep training, measure nothing (the kept state
            # is always one that fit: the start, or an earlier or later re-assignment)
            self.log.append({"step": self.step, "event": "reassign_failed",
                             "why": str(exc)})
            return
        to_zero = from_zero = 0
        for name, p in self.layers.items():
            p.load(encs[name], float(info["lambda"]))
            now = p.nonzero.detach().cpu().bool()
            to_zero += int((before[name] & ~now).sum())
            from_zero += int((~before[name] & now & (p.keep.cpu() > 0)).sum())
        self.record({"event": "reassign", "to_zero": to_zero, "from_zero": from_zero,
                     "used_bits": info.get("used_bits"), "lambda": info.get("lambda")},
                    encs)

    def optimizer(self, rates: Mapping[str, float], other_lr: float) -> torch.optim.Adam:
        """Adam over the latent weights (a rate per layer) and everything else."""
        latent = {f"{n}.parametrizations.weight.original": n for n in self.layers}
        groups: list[dict[str, Any]] = [{"params": [], "lr": other_lr}]
        for n, p in self.out.model.named_parameters():
            if n in latent:
                groups.append({"params": [p], "lr": rates[latent[n]]})
            else:
                groups[0]["params"].append(p)
        return torch.optim.Adam([g for g in groups if g["params"]])

    def train(self, batches: Iterator[Any], periods: list[int], rates: Mapping[str, float],
              other_lr: float) -> None:
        """periods: steps between re-assignments (one cosine schedule over all)."""
        model = self.out.model
        opt = self.optimizer(rates, other_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=sum(periods))
        net = _maybe_ddp(model)  # gradients averaged over ranks under torchrun
        params = [p for g in opt.param_groups for p in g["params"]]
        scaler = grad_scaler(model_device(model), self.amp)
        others = CompressionState({n: lc for n, lc in self.out.state.layers.items()
                                   if n not in self.layers})
        self.record({"event": "start"}, {n: self.out.state.layers[n] for n in self.layers})
        for steps in periods:
            model.train()
            for _ in range(steps):
                train_step(net, next(batches), opt, scaler, sched, params,
                           augment=self.augment, clip=self.clip, amp=self.amp,
                           loss=self.loss)
                others.apply(model)
                self.step += 1
            self.do_reassign()


def _batches(train_set: Dataset, batch_size: int, seed: int) -> Iterator[Any]:
    # batch_size is the global batch, as in train.train: each of N ranks takes 1/N of it
    loader = make_loader(train_set, max(1, batch_size // world_size()), shuffle=True, seed=seed)
    epoch = 0
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def periods_of(epochs: float, steps_per_epoch: int, reassigns: int) -> list[int]:
    """Steps of each training period (each ends in a re-assignment under the budget):
    `reassigns` periods per epoch, at least one."""
    total = max(1, int(round(epochs * steps_per_epoch)))
    n = max(1, int(round(epochs * reassigns)))
    bounds = [round(total * i / n) for i in range(n + 1)]
    return [b - a for a, b in pairwise(bounds) if b > a]


def finetune_qat(ckpt: Checkpoint, latents: Mapping[str, torch.Tensor], relevance:
                 Mapping[str, torch.Tensor], reassign: Reassign, train_set: Dataset,
                 val: Dataset | None, *, epochs: float = 3, lr: float | None = None,
                 seed: int = 0, batch_size: int = BATCH_SIZE, reassigns: int = REASSIGNS,
                 latent_scale: float = LATENT_SCALE, other_lr: float = QAT_OTHER_LR,
                 clip: float | None = CLIP_NORM,
                 augment: int | None = 0, distill: float = 0.0,
                 teacher: nn.Module | None = None, select_by: str = SELECT_BY) -> Checkpoint:
    """Quantization-aware training of the shared layers of a copy of `ckpt` (see module).

    ckpt: entropy-constrained shared (its codebooks and zero-cluster masks are the start);
    latents: layer -> float weight before sharing (the module's shape; pruned entries 0);
    relevance: layer -> float, weight shape: the assignment's sample weights (> 0) at the
    weights pruning kept, 0 where pruned (those stay 0); reassign: (latent weights, start
    centroids) -> encodings within the budget (the share stage's assignment); val: the
    validation split the best state is chosen on (None: the last state). lr: one Adam rate
    for everything (overrides latent_scale * std of each layer's kept weights for the latent
    weights and other_lr for biases and the rest). distill: weight of distillation from
    `teacher` (default `ckpt`'s model; `xaicompress.distill`, 0 = off). The input is not
    modified.
    """
    if not math.isfinite(epochs) or epochs <= 0:
        raise XaiCompressError(f"--finetune-epochs {epochs}: quantization-aware sharing "
                               "needs a positive number of epochs")
    loss = distillation(teacher if teacher is not None else ckpt.model, distill)
    out = ckpt.copy()
    names = [n for n, lc in out.state.layers.items() if lc.codebook is not None]
    if not names:
        raise XaiCompressError("quantization-aware sharing: the checkpoint has no shared "
                               "layers")
    lam = next((float(h["lambda"]) for h in reversed(out.history)
                if h.get("stage") == "share" and "lambda" in h), None)
    if lam is None:
        raise XaiCompressError("quantization-aware sharing starts from entropy-constrained "
                               "sharing (assignment entropy); this checkpoint has none")
    modules = dict(out.model.named_modules())
    layers: dict[str, LatentShared] = {}
    rates = {}
    with torch.no_grad():
        for name in names:
            w = modules[name].weight
            rel = relevance[name].to(w.device).float()
            rates[name] = lr if lr is not None else centroid_lr(latents[name], rel > 0,
                                                                latent_scale)
            w.copy_(latents[name].to(w.device) * (rel > 0))
            layers[name] = LatentShared(out.state.layers[name], rel, lam).to(w.device)
            parametrize.register_parametrization(modules[name], "weight", layers[name])
    run = _QatRun(out, layers, reassign, val, clip, augment, runtime().amp, loss, select_by)
    seed_everything(seed)
    steps = len(make_loader(train_set, batch_size, shuffle=True, seed=seed))
    periods = periods_of(epochs, steps, reassigns)
    try:
        run.train(_batches(train_set, batch_size, seed), periods, rates,
                  lr if lr is not None else other_lr)
    finally:
        for name in names:
            parametrize.remove_parametrizations(modules[name], "weight",
                                                leave_parametrized=False)
            modules[name].weight.requires_grad_(True)
    assert run.best is not None
    _, kept_step, encs, others, acc = run.best
    out.model.load_state_dict(others, strict=False)
    for name, enc in encs.items():
        out.state.layers[name].mask = enc.mask
        out.state.layers[name].weights = enc.weights
    out.state.apply(out.model)
    out.model.eval()
    out.history.append({"stage": "finetune_qat", "epochs": epochs, "seed": seed, "lr": lr,
                        "reassigns_per_epoch": reassigns, "latent_lr": rates,
                        "other_lr": other_lr, "distill": distill,
                        "batch_size": batch_size, "periods": periods, "log": run.log,
                        "kept_step": kept_step,
                        "kept_val_accuracy": acc, "select_by": select_by})
    return out
