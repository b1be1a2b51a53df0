"""Post-training calibration from a few training samples: BatchNorm re-estimation, bias
correction and least-squares refits.

Both repair what a compression step does to the *statistics* of a network without
training it:

- `reestimate_batchnorm` (adaptive BatchNorm, EagleEye, Li et al. 2020): after channels are
  removed or weights rounded, the running mean / variance a BatchNorm stored describe the
  old network's activations. They are reset and re-accumulated (cumulative average, every
  batch weighted equally) from `samples` training images in inference mode for everything
  but the BatchNorms, so Dropout stays off and no weight changes.
- `correct_bias` (empirical bias correction, Nagel et al. 2019, as AIMET and NNCF apply it
  after quantization): the per-channel mean of a compressed layer's output differs from the
  float layer's; the difference, measured on the same images, is added to the layer's
  bias. Layers without a bias are left to the BatchNorm that follows them (its re-estimated
  mean absorbs the same shift).
- `reconstruct_layers` (after a channel cut, ThiNet) and `refit_masked_layers` (after
  masks, AdaPrune) refit weights by least squares so each layer reproduces the outputs it
  had before the step.

Every rank under torchrun reads the same samples (no sharded sampler), so the statistics
are identical everywhere without a collective.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from xaicompress.data import subset
from xaicompress.device import model_device
from xaicompress.errors import XaiCompressError
from xaicompress.relevance.kernels import conv_input

#: training images the calibrations read by default (the issue's post-training budget)
CALIBRATION_SAMPLES = 1024
#: images per forward pass: BatchNorm statistics average whole batches, so batches equal
_BATCH = 128


def _loader(dataset: Dataset, samples: int, seed: int) -> DataLoader:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise XaiCompressError(f"calibration samples {samples!r}: expected a positive integer")
    return DataLoader(subset(dataset, samples, seed=seed), batch_size=_BATCH, shuffle=False)


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm (1d / 2d / 3d, SyncBatchNorm) that tracks running statistics."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, dataset: Dataset, *,
                         samples: int = CALIBRATION_SAMPLES, seed: int = 0) -> int:
    """Reset and re-accumulate the running statistics of every BatchNorm of `model` (in
    place) from `samples` seeded-random items (x, y) of `dataset`. Returns the number of
    BatchNorm layers re-estimated (0: nothing to do, the model is untouched)."""
    bns = batchnorm_layers(model)
    if not bns:
        return 0
    loader = _loader(dataset, samples, seed)
    was_training = model.training
    momenta = {n: m.momentum for n, m in bns.items()}
    model.eval()
    for m in bns.values():
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
        m.train()
    try:
        for x, _y in loader:
            model(x.float())
    finally:
        for n, m in bns.items():
            m.momentum = momenta[n]
        model.train(was_training)
        for m in bns.values():
            m.train(was_training)
    return len(bns)


def _weight_error_output(layer: nn.Module, x: Tensor, delta: Tensor) -> Tensor:
    """The output the weight difference `delta` alone makes from the input `x`."""
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
            return F.conv2d(x, delta, None, layer.stride, 0, layer.dilation, layer.groups)
        return F.conv2d(x, delta, None, layer.stride, layer.padding, layer.dilation,
                        layer.groups)
    return F.linear(x, delta)


def correct_bias(model: nn.Module, reference: nn.Module, dataset: Dataset, layers: list[str],
                 *, samples: int = CALIBRATION_SAMPLES, seed: int = 0,
                 check: bool = True) -> dict[str, float]:
    """Shift the bias of each named Conv2d / Linear layer of `model` (in place) by the
    per-channel mean of (W_ref - W) x over `samples` items of `dataset`, x the layer's input
    in `model` and W_ref its weight in `reference` (the uncompressed model, same layer
    names): the expected output error the compressed weights make (Nagel et al. 2019).

    The error of each layer's own weights is measured, on the inputs the compressed
    network really gives it, in one pass for all layers (a layer's shift does not undo the
    errors of the layers before it, so shifts never add up twice). Returns layer -> mean
    absolute shift applied; layers without a bias are skipped and absent. check: undo the
    shifts (and return {}) when afterwards `model` agrees with `reference`'s predictions on
    fewer of those items than before.
    """
    modules = dict(model.named_modules())
    refs = dict(reference.named_modules())
    with_bias = [n for n in layers if isinstance(modules.get(n), (nn.Conv2d, nn.Linear))
                 and modules[n].bias is not None and n in refs
                 and refs[n].weight.shape == modules[n].weight.shape]
    if not with_bias:
        return {}
    deltas = {n: (refs[n].weight.detach() - modules[n].weight.detach()).float()
              for n in with_bias}
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def watch(name: str) -> Any:
        def hook(layer: nn.Module, args: tuple[Any, ...]) -> None:
            e = _weight_error_output(layer, args[0].detach().float(), deltas[name]).double()
            dims = [0, *range(2, e.dim())] if isinstance(layer, nn.Conv2d) else \
                list(range(e.dim() - 1))
            sums[name] = sums.get(name, 0) + e.sum(dims)
            counts[name] = counts.get(name, 0) + e.numel() // e.shape[1 if isinstance(
                layer, nn.Conv2d) else -1]
        return hook

    handles = [modules[n].register_forward_pre_hook(watch(n)) for n in with_bias]
    was_training = model.training
    model.eval()
    predicted = []  # the uncorrected model's predictions: the check's "before", for free
    try:
        with torch.no_grad():
            for x, _y in _loader(dataset, samples, seed):
                predicted.append(model(x.float()).argmax(1).cpu())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    shifts: dict[str, float] = {}
    applied: dict[str, Tensor] = {}
    if check:
        target = _predictions(reference, dataset, samples, seed)
        before = int((torch.cat(predicted) == target).sum())
    with torch.no_grad():
        for n in with_bias:
            if n in sums:
                delta = (sums[n] / max(1, counts[n])).to(modules[n].bias.dtype)
                applied[n] = modules[n].bias.detach().clone()
                modules[n].bias.add_(delta)
                shifts[n] = float(delta.abs().mean())
        # The correction assumes small, mean-like errors. Where they are not (1-bit sharing:
        # lenet5 at k = 2 fell from 74% to 51% and from 83% to 29% test with it), it moves
        # the outputs further from the float model's: undo it when the compressed model
        # agrees less often with the float model's predictions on the same images.
        if check and int((_predictions(model, dataset, samples, seed) == target).sum()) < before:
            for n, old in applied.items():
                modules[n].bias.copy_(old)
            return {}
    return shifts


def _predictions(model: nn.Module, dataset: Dataset, samples: int, seed: int) -> Tensor:
    """int64 (N,) on the CPU: `model`'s predicted class of each calibration item."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([model(x.float().to(model_device(model))).argmax(1).cpu()
                              for x, _y in _loader(dataset, samples, seed)])
    finally:
        model.train(was)


def _agreement(model: nn.Module, reference: nn.Module, dataset: Dataset, samples: int,
               seed: int) -> int:
    """On how many of the calibration items `model` predicts what `reference` does."""
    return int((_predictions(model, dataset, samples, seed) ==
                _predictions(reference, dataset, samples, seed)).sum())


#: output positions of each image a convolution's reconstruction samples, and the images
#: it reads: rows of its least-squares problem (256 x 64 = 16,384 for at most ~600 unknowns)
RECONSTRUCT_POSITIONS = 64
RECONSTRUCT_SAMPLES = 256
#: ridge of the least squares, relative to the mean diagonal of X^T X
_RIDGE = 1e-3


def _rows(layer: nn.Module, x: Tensor, g: torch.Generator) -> Tensor:
    """The rows of a layer's least squares from its input x: im2col patches at sampled
    output positions of a convolution (N * positions, Cin * kh * kw), or the inputs of a
    Linear (N, in)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    # padded as the layer pads (padding modes, "same", timm's Conv2dSame), so the patches
    # are those of the output positions `_targets` picks
    # (forward, not the call: no hooks; one image on the layer's device gives the size)
    out_hw = layer.forward(x[:1].to(layer.weight.device, layer.weight.dtype)).shape[-2:]
    x, pad = conv_input(layer, x, tuple(out_hw))
    cols = F.unfold(x, layer.kernel_size, layer.dilation, pad, layer.stride)
    n, d, p = cols.shape
    k = min(p, RECONSTRUCT_POSITIONS)
    pick = torch.randint(0, p, (n, k), generator=g)
    return cols.gather(2, pick[:, None, :].expand(n, d, k)).transpose(1, 2).reshape(-1, d)


def _targets(layer: nn.Module, y: Tensor, g: torch.Generator) -> Tensor:
    """The reference outputs at the same rows as `_rows` (same generator state)."""
    if isinstance(layer, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    n, o = y.shape[:2]
    p = y[0, 0].numel()
    k = min(p, RECONSTRUCT_POSITIONS)
    pick = torch.randint(0, p, (n, k), generator=g)
    return y.reshape(n, o, p).gather(2, pick[:, None, :].expand(n, o, k)).transpose(
        1, 2).reshape(-1, o)


class _Stop(Exception):
    """Raised by a hook once the layer being refitted has its input: the rest of the
    forward pass is not needed."""


def reconstruct_layers(model: nn.Module, reference: nn.Module, dataset: Dataset,
                       kept: dict[str, Tensor], *, samples: int = RECONSTRUCT_SAMPLES,
                       seed: int = 0) -> list[str]:
    """Refit, in place, the weights and bias of every Conv2d / Linear of `model` that lost
    input channels, by least squares on `samples` items of `dataset`: its inputs in the
    pruned network against the outputs the same layer of `reference` (the network before
    the cut) gives at the output channels it kept (`kept[name]`: their indices in
    `reference`), as ThiNet and He et al. (2017) do after channel pruning.

    Layers are refitted one after the other in definition order, each on the inputs the
    network with the earlier layers already refitted gives it (fitting all at once counts
    every earlier layer's loss twice: measured, it blew LeNet-5's logits up 4,000-fold);
    each pass stops at the layer. Grouped convolutions are left as they are. Returns the
    refitted layers.
    """
    modules, refs = dict(model.named_modules()), dict(reference.named_modules())
    todo = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))
            and n in refs and n in kept and getattr(m, "groups", 1) == 1
            and m.weight.shape[1] < refs[n].weight.shape[1]]
    return _refit_in_order(model, reference, dataset, todo, samples, seed,
                           pick=lambda n, out: out[:, kept[n]],
                           solver=lambda n: None)


def _refit_in_order(model: nn.Module, reference: nn.Module, dataset: Dataset,
                    todo: list[str], samples: int, seed: int, pick: Any,
                    solver: Any) -> list[str]:
    """The loop both refits share: one pass of `reference` records every layer's target
    outputs (`pick(name, output)`: the channels kept), then the layers of `todo` are
    refitted in order, each on the inputs the already refitted `model` gives it, solved by
    `solver(name)` (None: every weight free)."""
    if not todo:
        return []
    modules, refs = dict(model.named_modules()), dict(reference.named_modules())
    batches = [x.float() for x, _y in _loader(dataset, samples, seed)]

    def gen(i: int, j: int) -> torch.Generator:  # the same positions in both networks
        return torch.Generator().manual_seed(seed + 7919 * i + j)

    targets: dict[str, list[Tensor]] = {n: [] for n in todo}
    state = {"i": 0}
    hooks = [refs[n].register_forward_hook(
        lambda mod, _a, out, n=n, j=j: targets[n].append(
            _targets(mod, pick(n, out.detach()).cpu(), gen(state["i"], j))))
        for j, n in enumerate(todo)]
    was = (model.training, reference.training)
    model.eval()
    reference.eval()
    try:
        device = model_device(reference)
        with torch.no_grad():
            for i, x in enumerate(batches):
                state["i"] = i
                reference(x.to(device))
            for j, n in enumerate(todo):
                _refit(model, modules[n], batches, targets[n], lambda i, j=j: gen(i, j),
                       solve=solver(n))
    finally:
        for h in hooks:
            h.remove()
        model.train(was[0])
        reference.train(was[1])
    return todo


def _refit(model: nn.Module, layer: nn.Module, batches: list[Tensor], targets: list[Tensor],
           gen: Any, solve: Any = None) -> None:
    """Least squares of one layer: its inputs in `model` (one pass per batch, stopped at
    the layer) against `targets` (one per batch); `solve(layer, gram, cross)` writes the
    solution (default `_solve_into`: every weight free). A masked solve also gets
    `rows=`: the rows themselves (n, d + 1) where there are fewer of them than inputs, else
    None."""
    acc: dict[str, Tensor] = {}
    kept_rows: list[Tensor] | None = [] if solve is not None else None
    state: dict[str, Any] = {"i": 0}

    groups = getattr(layer, "groups", 1)

    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        # the least squares run on the CPU in float64, whatever the model's device
        rows = _rows(layer, args[0].detach().cpu(), gen(state["i"])).double()
        y = targets[state["i"]].double()
        if groups > 1:  # one least squares per group: (G, n, d/G + 1) against (G, n, o/G)
            rows = rows.reshape(len(rows), groups, -1).transpose(0, 1)
            rows = torch.cat([rows, rows.new_ones(groups, rows.shape[1], 1)], 2)
            y = y.reshape(len(y), groups, -1).transpose(0, 1)
            gram, cross = rows.transpose(1, 2) @ rows, rows.transpose(1, 2) @ y
        else:
            rows = torch.cat([rows, rows.new_ones(len(rows), 1)], 1)
            gram, cross = rows.t() @ rows, rows.t() @ y
            if kept_rows is not None and not state.get("many"):  # while fewer than inputs
                kept_rows.append(rows)
                if sum(len(r) for r in kept_rows) >= rows.shape[1]:
                    kept_rows.clear()
                    state["many"] = True
        acc["gram"] = acc.get("gram", 0) + gram
        acc["cross"] = acc.get("cross", 0) + cross
        raise _Stop

    h = layer.register_forward_pre_hook(hook)
    device = model_device(model)
    try:
        for i, x in enumerate(batches):
            state["i"] = i
            try:
                model(x.to(device))
            except _Stop:
                pass
    finally:
        h.remove()
    if "gram" not in acc:
        return
    if solve is None:
        _solve_into(layer, acc["gram"], acc["cross"])
    else:
        few = groups == 1 and not state.get("many") and bool(kept_rows)
        solve(layer, acc["gram"], acc["cross"], rows=torch.cat(kept_rows) if few else None)


def _solve_into(layer: nn.Module, gram: Tensor, cross: Tensor) -> None:
    d = gram.shape[0]
    ridge = _RIDGE * float(gram.diagonal().mean()) + 1e-12
    sol = torch.linalg.solve(gram + ridge * torch.eye(d, dtype=gram.dtype), cross)  # (d, o)
    w, b = sol[:-1].t(), sol[-1]
    with torch.no_grad():
        layer.weight.copy_(w.reshape(layer.weight.shape).to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(b.to(layer.bias.dtype))
        else:  # no bias to hold the intercept: refit without it
            sol = torch.linalg.solve(gram[:-1, :-1] + ridge * torch.eye(
                d - 1, dtype=gram.dtype), cross[:-1])
            layer.weight.copy_(sol.t().reshape(layer.weight.shape).to(layer.weight.dtype))


def refit_masked_layers(model: nn.Module, reference: nn.Module, dataset: Dataset,
                        masks: dict[str, Tensor], *, samples: int = RECONSTRUCT_SAMPLES,
                        seed: int = 0) -> list[str]:
    """Refit, in place, the kept weights (and bias) of every masked Conv2d / Linear of
    `model` by least squares on `samples` items of `dataset`, so that each layer's outputs
    on its inputs in the pruned network match the same layer of `reference` (the network
    before the masks) on the reference's inputs; the removed weights stay exactly zero
    (`masks[name]`: bool, weight shape, True = kept). Every output unit is its own least
    squares over its kept inputs (AdaPrune, Hubara et al. 2021; the row-wise form of
    SparseGPT's reconstruction without its approximate updates).

    Layers are refitted one after the other in definition order, each on the inputs the
    already refitted network gives it, as `reconstruct_layers` does. A grouped convolution
    (MobileNet's depthwise ones) is one least squares per group. Returns the refitted
    layers.
    """
    refs = dict(reference.named_modules())
    todo = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
            and n in refs and n in masks and not bool(masks[n].all())]

    def solver(n: str) -> Any:
        keep = masks[n].reshape(masks[n].shape[0], -1).cpu()
        return lambda layer, gram, cross, rows: _solve_masked_into(layer, gram, cross, keep,
                                                                   rows=rows)

    return _refit_in_order(model, reference, dataset, todo, samples, seed,
                           pick=lambda _n, out: out, solver=solver)


#: a masked refit solves exactly (one Cholesky per output unit, (kept inputs)^3 / 3 flops
#: each) up to this many flops per layer, about 10 s on one core; above it (vgg11's
#: 4,608-input layers at 0.7: ~1.4e12, 2-8 min a cut) conjugate gradients
EXACT_FLOPS = 1e11
#: conjugate-gradient steps of a wide layer's refit (each one (units x d) @ (d x d) product,
#: or two products with the rows where they are fewer than half the inputs)
CG_STEPS = 40


def _solve_masked_cg(layer: nn.Module, gram: Tensor, cross: Tensor, keep: Tensor,
                     steps: int | None = None, rows: Tensor | None = None) -> None:
    """The masked least squares of a wide layer by Jacobi-preconditioned conjugate
    gradients, all output units at once (one matrix product per step), started from the
    layer's current weights: every step lowers each unit's squared error, so a cut step
    count never leaves a layer worse than the plain cut. rows (n, d + 1), the rows `gram`
    sums, where n < d / 2: each step multiplies by them instead of the Gram matrix, 4 n d
    flops per unit instead of 2 d^2 (resnet18's 4,608-input layers at 32 x 32 inputs have
    one row an image)."""
    has_bias = layer.bias is not None
    d = gram.shape[0] if has_bias else gram.shape[0] - 1
    ridge = _RIDGE * float(gram[:d, :d].diagonal().mean()) + 1e-12
    if rows is not None and 2 * len(rows) < d:
        x = rows[:, :d].contiguous()

        def times_h(p: Tensor) -> Tensor:  # p (X^T X + ridge I) without forming X^T X
            return torch.addmm(p, p @ x.t(), x, beta=ridge)

        diag = gram[:d, :d].diagonal() + ridge
    else:
        h = gram[:d, :d].clone()
        h.diagonal().add_(ridge)
        diag = h.diagonal().clone()

        def times_h(p: Tensor) -> Tensor:
            return p @ h
    m = torch.ones(keep.shape[0], d, dtype=gram.dtype)
    m[:, :keep.shape[1]] = keep
    w = layer.weight.detach().reshape(keep.shape[0], -1).cpu().double()
    if has_bias:
        w = torch.cat([w, layer.bias.detach().cpu().double()[:, None]], 1)
    w = w * m
    r = (cross[:d].t() - times_h(w)) * m
    z = r / diag
    p, rz = z.clone(), (r * z).sum(1)
    start = rz.clone()
    for _ in range(CG_STEPS if steps is None else steps):
        q = times_h(p).mul_(m)
        pq = torch.linalg.vecdot(p, q)
        alpha = torch.where(pq > 0, rz / pq.clamp(min=1e-300), torch.zeros_like(pq))[:, None]
        w.addcmul_(alpha, p)  # in place: these are (units, d) arrays, memory-bound
        r.addcmul_(alpha, q, value=-1)
        torch.div(r, diag, out=z)
        rz_new = torch.linalg.vecdot(r, z)
        if bool((rz_new <= 1e-12 * start).all()):
            break
        beta = torch.where(rz > 0, rz_new / rz.clamp(min=1e-300), torch.zeros_like(rz))
        p.mul_(beta[:, None]).add_(z)
        rz = rz_new
    with torch.no_grad():
        layer.weight.copy_(w[:, :keep.shape[1]].reshape(layer.weight.shape)
                           .to(layer.weight.dtype))
        if has_bias:
            layer.bias.copy_(w[:, -1].to(layer.bias.dtype))


def _solve_masked_into(layer: nn.Module, gram: Tensor, cross: Tensor, keep: Tensor,
                       rows: Tensor | None = None) -> None:
    """One ridge least squares per output unit over its kept inputs (+ the intercept where
    the layer has a bias); the other weights are written as 0. A grouped layer's `gram` /
    `cross` are per group, (G, d/G + 1, d/G + 1) / (G, d/G + 1, o/G)."""
    if gram.dim() == 2 and float((keep.sum(1).double() ** 3).sum()) / 3 > EXACT_FLOPS:
        return _solve_masked_cg(layer, gram, cross, keep, rows=rows)
    if gram.dim() == 2:
        gram, cross = gram[None], cross[None]
    d = gram.shape[1] - 1
    per_group = keep.shape[0] // gram.shape[0]
    ridge = _RIDGE * gram[:, :d, :d].diagonal(dim1=1, dim2=2).mean(1) + 1e-12  # per group
    has_bias = layer.bias is not None
    w = torch.zeros(keep.shape, dtype=gram.dtype)
    b = torch.zeros(keep.shape[0], dtype=gram.dtype)
    for o in range(keep.shape[0]):
        grp, col = divmod(o, per_group)
        idx = keep[o].nonzero().flatten()
        if has_bias:
            idx = torch.cat([idx, torch.tensor([d])])
        if len(idx) == 0:
            continue
        g = gram[grp][idx][:, idx]
        g.diagonal().add_(ridge[grp])  # positive definite: a Cholesky solve
        sol = torch.cholesky_solve(cross[grp][idx, col, None], torch.linalg.cholesky(g))[:, 0]
        if has_bias:
            w[o, idx[:-1]], b[o] = sol[:-1], sol[-1]
        else:
            w[o, idx] = sol
    with torch.no_grad():
        layer.weight.copy_(w.reshape(layer.weight.shape).to(layer.weight.dtype))
        if has_bias:
            layer.bias.copy_(b.to(layer.bias.dtype))
