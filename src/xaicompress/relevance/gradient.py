"""Gradient-based classic criteria: taylor (Molchanov et al. 2017), gradxact, activation.

They hook the caller's model directly (no canonicalisation: plain gradients are right for
any model). A module called twice simply adds both calls' contributions. The "unit" is the
Conv2d/Linear output, as for DeepLIFT, so the criteria are comparable unit for unit
(`activation` reads the unit after its BatchNorm/activation, see `ActivationCriterion`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xaicompress.errors import XaiCompressError
from xaicompress.progress import track
from xaicompress.relevance.base import Criterion, Relevance, prunable_layers, register_criterion
from xaicompress.relevance.canonical import ELEMENTWISE, trace
from xaicompress.relevance.deeplift import (
    parse_aggregate,
    parse_target,
    rows_target,
    unit_contributions,
    weight_contributions,
)
from xaicompress.relevance.distributed import all_reduce_sums

#: callback(name, layer, x, z, g): layer input, output and the gradient at the output
GradCallback = Callable[[str, nn.Module, Tensor, Tensor, Tensor], None]


class _Probe:
    """Forward hooks on every Conv2d/Linear that hand (x, z, dT/dz) to a callback during
    backward; removed on exit."""

    def __init__(self, model: nn.Module, on_layer: GradCallback) -> None:
        self.handles = []
        for name, layer in prunable_layers(model).items():
            self.handles.append(layer.register_forward_hook(self._hook(name, on_layer)))

    @staticmethod
    def _hook(name: str, cb: GradCallback) -> Callable[..., None]:
        def hook(layer: nn.Module, inputs: tuple[Tensor, ...], z: Tensor) -> None:
            if z.requires_grad:
                x, zd = inputs[0].detach(), z.detach()
                z.register_hook(lambda g: cb(name, layer, x, zd, g))

        return hook

    def __enter__(self) -> _Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


def _run(model: nn.Module, loader: Any, on_layer: GradCallback, objective: Callable[
        [Tensor, Tensor], Tensor], label: str) -> int:
    """One forward + backward per batch of `objective(logits, y)` (a scalar); returns the
    number of samples seen. Parameter gradients are not computed."""
    if loader is None:
        raise XaiCompressError(f"{label}: needs data (a loader of (x, y) batches)")
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    n = 0
    try:
        with _Probe(model, on_layer), torch.enable_grad():
            for batch in track(loader, f"{label} relevance"):
                x, y = batch[0].float().requires_grad_(True), batch[1]
                objective(model(x), y).backward()
                n += len(x)
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
    if n == 0:
        raise XaiCompressError(f"{label}: the data loader gave no samples")
    return n


def _finish(name: str, layers: dict[str, nn.Module], sums: dict[str, Tensor], n: int,
            meta: dict[str, Any], post: Callable[[Tensor], Tensor] = lambda t: t) -> Relevance:
    count = torch.tensor([float(n)], dtype=torch.float64)
    all_reduce_sums({**sums, "__n": count})
    total = float(count)
    units = {k: post(sums[f"u/{k}"] / total).float() for k in layers}
    weights = {k: post(sums[f"w/{k}"] / total).float() for k in layers}
    return Relevance(name, units, weights, {"criterion": name, "samples": int(total), **meta})


def _zero_sums(layers: dict[str, nn.Module]) -> dict[str, Tensor]:
    sums = {}
    for k, m in layers.items():
        sums[f"u/{k}"] = torch.zeros(m.weight.shape[0], dtype=torch.float64)
        sums[f"w/{k}"] = torch.zeros(m.weight.shape, dtype=torch.float64)
    return sums


def _target_objective(target: str | int) -> Callable[[Tensor, Tensor], Tensor]:
    def objective(logits: Tensor, y: Tensor) -> Tensor:
        t = rows_target(target, y, 1)
        if t == "all":
            return logits.sum()
        if t == "pred":
            t = logits.detach().argmax(1)
        return logits.gather(1, torch.as_tensor(t).long().view(-1, 1)).sum()

    return objective


@register_criterion("taylor")
class Taylor(Criterion):
    """First-order Taylor expansion of the loss (Molchanov et al. 2017).

    Unit: mean over samples of |mean over positions of z * dL/dz| (L = cross-entropy of the
    sample). Weight: |w * dL/dw| with dL/dw the gradient of the mean loss.
    """

    def score(self, model: nn.Module, loader: Any) -> Relevance:
        layers = prunable_layers(model)
        sums = _zero_sums(layers)

        def on_layer(name: str, layer: nn.Module, x: Tensor, z: Tensor, g: Tensor) -> None:
            c = unit_contributions(layer, z, torch.zeros((), dtype=z.dtype), g)
            positions = z[0].numel() // z.shape[1] if isinstance(layer, nn.Conv2d) else 1
            sums[f"u/{name}"] += (c / positions).abs().sum(0).double()
            sums[f"w/{name}"] += weight_contributions(layer, x, g, absolute=False).double()

        n = _run(model, loader, on_layer,
                 lambda logits, y: F.cross_entropy(logits, y.long(), reduction="sum"), "taylor")
        # units: mean of |.| per sample; weights: |mean gradient * w|, so abs after the mean
        rel = _finish(self.name, layers, sums, n, {"objective": "cross-entropy"})
        rel.weights = {k: v.abs() for k, v in rel.weights.items()}
        return rel


@register_criterion("gradxact")
class GradXAct(Criterion):
    """Gradient x activation of the target logit, aggregated like DeepLIFT: DeepLIFT's
    formulas with the ordinary gradient as multiplier and a zero reference for every layer.

    Options: target = true | pred | all | class index; aggregate = abs | signed.
    """

    def __init__(self, target: Any = "true", aggregate: str = "abs") -> None:
        super().__init__(target=target, aggregate=aggregate)
        self.target = parse_target(target)
        self.aggregate = parse_aggregate(aggregate)

    def score(self, model: nn.Module, loader: Any) -> Relevance:
        layers = prunable_layers(model)
        sums = _zero_sums(layers)
        absolute = self.aggregate == "abs"

        def on_layer(name: str, layer: nn.Module, x: Tensor, z: Tensor, g: Tensor) -> None:
            c = unit_contributions(layer, z, torch.zeros((), dtype=z.dtype), g)
            sums[f"u/{name}"] += (c.abs() if absolute else c).sum(0).double()
            sums[f"w/{name}"] += weight_contributions(layer, x, g, absolute=absolute).double()

        n = _run(model, loader, on_layer, _target_objective(self.target), "gradxact")
        return _finish(self.name, layers, sums, n,
                       {"target": self.target, "aggregate": self.aggregate})


@register_criterion("activation")
class ActivationCriterion(Criterion):
    """Mean absolute activation of each unit (over samples and positions), read after the
    unit's own BatchNorm and activation when the model traces (else the layer output).

    Weight: |w_ij| times the RMS of its input x_j over samples and positions (the
    activation-aware magnitude of Wanda, Sun et al. 2023).
    """

    def score(self, model: nn.Module, loader: Any) -> Relevance:
        if loader is None:
            raise XaiCompressError("activation: needs data (a loader of (x, y) batches)")
        layers = prunable_layers(model)
        points = activation_points(model)
        modules = dict(model.named_modules())
        sums = _zero_sums(layers)
        handles = []

        def unit_hook(name: str) -> Callable[..., None]:
            def hook(mod: nn.Module, inputs: tuple[Tensor, ...], a: Tensor) -> None:
                a = a.detach().abs()
                per = a.flatten(2).mean(2) if a.dim() > 2 and isinstance(
                    layers[name], nn.Conv2d) else (a if a.dim() == 2 else a.flatten(1, -2).mean(1))
                sums[f"u/{name}"] += per.sum(0).double()

            return hook

        def input_hook(name: str) -> Callable[..., None]:
            def hook(layer: nn.Module, inputs: tuple[Tensor, ...], z: Tensor) -> None:
                x = inputs[0].detach()
                w = layer.weight
                if isinstance(layer, nn.Conv2d):
                    ms = (x ** 2).flatten(2).mean(2).sum(0)  # (Cin,) summed over samples
                    per_group = ms.view(layer.groups, 1, -1).expand(
                        -1, w.shape[0] // layer.groups, -1).reshape(w.shape[0], -1)
                    sums[f"w/{name}"] += per_group.double()[..., None, None].expand(w.shape)
                else:
                    ms = (x ** 2).reshape(len(x), -1, x.shape[-1]).mean(1).sum(0)  # (in,)
                    sums[f"w/{name}"] += ms.double().unsqueeze(0).expand(w.shape)

            return hook

        for name, layer in layers.items():
            point = modules.get(points.get(name, name), layer)
            handles.append(point.register_forward_hook(unit_hook(name)))
            handles.append(layer.register_forward_hook(input_hook(name)))
        n = 0
        try:
            with torch.no_grad():
                for batch in track(loader, "activation relevance"):
                    model(batch[0].float())
                    n += len(batch[0])
        finally:
            for h in handles:
                h.remove()
        if n == 0:
            raise XaiCompressError("activation: the data loader gave no samples")
        rel = _finish(self.name, layers, sums, n, {"points": points})
        rel.weights = {k: v.sqrt() * layers[k].weight.detach().abs() for k, v in
                       rel.weights.items()}
        return rel


def activation_points(model: nn.Module) -> dict[str, str]:
    """Conv2d/Linear name -> name of the module whose output is that layer's activation:
    follow single-consumer BatchNorm/Dropout/Identity modules up to and including the first
    elementwise nonlinearity. Empty when the model does not trace with torch.fx."""
    try:
        gm = trace(model)
    except XaiCompressError:
        return {}
    mods = dict(gm.named_modules())
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
