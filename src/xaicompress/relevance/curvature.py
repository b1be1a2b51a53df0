"""Second-order criteria, the peers users would pick for mixed precision: the Hessian
(Hutchinson's estimator, as HAWQ-V3 uses) and the empirical Fisher information.

Both estimate the curvature h_w of the cross-entropy loss in the direction of each weight
and report, per weight, one of:

- `score=saliency` (default): ½ h_w w², the second-order loss increase when the weight is
  removed (Optimal Brain Damage, LeCun et al. 1990): what pruning and sharing rank by;
- `score=curvature`: h_w itself, what HAWQ weighs the quantization error with: the bit
  allocation minimises Σ_w R_w (w − Q_b(w))², so with R_w = Tr(H_l)/n_l (`per=layer`) it
  solves HAWQ-V3's objective exactly.

`per=layer` (default for the Hessian, HAWQ-V3) gives every weight of a layer the layer's
mean diagonal Tr(H_l) / n_l, robust to the noise of few probes; `per=weight` keeps the
per-weight diagonal estimate. A unit's score is the sum of its weights' saliencies (pruning
a unit removes them all); for the Fisher it is Theis et al.'s (2018) Fisher pruning signal
½ E_n[(Σ_positions z ∂ℓ_n/∂z)²] of its output z.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from xaicompress.errors import XaiCompressError
from xaicompress.relevance import options as opt
from xaicompress.relevance.base import (
    UNITS,
    WEIGHTS,
    AccumulatingCriterion,
    Relevance,
    Sums,
    prunable_layers,
)
from xaicompress.relevance.gradient import GradientCriterion, _GradRun, summed_loss
from xaicompress.relevance.kernels import conv_input, unit_contributions
from xaicompress.relevance.registry import register_criterion

SCORES = ("saliency", "curvature")
PER = ("layer", "weight")
#: per-sample weight gradients held at once (elements), as the relevance kernels' budget
_BUDGET = 1 << 24


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    v = str(value).strip().lower()
    if v not in allowed:
        raise XaiCompressError(f"{name}={value!r}: expected one of {', '.join(allowed)}")
    return v


def _finish(weights: dict[str, Tensor], curv: dict[str, Tensor], score: str, per: str
            ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(units, weights) from the curvature estimates: see the module docstring."""
    units, out = {}, {}
    for name, h in curv.items():
        h = h.float().clamp(min=0)
        if per == "layer":
            h = torch.full_like(h, float(h.mean()))
        w = weights[name].detach().float()
        sal = 0.5 * h * w ** 2
        units[name] = sal.reshape(sal.shape[0], -1).sum(1)
        out[name] = sal if score == "saliency" else h
    return units, out


@dataclass
class _HessRun:
    model: nn.Module
    layers: dict[str, nn.Module]
    generator: torch.Generator
    flags: list[tuple[nn.Parameter, bool]] = field(default_factory=list)


@register_criterion("hessian")
class HessianTrace(AccumulatingCriterion):
    """Hutchinson's estimator of the loss Hessian's diagonal: diag(H) ≈ E_z[z ⊙ Hz] with
    Rademacher z (Bekas et al. 2007; HAWQ-V3 uses its trace per layer), one Hessian-vector
    product per probe and batch (double backward through the mean cross-entropy).

    Options: probes (per batch, default 1), score = saliency | curvature, per = layer |
    weight, seed (the probe vectors).
    """

    seeded = True

    def __init__(self, probes: int = 1, score: str = "saliency", per: str = "layer",
                 seed: int = 0) -> None:
        super().__init__(probes=probes, score=score, per=per, seed=seed)
        if isinstance(probes, bool) or not isinstance(probes, int) or not 1 <= probes <= 64:
            raise XaiCompressError(f"probes={probes!r}: expected an integer from 1 to 64")
        self.probes = probes
        self.score_kind = _choice("score", score, SCORES)
        self.per = _choice("per", per, PER)
        self.seed = opt.seed(seed)

    def setup(self, model: nn.Module, loader: DataLoader, sums: Sums,
              need: frozenset[str]) -> _HessRun:
        layers = prunable_layers(model)
        for name, m in layers.items():
            sums.zeros(f"diag/{name}", m.weight.shape)
        run = _HessRun(model, layers, torch.Generator().manual_seed(self.seed))
        run.flags = [(p, p.requires_grad) for p in model.parameters()]
        mine = {id(m.weight) for m in layers.values()}
        for p, _ in run.flags:
            p.requires_grad_(id(p) in mine)
        return run

    def accumulate(self, run: _HessRun, x: Tensor, y: Tensor, sums: Sums) -> None:
        weights = [m.weight for m in run.layers.values()]
        with torch.enable_grad():
            loss = F.cross_entropy(run.model(x), y.long())
            grads = torch.autograd.grad(loss, weights, create_graph=True)
            for k in range(self.probes):
                zs = [torch.randint(0, 2, w.shape, generator=run.generator).to(w.dtype) * 2 - 1
                      for w in weights]
                hvs = torch.autograd.grad(grads, weights, grad_outputs=zs,
                                          retain_graph=k < self.probes - 1)
                for name, z, hv in zip(run.layers, zs, hvs, strict=True):
                    # the mean loss's Hessian, weighted by the batch so the total is a mean
                    sums.add(f"diag/{name}", (z * hv).detach() * (len(x) / self.probes))

    def teardown(self, run: _HessRun) -> None:
        for p, f in run.flags:
            p.requires_grad_(f)

    def finish(self, run: _HessRun, sums: Sums, need: frozenset[str]) -> Relevance:
        curv = sums.layer_means("diag")
        units, weights = _finish({n: m.weight for n, m in run.layers.items()}, curv,
                                 self.score_kind, self.per)
        return Relevance(self.name, units if UNITS in need else {},
                         weights if WEIGHTS in need else {},
                         {"criterion": self.name, "probes": self.probes,
                          "score": self.score_kind, "per": self.per,
                          "trace": {n: float(h.sum()) for n, h in curv.items()}})


def per_sample_square_sum(layer: nn.Module, x: Tensor, g: Tensor) -> Tensor:
    """Σ_n (∂ℓ_n/∂W)² for a Conv2d / Linear layer from its input x (B, ...) and the
    gradient g (B, ...) of the per-sample losses at its output, shaped like the weight."""
    w = layer.weight
    b = x.shape[0]
    if isinstance(layer, nn.Linear):
        if x.dim() == 2:
            return (g ** 2).t() @ (x ** 2)
        xs, gs = x.reshape(b, -1, x.shape[-1]), g.reshape(b, -1, g.shape[-1])
        out = torch.zeros_like(w, dtype=g.dtype)
        step = max(1, _BUDGET // w.numel())
        for i in range(0, b, step):
            out += torch.einsum("bpo,bpi->boi", gs[i:i + step], xs[i:i + step]).pow_(2).sum(0)
        return out
    if not isinstance(layer, nn.Conv2d):
        raise XaiCompressError(f"fisher: layer type {type(layer).__name__} is not supported")
    inp, pad = conv_input(layer, x, g.shape[-2:])
    _, c, h, wd = inp.shape
    o = g.shape[1]
    out = torch.zeros_like(w, dtype=g.dtype)
    step = max(1, _BUDGET // w.numel())
    for i in range(0, b, step):
        p, gg = inp[i:i + step], g[i:i + step]
        n = len(p)
        per = torch.nn.grad.conv2d_weight(
            p.reshape(1, n * c, h, wd), (n * o, c // layer.groups, *w.shape[2:]),
            gg.reshape(1, n * o, *gg.shape[2:]), layer.stride, pad, layer.dilation,
            n * layer.groups)
        out += per.view(n, *w.shape).pow_(2).sum(0)
    return out


@register_criterion("fisher")
class Fisher(GradientCriterion):
    """Empirical Fisher information: the diagonal E_n[(∂ℓ_n/∂w)²] from per-sample gradients
    of the cross-entropy, one forward + backward per batch (parameter gradients are
    computed per sample from the layer inputs and output gradients, not by autograd).

    Options: score = saliency | curvature, per = weight | layer (default weight: the
    Fisher's diagonal is exact per weight, no probe noise).
    """

    def __init__(self, score: str = "saliency", per: str = "weight") -> None:
        super().__init__(score=score, per=per)
        self.score_kind = _choice("score", score, SCORES)
        self.per = _choice("per", per, PER)

    def setup(self, model: nn.Module, loader: DataLoader, sums: Sums,
              need: frozenset[str]) -> _GradRun:
        run = super().setup(model, loader, sums, need | {WEIGHTS})  # zeroes the sums
        run.need = need
        return run

    def objective(self, logits: Tensor, y: Tensor) -> Tensor:
        return summed_loss(logits, y)

    def on_layer(self, run: _GradRun, sums: Sums, name: str, layer: nn.Module, x: Tensor,
                 z: Tensor, g: Tensor) -> None:
        if UNITS in run.need:
            c = unit_contributions(layer, z, g)
            sums.add(f"{UNITS}/{name}", 0.5 * (c ** 2).sum(0))
        if WEIGHTS in run.need or self.per == "layer":
            sums.add(f"{WEIGHTS}/{name}", per_sample_square_sum(layer, x, g))

    def finish(self, run: _GradRun, sums: Sums, need: frozenset[str]) -> Relevance:
        fisher = sums.layer_means(WEIGHTS)
        _, weights = _finish({n: m.weight for n, m in run.layers.items()}, fisher,
                             self.score_kind, self.per)
        units = sums.layer_means(UNITS) if UNITS in need else {}
        return Relevance(self.name, units, weights if WEIGHTS in need else {},
                         {"criterion": self.name, "score": self.score_kind, "per": self.per})
