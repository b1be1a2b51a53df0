"""DeepLIFT (Rescale) relevance of every unit and weight: one forward and one backward
pass per batch for all layers, and the `deeplift` criterion built on it.

How it works (see docs/relevance.md for the definition):
1. The model is canonicalised (relevance/canonical.py) and every nonlinearity is wrapped by
   a module whose *gradient* is the DeepLIFT multiplier: Rescale ``Δy / Δx`` for elementwise
   activations (the ordinary derivative where ``|Δx| < eps``), Captum's cross-max rule for
   MaxPool2d. Linear modules need no rule: their gradient already is their multiplier.
2. A no-grad *reference pass* records every wrapped module's and every Conv2d/Linear's input
   and output on the reference. A constant reference (zeros, mean, samples:N) is a batch of
   1..K images run once per scoring run; a per-sample reference (blur) once per batch.
3. The *input pass* runs the batch with gradients; forward hooks on Conv2d/Linear keep their
   input and output, a tensor hook on each output receives the multiplier ``m`` during the
   single backward pass and hands ``(layer, x, x_ref, z, z_ref, m)`` to a callback, which
   aggregates and drops it, so memory does not grow with the number of batches.

Because every rule gives the input and the reference the same multiplier, only the input
half needs a backward pass; the reference's activations are all the rules need from it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function

from xaicompress.errors import XaiCompressError
from xaicompress.progress import track
from xaicompress.relevance.base import Criterion, Relevance, prunable_layers, register_criterion
from xaicompress.relevance.canonical import ELEMENTWISE, MAXPOOL, canonicalise
from xaicompress.relevance.distributed import all_reduce_max, all_reduce_sums
from xaicompress.relevance.references import parse_reference, resolve_reference

EPS = 1e-10

#: callback(original_name, layer, x, x_ref, z, z_ref, m), all (R, ...) tensors
LayerCallback = Callable[[str, nn.Module, Tensor, Tensor, Tensor, Tensor, Tensor], None]


class _State:
    def __init__(self, eps: float) -> None:
        self.mode = "off"  # off | ref | input
        self.eps = eps


def match_rows(ref: Tensor, n: int) -> Tensor:
    """Reference rows for n input rows: broadcast 1, tile K (row b*K+k uses ref k), or as is."""
    k = ref.shape[0]
    if k == n:
        return ref
    if k == 1:
        return ref.expand(n, *ref.shape[1:])
    if n % k:
        raise RuntimeError(f"{n} input rows do not tile {k} reference rows")
    return ref.repeat(n // k, *([1] * (ref.dim() - 1)))


class _RescaleFn(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: nn.Module, x_ref: Tensor, y_ref: Tensor, eps: float,
                deriv: Callable[[nn.Module, Tensor], Tensor]) -> Tensor:
        y = fn(x)
        dx = x - x_ref
        m = (y - y_ref) / dx
        small = dx.abs() < eps
        if bool(small.any()):
            m = torch.where(small, deriv(fn, x), m)
        ctx.save_for_backward(m)
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        (m,) = ctx.saved_tensors
        return g * m, None, None, None, None, None


def _derivative(fn: nn.Module, x: Tensor) -> Tensor:
    """Ordinary derivative of an elementwise module (used where the Rescale ratio is 0/0)."""
    if isinstance(fn, nn.ReLU):
        return (x > 0).to(x.dtype)
    with torch.enable_grad():
        xx = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(xx).sum(), xx)
    return g


class _MaxPoolFn(Function):
    """Captum's DeepLIFT maxpool rule, written for the input half only.

    With y = maxpool(x), y_ref = maxpool(x_ref), d = y - y_ref:
      m_x = [scatter(g * max(d, 0), argmax x) + scatter(g * min(d, 0), argmax x_ref)] / Δx,
    and the ordinary maxpool gradient where |Δx| < eps. Contributions sum to g * d exactly.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, pool: nn.MaxPool2d, x_ref: Tensor, y_ref: Tensor,
                idx_ref: Tensor, eps: float) -> Tensor:
        y, idx = F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                              pool.ceil_mode, return_indices=True)
        d = y - y_ref
        ctx.save_for_backward(x - x_ref, d.clamp(min=0), d.clamp(max=0), idx, idx_ref)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        dx, up, down, idx, idx_ref = ctx.saved_tensors
        n, c = dx.shape[:2]

        def scatter(values: Tensor, index: Tensor) -> Tensor:
            out = torch.zeros(n, c, dx[0, 0].numel(), dtype=g.dtype, device=g.device)
            return out.scatter_add_(2, index.reshape(n, c, -1),
                                    values.reshape(n, c, -1)).view_as(dx)

        rescaled = (scatter(g * up, idx) + scatter(g * down, idx_ref)) / dx
        plain = scatter(g, idx)
        return torch.where(dx.abs() < ctx.eps, plain, rescaled), None, None, None, None, None


class _RescaleAct(nn.Module):
    def __init__(self, inner: nn.Module, state: _State, name: str) -> None:
        super().__init__()
        self.inner, self.state, self.label = inner, state, name
        self.x_ref: Tensor | None = None
        self.y_ref: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        mode = self.state.mode
        if mode == "ref":
            y = self.inner(x)
            self.x_ref, self.y_ref = x.detach(), y.detach()
            return y
        if mode == "input":
            if self.x_ref is None or self.y_ref is None:
                raise RuntimeError(f"{self.label}: no reference pass recorded")
            n = x.shape[0]
            return _RescaleFn.apply(x, self.inner, match_rows(self.x_ref, n),
                                    match_rows(self.y_ref, n), self.state.eps, _derivative)
        return self.inner(x)


class _RescaleMaxPool(nn.Module):
    def __init__(self, inner: nn.MaxPool2d, state: _State, name: str) -> None:
        super().__init__()
        self.inner, self.state, self.label = inner, state, name
        self.ref: tuple[Tensor, Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        p = self.inner
        mode = self.state.mode
        if mode == "ref":
            y, idx = F.max_pool2d(x, p.kernel_size, p.stride, p.padding, p.dilation,
                                  p.ceil_mode, return_indices=True)
            self.ref = (x.detach(), y.detach(), idx)
            return y
        if mode == "input":
            if self.ref is None:
                raise RuntimeError(f"{self.label}: no reference pass recorded")
            n = x.shape[0]
            x_ref, y_ref, idx_ref = (match_rows(t, n) for t in self.ref)
            return _MaxPoolFn.apply(x, p, x_ref, y_ref, idx_ref, self.state.eps)
        return p(x)


@dataclass
class BatchAttribution:
    """What one batch of R rows gave.

    inputs:  (R, C, H, W) input-space contributions (x - x_ref) * m_x
    logits:  (R, K) model outputs on the inputs
    delta_f: (R,) f_t(x) - f_t(x_ref) of the target (sum over classes for target "all")
    delta:   (R,) sum of `inputs` minus delta_f: the convergence delta (0 in exact maths)
    """

    inputs: Tensor
    logits: Tensor
    delta_f: Tensor
    delta: Tensor


class DeepLiftEngine:
    """DeepLIFT (Rescale) for every Conv2d/Linear of a model at once.

    `set_reference(ref)` runs the reference pass on ref (K, C, H, W) (K = 1 for a constant
    reference, or one row per input row); `attribute(x, target, on_layer)` runs the input
    pass over rows x (R, C, H, W) and one backward pass, calling `on_layer` per layer.
    """

    def __init__(self, model: nn.Module, *, eps: float = EPS, maxpool: str = "rescale") -> None:
        if maxpool not in ("rescale", "captum"):
            raise XaiCompressError(f"maxpool={maxpool!r}: expected rescale or captum")
        canon = canonicalise(model)
        self.module = canon.module
        self.names = canon.names  # canonical -> original
        self.state = _State(eps)
        for p in self.module.parameters():
            p.requires_grad_(False)  # only input gradients are needed: skips weight GEMMs
        plain = _after_activation(self.module) if maxpool == "captum" else set()
        for name, m in list(self.module.named_modules()):
            if isinstance(m, ELEMENTWISE):
                self._replace(name, _RescaleAct(m, self.state, name))
            elif isinstance(m, MAXPOOL) and name not in plain:
                self._replace(name, _RescaleMaxPool(m, self.state, name))
        self.layers = {c: self.module.get_submodule(c) for c in self.names}
        self._ref_io: dict[str, tuple[Tensor, Tensor]] = {}
        self._ref_x: Tensor | None = None
        self._ref_out: Tensor | None = None
        self._on_layer: LayerCallback | None = None
        for cname, layer in self.layers.items():
            layer.register_forward_hook(self._layer_hook(cname))

    def _replace(self, name: str, new: nn.Module) -> None:
        parent, _, attr = name.rpartition(".")
        setattr(self.module.get_submodule(parent) if parent else self.module, attr, new)

    def _layer_hook(self, cname: str) -> Callable[..., None]:
        original = self.names[cname]

        def hook(layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if self.state.mode == "ref":
                self._ref_io[cname] = (inputs[0].detach(), output.detach())
            elif self.state.mode == "input" and output.requires_grad:
                x, z = inputs[0].detach(), output.detach()
                x_ref, z_ref = self._ref_io[cname]
                cb = self._on_layer

                def on_grad(m: Tensor) -> None:
                    if cb is not None:
                        n = x.shape[0]
                        cb(original, layer, x, match_rows(x_ref, n), z, match_rows(z_ref, n), m)

                output.register_hook(on_grad)

        return hook

    @torch.no_grad()
    def set_reference(self, ref: Tensor) -> Tensor:
        """Run the reference pass on ref (K, C, H, W); returns its logits (K, classes)."""
        self.state.mode = "ref"
        try:
            out = self.module(ref)
        finally:
            self.state.mode = "off"
        self._ref_x, self._ref_out = ref, _logits(out)
        return self._ref_out

    def attribute(self, x: Tensor, target: Tensor | str, on_layer: LayerCallback | None = None
                  ) -> BatchAttribution:
        """Input pass and one backward pass over rows x (R, C, H, W).

        target: class index per row (R,) int64, "pred" (argmax per row) or "all" (the sum
        of all class outputs, by linearity the sum of every class's contributions).
        """
        if self._ref_x is None or self._ref_out is None:
            raise RuntimeError("set_reference must run before attribute")
        n = x.shape[0]
        xr = x.detach().clone().requires_grad_(True)
        self._on_layer = on_layer
        self.state.mode = "input"
        try:
            with torch.enable_grad():
                out = _logits(self.module(xr))
                self.state.mode = "off"
                grad_out = _target_grad(out, target)
                f_ref = match_rows(self._ref_out, n)
                delta_f = ((out.detach() - f_ref) * grad_out).sum(1)
                out.backward(grad_out)
        finally:
            self.state.mode = "off"
            self._on_layer = None
        ref_rows = match_rows(self._ref_x, n)
        contrib = (xr.detach() - ref_rows) * xr.grad
        delta = contrib.flatten(1).sum(1) - delta_f
        return BatchAttribution(contrib.detach(), out.detach(), delta_f, delta)


def _after_activation(gm: Any) -> set[str]:
    """Max-pools whose input is the output of an elementwise nonlinearity module.

    Captum 0.9 registers its hooks so that such a nonlinearity reads the gradient of the
    max-pool *before* Captum's maxpool rule replaces it, i.e. the ordinary max-pool
    gradient. `maxpool="captum"` reproduces that (leaves these pools unwrapped).
    """
    mods = dict(gm.named_modules())
    out = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(mods.get(node.target), MAXPOOL):
            src = node.args[0]
            if getattr(src, "op", None) == "call_module" and isinstance(
                    mods.get(src.target), ELEMENTWISE) and len(src.users) == 1:
                out.add(node.target)
    return out


def _logits(out: Any) -> Tensor:
    if isinstance(out, Tensor) and out.dim() == 2:
        return out
    raise XaiCompressError(f"model output {type(out).__name__} "
                           f"{tuple(out.shape) if isinstance(out, Tensor) else ''}: expected "
                           "logits (N, classes)")


def _target_grad(out: Tensor, target: Tensor | str) -> Tensor:
    """(R, classes) one-hot rows of the target (ones for "all")."""
    if isinstance(target, str):
        if target == "all":
            return torch.ones_like(out)
        if target == "pred":
            target = out.detach().argmax(1)
        else:
            raise XaiCompressError(f"target={target!r}: expected true, pred, all or a class")
    target = torch.as_tensor(target, dtype=torch.long, device=out.device).reshape(-1)
    if target.numel() == 1 and out.shape[0] != 1:
        target = target.expand(out.shape[0])
    if target.numel() != out.shape[0]:
        raise XaiCompressError(f"target: {target.numel()} classes for {out.shape[0]} inputs")
    if (target < 0).any() or (target >= out.shape[1]).any():
        raise XaiCompressError(f"target: class indices must be in [0, {out.shape[1]})")
    return F.one_hot(target, out.shape[1]).to(out.dtype)


# ------------------------------------------------------------------ aggregation
def unit_contributions(layer: nn.Module, z: Tensor, z_ref: Tensor, m: Tensor) -> Tensor:
    """C (R, O) = (z - z_ref) * m summed over positions: a Conv2d output z is (R, O, H, W),
    a Linear output (R, ..., O) (the middle dims of a sequence are positions)."""
    c = (z - z_ref) * m
    if c.dim() == 2:
        return c
    return c.flatten(2).sum(2) if isinstance(layer, nn.Conv2d) else c.flatten(1, -2).sum(1)


def weight_contributions(layer: nn.Module, dx: Tensor, m: Tensor, *, group: int = 1,
                         absolute: bool = True) -> Tensor:
    """Sum over samples of the per-weight contribution, shaped like `layer.weight`.

    For z_i = sum_j w_ij x_j + b_i the term w_ij x_j contributes m_i * w_ij * Δx_j, summed
    over positions for a convolution. `absolute` takes |.| per sample before the sum over
    samples. dx (R, ...) is the layer's input minus its reference input, m (R, ...) the
    multiplier of its output; R = samples * group rows, the `group` rows of one sample (one
    per reference) are averaged before the absolute value.
    """
    w = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        din, dout = dx.shape[-1], m.shape[-1]
        xs = dx.reshape(-1, group * (dx.numel() // (dx.shape[0] * din)), din)
        ms = m.reshape(xs.shape[0], -1, dout)
        if not absolute:
            g = ms.flatten(0, 1).t() @ xs.flatten(0, 1)
        elif xs.shape[1] == 1:
            g = ms[:, 0].abs().t() @ xs[:, 0].abs()  # |m_i Δx_j| = |m_i| |Δx_j|: one GEMM
        else:
            g = _chunked(lambda a, b: _abs_sum(torch.bmm(b.transpose(1, 2), a)), xs, ms, w)
    elif isinstance(layer, nn.Conv2d):
        if not absolute:  # the plain weight gradient with Δx as input: one backward-conv
            mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
            padded = F.pad(dx, layer._reversed_padding_repeated_twice, mode=mode)
            g = torch.nn.grad.conv2d_weight(padded, w.shape, m, layer.stride, 0,
                                            layer.dilation, layer.groups)
        elif m[0, 0].numel() >= 16:
            g = _per_sample_conv_grouped(layer, dx, m, group)
        else:  # few output positions: batched GEMMs on unfolded inputs are faster
            cols, ms = _conv_columns(layer, dx, m, group)
            g = _chunked(_per_sample_conv, cols, ms, w)
    else:
        raise TypeError(type(layer).__name__)
    g = g.reshape(w.shape) / group
    return g * (w.abs() if absolute else w)


def _abs_sum(g: Tensor) -> Tensor:
    """sum over dim 0 of |g|, in place on the (temporary) g."""
    return g.abs_().sum(0)


def _per_sample_conv(cols: Tensor, ms: Tensor) -> Tensor:
    """sum_b |ms_b @ cols_b^T| for cols (b, groups, k, p), ms (b, groups, o, p)."""
    b, gr, k, p = cols.shape
    o = ms.shape[2]
    g = torch.bmm(ms.reshape(b * gr, o, p), cols.reshape(b * gr, k, p).transpose(1, 2))
    return _abs_sum(g.view(b, gr, o, k))


def _per_sample_conv_grouped(layer: nn.Conv2d, dx: Tensor, m: Tensor, group: int,
                             budget: int = 1 << 24) -> Tensor:
    """sum over samples of |per-sample weight contribution|, via one backward-weight
    convolution per chunk with the samples as convolution groups (fast for large maps)."""
    w = layer.weight
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    padded = F.pad(dx, layer._reversed_padding_repeated_twice, mode=mode)
    r, c, h, wd = padded.shape
    o = m.shape[1]
    step = max(1, budget // (w.numel() * group)) * group
    out = torch.zeros_like(w)
    for i in range(0, r, step):
        p, mm = padded[i:i + step], m[i:i + step]
        n = len(p)
        g = torch.nn.grad.conv2d_weight(
            p.reshape(1, n * c, h, wd), (n * o, c // layer.groups, *w.shape[2:]),
            mm.reshape(1, n * o, *mm.shape[2:]), layer.stride, 0, layer.dilation,
            n * layer.groups)
        out += g.view(n // group, group, *w.shape).sum(1).abs_().sum(0)
    return out


def _conv_columns(layer: nn.Conv2d, dx: Tensor, m: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """Unfolded inputs (B, groups, Cin/groups * kh * kw, group * P) and multipliers
    (B, groups, Cout/groups, group * P), rows of one sample merged along positions."""
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    padded = F.pad(dx, layer._reversed_padding_repeated_twice, mode=mode)
    cols = F.unfold(padded, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)
    r, ckk, p = cols.shape
    gr = layer.groups
    b = r // group
    cols = cols.view(b, group, gr, ckk // gr, p).permute(0, 2, 3, 1, 4).reshape(
        b, gr, ckk // gr, group * p)
    o = m.shape[1]
    ms = m.reshape(b, group, gr, o // gr, p).permute(0, 2, 3, 1, 4).reshape(
        b, gr, o // gr, group * p)
    return cols, ms


def _chunked(fn: Callable[[Tensor, Tensor], Tensor], xs: Tensor, ms: Tensor, w: Tensor,
             budget: int = 1 << 24) -> Tensor:
    """Apply fn to sample chunks so per-sample weight-sized tensors stay within `budget`."""
    step = max(1, budget // max(1, w.numel()))
    out = None
    for i in range(0, xs.shape[0], step):
        part = fn(xs[i:i + step], ms[i:i + step])
        out = part if out is None else out + part
    assert out is not None
    return out


# ------------------------------------------------------------------ the criterion
def parse_target(value: Any) -> str | int:
    """`target` option: true (label), pred (argmax), all (sum over classes) or a class index."""
    if isinstance(value, bool):
        raise XaiCompressError(f"target={value!r}: expected true, pred, all or a class index")
    if isinstance(value, int):
        if value < 0:
            raise XaiCompressError(f"target={value}: a class index must be >= 0")
        return value
    text = str(value).strip().lower()
    if text in ("true", "label", "pred", "all"):
        return "true" if text == "label" else text
    raise XaiCompressError(f"target={value!r}: expected true, pred, all or a class index")


def parse_aggregate(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in ("abs", "signed"):
        raise XaiCompressError(f"aggregate={value!r}: expected abs or signed")
    return text


def rows_target(target: str | int, y: Tensor, group: int) -> Tensor | str:
    """Per-row class indices (R,) for R = len(y) * group rows, or "pred" / "all"."""
    if target == "true":
        return y.long().repeat_interleave(group) if group > 1 else y.long()
    if isinstance(target, int):
        return torch.full((len(y) * group,), target, dtype=torch.long)
    return target


@register_criterion("deeplift")
class DeepLift(Criterion):
    """DeepLIFT Rescale contributions of every Conv2d/Linear output unit and weight.

    Options: reference = zeros | mean | blur | samples:N (also samplesN) | tensor | callable;
    target = true | pred | all | class index; aggregate = abs | signed; pixel_mean,
    pixel_std = the dataset normalisation (for the black `zeros` reference; passed by
    `compute_relevance` from a DatasetBundle); sigma = blur width in pixels; seed = which
    training images `samples:N` draws; normalise = per-layer L1 normalisation; tolerance =
    relative convergence delta above which a warning is raised; eps = Rescale 0/0 guard.
    """

    accepts_normalisation = True

    def __init__(self, reference: Any = "zeros", target: Any = "true", aggregate: str = "abs",
                 pixel_mean: Sequence[float] | None = None,
                 pixel_std: Sequence[float] | None = None, sigma: float | None = None,
                 seed: int = 0, normalise: bool = False, tolerance: float = 1e-4,
                 eps: float = EPS, weights: str = "sample", maxpool: str = "rescale") -> None:
        super().__init__(reference=reference, target=target, aggregate=aggregate,
                         pixel_mean=pixel_mean, pixel_std=pixel_std, sigma=sigma, seed=seed,
                         normalise=normalise, tolerance=tolerance, eps=eps, weights=weights,
                         maxpool=maxpool)
        self.options = {k: v for k, v in self.options.items()
                        if v is not None or k not in ("pixel_mean", "pixel_std", "sigma")}
        self.reference = parse_reference(reference)
        self.target = parse_target(target)
        self.aggregate = parse_aggregate(aggregate)
        if (pixel_mean is None) != (pixel_std is None):
            raise XaiCompressError("pixel_mean/pixel_std: give both or neither")
        self.pixel_mean, self.pixel_std = pixel_mean, pixel_std
        self.sigma = None if sigma is None else float(sigma)
        self.seed, self.normalise = int(seed), bool(normalise)
        self.tolerance, self.eps = float(tolerance), float(eps)
        if not (self.tolerance > 0 and self.eps > 0):
            raise XaiCompressError("deeplift: tolerance and eps must be positive")
        self.weights = str(weights).lower()
        if self.weights not in ("sample", "batch"):
            raise XaiCompressError(f"weights={weights!r}: expected sample (mean over samples "
                                   "of |contribution|) or batch (|mean contribution|, faster)")
        self.maxpool = str(maxpool).lower()
        if self.maxpool not in ("rescale", "captum"):
            raise XaiCompressError(f"maxpool={maxpool!r}: expected rescale or captum")

    def score(self, model: nn.Module, loader: Any) -> Relevance:
        """Mean over the loader's samples of |C| (or signed C) per unit and per weight.

        Returns units {layer: (out_units,)} and weights {layer: weight.shape} for every
        Conv2d/Linear of `model` by its module name; meta holds the convergence delta.
        """
        if loader is None:
            raise XaiCompressError("deeplift: needs data (a loader of (x, y) batches)")
        layers = prunable_layers(model)
        engine = DeepLiftEngine(model, eps=self.eps, maxpool=self.maxpool)
        absolute = self.aggregate == "abs"
        # weights=batch: signed sums over samples, |.| once at the end (one GEMM per layer)
        per_sample_abs = absolute and self.weights == "sample"
        sums: dict[str, Tensor] = {}
        for name, m in layers.items():
            sums[f"u/{name}"] = torch.zeros(m.weight.shape[0], dtype=torch.float64)
            sums[f"w/{name}"] = torch.zeros(m.weight.shape, dtype=torch.float64)
        stats = {"samples": torch.zeros(1, dtype=torch.float64),
                 "rows": torch.zeros(1, dtype=torch.float64),
                 "abs_delta_f": torch.zeros(1, dtype=torch.float64)}
        reached: set[str] = set()
        ref = None
        group = 1
        max_delta = 0.0

        def on_layer(name: str, layer: nn.Module, x: Tensor, x_ref: Tensor, z: Tensor,
                     z_ref: Tensor, m: Tensor) -> None:
            c = unit_contributions(layer, z, z_ref, m)
            c = c.view(-1, group, c.shape[1]).mean(1)
            sums[f"u/{name}"] += (c.abs() if absolute else c).sum(0).double()
            sums[f"w/{name}"] += weight_contributions(layer, x - x_ref, m, group=group,
                                                      absolute=per_sample_abs).double()
            reached.add(name)

        for batch in track(loader, "deeplift relevance"):
            x, y = batch[0].float(), batch[1]
            if ref is None:
                ref = resolve_reference(self.reference, loader, x, pixel_mean=self.pixel_mean,
                                        pixel_std=self.pixel_std, sigma=self.sigma,
                                        seed=self.seed)
                group = ref.group
                if ref.constant is not None:
                    engine.set_reference(ref.constant)
            # K references per sample multiply the rows: keep each pass near the batch size
            step = max(1, math.ceil(len(x) / group))
            for i in range(0, len(x), step):
                xs, ys = x[i:i + step], y[i:i + step]
                if ref.per_sample is not None:
                    engine.set_reference(ref.per_sample(xs))
                rows = xs.repeat_interleave(group, 0) if group > 1 else xs
                res = engine.attribute(rows, rows_target(self.target, ys, group), on_layer)
                max_delta = max(max_delta, float(res.delta.abs().max()))
                stats["samples"] += len(xs)
                stats["rows"] += len(rows)
                stats["abs_delta_f"] += float(res.delta_f.abs().sum())
        all_reduce_sums({**sums, **stats})
        max_delta = all_reduce_max(max_delta)
        n = float(stats["samples"])
        if n == 0:
            raise XaiCompressError("deeplift: the data loader gave no samples")
        mean_df = float(stats["abs_delta_f"]) / float(stats["rows"])
        rel_delta = max_delta / max(mean_df, 1e-12)
        if rel_delta > self.tolerance:
            warnings.warn(f"deeplift: convergence delta {rel_delta:.2e} (relative to mean "
                          f"|f(x) - f(ref)| = {mean_df:.3g}) exceeds {self.tolerance:g}; "
                          "contributions do not sum to the output difference", stacklevel=2)
        units = {k: (sums[f"u/{k}"] / n).float() for k in layers}
        weights = {k: (sums[f"w/{k}"] / n).float() for k in layers}
        if absolute and not per_sample_abs:
            weights = {k: v.abs() for k, v in weights.items()}
        meta = {"criterion": self.name, "reference": ref.spec.describe() if ref else None,
                "target": self.target, "aggregate": self.aggregate, "samples": int(n),
                "weights": self.weights, "maxpool": self.maxpool,
                "references_per_sample": group, "convergence_delta": max_delta,
                "convergence_delta_rel": rel_delta, "mean_abs_output_delta": mean_df,
                "unit": "Conv2d/Linear output (pre-activation)",
                "normalised_reference": self.pixel_mean is not None,
                "unreached_layers": sorted(set(layers) - reached)}
        rel = Relevance(self.name, units, weights, meta)
        return rel.normalised() if self.normalise else rel


def layer_attributions(model: nn.Module, x: Tensor, reference: Tensor, target: Tensor | str,
                       *, eps: float = EPS, maxpool: str = "rescale"
                       ) -> tuple[dict[str, Tensor], BatchAttribution]:
    """Per-sample DeepLIFT contributions of every Conv2d/Linear output, unaggregated.

    x (N, C, H, W); reference (1 or N, C, H, W); target (N,) class indices, "pred" or "all".
    Returns ({layer: (z - z_ref) * m shaped like the layer output (N, O, ...)}, the batch's
    input attribution). The same quantity as Captum's `LayerDeepLift(model, layer)` with
    `attribute_to_layer_input=False`, for all layers from one backward pass.
    """
    engine = DeepLiftEngine(model, eps=eps, maxpool=maxpool)
    engine.set_reference(reference)
    out: dict[str, Tensor] = {}

    def keep(name: str, layer: nn.Module, xi: Tensor, x_ref: Tensor, z: Tensor, z_ref: Tensor,
             m: Tensor) -> None:
        c = (z - z_ref) * m
        out[name] = out[name] + c if name in out else c

    res = engine.attribute(x, target, keep)
    return out, res
