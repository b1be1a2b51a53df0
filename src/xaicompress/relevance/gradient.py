"""Gradient-based classic criteria: taylor (Molchanov et al. 2017), gradxact, activation.

They hook the caller's model directly, with no tracing, so they work on every model
PyTorch can run, including those torch.fx cannot trace and those without a DeepLIFT rule.
A module called twice adds both calls' contributions. The "unit" is the Conv2d/Linear
output, as for DeepLIFT, so the criteria are comparable unit for unit (`activation` reads
the unit after its BatchNorm/activation, see `ActivationCriterion`).
"""

from __future__ import annotations

from collections.abc import Callable
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
from xaicompress.relevance.canonical import trace
from xaicompress.relevance.kernels import unit_contributions, weight_contributions
from xaicompress.relevance.registry import register_criterion
from xaicompress.relevance.rules import ELEMENTWISE

#: callback(name, layer, x, z, g): layer input, output and the gradient at the output
GradCallback = Callable[[str, nn.Module, Tensor, Tensor, Tensor], None]


def _gradient_hook(name: str, cb: GradCallback) -> Callable[..., None]:
    """Forward hook handing (x, z, dT/dz) to `cb` during backward. The input batch does not
    require a gradient, so a layer fed straight by it returns its output as a new leaf:
    the backward pass ends there (no input gradient of the first layer is computed)."""
    def hook(layer: nn.Module, inputs: tuple[Any, ...], z: Any) -> Tensor | None:
        if not (isinstance(z, Tensor) and z.is_floating_point() and torch.is_grad_enabled()):
            return None  # (also the no-grad recomputation below)
        leaf = not z.requires_grad
        if leaf:  # a copy, not the leaf itself: an in-place ReLU may follow
            z = z.detach().requires_grad_(True).clone()
        x, zd = inputs[0].detach(), z.detach()
        vx, vz = x._version, zd._version

        def on_grad(g: Tensor) -> None:
            zz = zd
            if x._version != vx:
                raise XaiCompressError(f"layer {name!r}: its input was changed in place after "
                                       "the layer read it; its contributions cannot be read")
            if zd._version != vz:  # an in-place op (ReLU(inplace=True)) overwrote the output
                with torch.no_grad():
                    zz = layer(x)
            cb(name, layer, x, zz, g)

        z.register_hook(on_grad)
        return z if leaf else None

    return hook


@dataclass
class _GradRun:
    model: nn.Module
    layers: dict[str, nn.Module]
    need: frozenset[str]
    dtype: Any
    flags: list[tuple[nn.Parameter, bool]] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)


def _model_dtype(model: nn.Module) -> Any:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def summed_loss(logits: Tensor, y: Tensor) -> Tensor:
    """The loss criteria differentiate: cross-entropy summed over the batch (so the sums
    over batches are sums over samples)."""
    return F.cross_entropy(logits, y.long(), reduction="sum")


class GradientCriterion(AccumulatingCriterion):
    """One forward + backward per batch of `objective(logits, y)` (a scalar); hooks on
    every Conv2d/Linear call `on_layer` with the layer's input x, output z and dT/dz.
    Parameter gradients are not computed."""

    def objective(self, logits: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def on_layer(self, run: _GradRun, sums: Sums, name: str, layer: nn.Module, x: Tensor,
                 z: Tensor, g: Tensor) -> None:
        raise NotImplementedError

    def setup(self, model: nn.Module, loader: DataLoader, sums: Sums,
              need: frozenset[str]) -> _GradRun:
        layers = super().setup(model, loader, sums, need)
        run = _GradRun(model, layers, need, _model_dtype(model))
        run.flags = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in run.flags:
            p.requires_grad_(False)

        def cb(name: str, layer: nn.Module, x: Tensor, z: Tensor, g: Tensor) -> None:
            self.on_layer(run, sums, name, layer, x, z, g)

        for name, layer in layers.items():
            run.handles.append(layer.register_forward_hook(_gradient_hook(name, cb)))
        return run

    def accumulate(self, run: _GradRun, x: Tensor, y: Tensor, sums: Sums) -> None:
        x = x.to(run.dtype)
        with torch.enable_grad():
            self.objective(run.model(x), y).backward()

    def teardown(self, run: _GradRun) -> None:
        for h in run.handles:
            h.remove()
        for p, f in run.flags:
            p.requires_grad_(f)


def _target_objective(target: str | int, logits: Tensor, y: Tensor) -> Tensor:
    t = opt.rows_target(target, y, 1)
    if isinstance(t, str):
        if t == "all":
            return logits.sum()
        t = logits.detach().argmax(1)
    t = torch.as_tensor(t, device=logits.device).long().view(-1, 1)
    if (t >= logits.shape[1]).any():
        raise XaiCompressError(f"target: class indices must be in [0, {logits.shape[1]})")
    return logits.gather(1, t).sum()


@register_criterion("taylor")
class Taylor(GradientCriterion):
    """First-order Taylor expansion of the loss (Molchanov et al. 2017).

    Unit: mean over samples of |mean over positions of z * dL/dz| (L = cross-entropy of the
    sample). Weight: |w * dL/dw| with dL/dw the gradient of the mean loss.
    """

    def objective(self, logits: Tensor, y: Tensor) -> Tensor:
        return summed_loss(logits, y)

    def on_layer(self, run: _GradRun, sums: Sums, name: str, layer: nn.Module, x: Tensor,
                 z: Tensor, g: Tensor) -> None:
        if UNITS in run.need:
            c = unit_contributions(layer, z, g)
            positions = z[0].numel() // z.shape[1] if isinstance(layer, nn.Conv2d) else 1
            sums.add(f"{UNITS}/{name}", (c / positions).abs().sum(0))
        if WEIGHTS in run.need:
            sums.add(f"{WEIGHTS}/{name}", weight_contributions(layer, x, g, absolute=False))

    def finish(self, run: _GradRun, sums: Sums, need: frozenset[str]) -> Relevance:
        rel = super().finish(run, sums, need)
        # units: mean of |.| per sample; weights: |mean gradient * w|, so abs after the mean
        rel.weights = {k: v.abs() for k, v in rel.weights.items()}
        rel.meta["objective"] = "cross-entropy"
        return rel


@register_criterion("gradxact")
class GradXAct(GradientCriterion):
    """Gradient x activation of the target logit, aggregated like DeepLIFT: DeepLIFT's
    formulas with the ordinary gradient as multiplier and a zero reference for every layer.

    Options: target = true | pred | all | class index; aggregate = abs | signed.
    """

    def __init__(self, target: Any = "true", aggregate: str = "abs") -> None:
        super().__init__(target=target, aggregate=aggregate)
        self.target = opt.parse_target(target)
        self.aggregate = opt.parse_aggregate(aggregate)

    def objective(self, logits: Tensor, y: Tensor) -> Tensor:
        return _target_objective(self.target, logits, y)

    def on_layer(self, run: _GradRun, sums: Sums, name: str, layer: nn.Module, x: Tensor,
                 z: Tensor, g: Tensor) -> None:
        absolute = self.aggregate == "abs"
        if UNITS in run.need:
            c = unit_contributions(layer, z, g)
            sums.add(f"{UNITS}/{name}", (c.abs() if absolute else c).sum(0))
        if WEIGHTS in run.need:
            sums.add(f"{WEIGHTS}/{name}", weight_contributions(layer, x, g, absolute=absolute))

    def finish(self, run: _GradRun, sums: Sums, need: frozenset[str]) -> Relevance:
        rel = super().finish(run, sums, need)
        rel.meta.update(target=self.target, aggregate=self.aggregate)
        return rel


@dataclass
class _ActRun:
    model: nn.Module
    layers: dict[str, nn.Module]
    points: dict[str, str]
    dtype: Any
    handles: list[Any] = field(default_factory=list)


@register_criterion("activation")
class ActivationCriterion(AccumulatingCriterion):
    """Mean absolute activation of each unit (over samples and positions), read after the
    unit's own BatchNorm and activation when the model traces (else the layer output).

    Weight: |w_ij| times the RMS of its input x_j over samples and positions (the
    activation-aware magnitude of Wanda, Sun et al. 2023).
    """

    def setup(self, model: nn.Module, loader: DataLoader, sums: Sums,
              need: frozenset[str]) -> _ActRun:
        layers = super().setup(model, loader, sums, need)
        run = _ActRun(model, layers, activation_points(model), _model_dtype(model))
        modules = dict(model.named_modules())
        for name, layer in layers.items():
            if UNITS in need:
                point = modules.get(run.points.get(name, name), layer)
                run.handles.append(point.register_forward_hook(_unit_hook(name, layer, sums)))
            if WEIGHTS in need:
                run.handles.append(layer.register_forward_hook(_input_hook(name, sums)))
        return run

    def accumulate(self, run: _ActRun, x: Tensor, y: Tensor, sums: Sums) -> None:
        with torch.no_grad():
            run.model(x.to(run.dtype))

    def teardown(self, run: _ActRun) -> None:
        for h in run.handles:
            h.remove()

    def finish(self, run: _ActRun, sums: Sums, need: frozenset[str]) -> Relevance:
        rel = super().finish(run, sums, need)
        rel.weights = {k: v.sqrt() * run.layers[k].weight.detach().abs() for k, v in
                       rel.weights.items()}
        rel.meta["points"] = run.points
        return rel


def _unit_hook(name: str, layer: nn.Module, sums: Sums) -> Callable[..., None]:
    def hook(mod: nn.Module, inputs: tuple[Any, ...], a: Tensor) -> None:
        a = a.detach().abs()
        if a.dim() > 2 and isinstance(layer, nn.Conv2d):
            per = a.flatten(2).mean(2)
        else:
            per = a if a.dim() == 2 else a.flatten(1, -2).mean(1)
        sums.add(f"{UNITS}/{name}", per.sum(0))

    return hook


def _input_hook(name: str, sums: Sums) -> Callable[..., None]:
    def hook(layer: nn.Module, inputs: tuple[Any, ...], z: Tensor) -> None:
        x = inputs[0].detach()
        w = layer.weight
        if isinstance(layer, nn.Conv2d):
            ms = (x ** 2).flatten(2).mean(2).sum(0)  # (Cin,) summed over samples
            per_group = ms.view(layer.groups, 1, -1).expand(
                -1, w.shape[0] // layer.groups, -1).reshape(w.shape[0], -1)
            sums.add(f"{WEIGHTS}/{name}", per_group[..., None, None].expand(w.shape))
        else:
            ms = (x ** 2).reshape(len(x), -1, x.shape[-1]).mean(1).sum(0)  # (in,)
            sums.add(f"{WEIGHTS}/{name}", ms.unsqueeze(0).expand(w.shape))

    return hook


def activation_points(model: nn.Module) -> dict[str, str]:
    """Conv2d/Linear name -> name of the module whose output is that layer's activation:
    follow single-consumer BatchNorm/Dropout/Identity modules up to and including the first
    elementwise nonlinearity. Empty when the model does not trace with torch.fx."""
    try:
        gm, _ = trace(model)
    except XaiCompressError:
        return {}
    mods = dict(gm.named_modules(remove_duplicate=False))
    through = (nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout, nn.Dropout2d, nn.Identity)
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target),
                                                      (nn.Conv2d, nn.Linear)):
            continue
        cur = node
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            m = mods.get(nxt.target) if nxt.op == "call_module" else None
            if not isinstance(m, (*through, *ELEMENTWISE)):
                break
            cur = nxt
            if isinstance(m, ELEMENTWISE):
                break
        out.setdefault(node.target, cur.target)
    return out


__all__ = ["ActivationCriterion", "GradXAct", "GradientCriterion", "Taylor",
           "activation_points", "prunable_layers"]
