"""DeepLIFT rules: how multipliers pass through each kind of module, as a table you extend.

DeepLIFT (Shrikumar et al. 2017) backpropagates *multipliers* m = ΔC/Δx instead of
gradients. For a linear module the gradient already is the multiplier; a nonlinearity needs
a rule. Captum keeps a table of such rules for its nonlinearities and zennit maps module
types to rules a user can extend; here one table does both:

    from xaicompress.relevance import register_rule, Rescale
    register_rule(MySwish, Rescale())       # an elementwise nonlinearity of your own
    register_rule(MyBlurPool, PassThrough())  # linear: its gradient is its multiplier

A module whose type (or a base type whose `forward` it does not override) is in the table
is attributed as one unit with that rule; any other module is traced into (torch.fx) and
its operations are matched against the rules for functions (`relevance/canonical.py`).

A rule is an object with two methods the engine calls on the module:
  reference(module, inputs) -> (output, memo)   reference pass, no gradients: the memo is
                                                 what the input pass needs from it
  forward(module, inputs, memo, opts) -> output  input pass: the output, built so that its
                                                 gradient IS the DeepLIFT multiplier
Every rule gives the input and the reference the same multiplier, so only the input half
needs a backward pass. The exact definitions are in docs/relevance.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function
from torch.nn.modules.utils import _pair

from xaicompress.errors import XaiCompressError

#: |Δx| below which a Rescale ratio Δy/Δx is 0/0 and the ordinary derivative is used
EPS = 1e-10
RULES = ("rescale", "revealcancel")
LAYERNORM_RULES = ("decompose", "constant")


@dataclass
class RuleOptions:
    """Options every rule reads during the input pass.

    eps:       Rescale 0/0 guard; rule: "rescale" or "revealcancel" (elementwise
    nonlinearities fed straight by a Conv2d/Linear, see `RevealCancelHead`);
    layernorm: "decompose" (exact) or "constant" (statistics held fixed, Ali et al. 2022).
    """

    eps: float = EPS
    rule: str = "rescale"
    layernorm: str = "decompose"


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


class Rule:
    """Base rule. Subclasses override `memo` and `forward`; see the module docstring."""

    name = "rule"

    def reference(self, module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Tensor, tuple]:
        y = module(*inputs)
        return y, self.memo(module, inputs, y)

    def memo(self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> tuple:
        return ()

    def forward(self, module: nn.Module, inputs: tuple[Any, ...], memo: tuple,
                opts: RuleOptions) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PassThrough(Rule):
    """Linear (or affine) modules: the gradient is the multiplier, nothing to record."""

    name = "linear"

    def forward(self, module: nn.Module, inputs: tuple[Any, ...], memo: tuple,
                opts: RuleOptions) -> Tensor:
        return module(*inputs)


# ------------------------------------------------------------------ elementwise: Rescale
class Elementwise(nn.Module):
    """fn(x, *args, **kwargs) for an elementwise function: the canonical form of F.relu,
    torch.exp, x.clamp(0, 6), x ** 2, ... (constant arguments only)."""

    def __init__(self, fn: Callable[..., Tensor], args: tuple = (),
                 kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.fn, self.args, self.kwargs = fn, tuple(args), dict(kwargs or {})

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x, *self.args, **self.kwargs)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


_RELU_FNS = (torch.relu, F.relu)


def derivative(fn: nn.Module, x: Tensor) -> Tensor:
    """Ordinary derivative of an elementwise module at x (where the Rescale ratio is 0/0)."""
    if isinstance(fn, nn.ReLU) or (isinstance(fn, Elementwise) and fn.fn in _RELU_FNS
                                   and not fn.args and not fn.kwargs):
        return (x > 0).to(x.dtype)
    with torch.enable_grad():
        xx = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(xx).sum(), xx)
    return g


def _ratio(dy: Tensor, dx: Tensor, fallback: Callable[[], Tensor], eps: float) -> Tensor:
    """dy / dx, and `fallback()` where |dx| < eps (masked only when some are: a minimum is
    one cheap pass, a boolean mask and `where` cost ~5 passes of the tensor)."""
    # dy is a temporary of the full shape: divide in place (one allocation less per call;
    # fresh large allocations, not arithmetic, dominate these elementwise passes on CPU)
    m = dy.div_(dx) if dy.shape == dx.shape and not dy.requires_grad else dy / dx
    if dx.numel() and float(dx.abs().amin()) < eps:
        m = torch.where(dx.abs() < eps, fallback(), m)
    return m


class _RescaleFn(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: nn.Module, x_ref: Tensor, y_ref: Tensor,
                eps: float) -> Tensor:
        y = fn(x)
        ctx.save_for_backward(_ratio(y - y_ref, x - x_ref, lambda: derivative(fn, x), eps))
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        (m,) = ctx.saved_tensors
        return g * m, None, None, None, None


class _RevealCancelFn(Function):
    """RevealCancel for y = f(x) with Δx = Δx⁺ + Δx⁻ split by the sign of the input terms.

    Δy⁺ = ½[f(x'+Δx⁺) − f(x')] + ½[f(x) − f(x'+Δx⁻)],  Δy⁻ = ½[f(x'+Δx⁻) − f(x')] +
    ½[f(x) − f(x'+Δx⁺)], m± = Δy±/Δx±. The gradient returned for x is the combined
    multiplier (m⁺Δx⁺ + m⁻Δx⁻)/Δx; the split multipliers go to `head` for the layer below.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: nn.Module, x_ref: Tensor, y_ref: Tensor,
                pos: Tensor, neg: Tensor, eps: float, head: RevealCancelHead) -> Tensor:
        y = fn(x)
        f_pos, f_neg = fn(x_ref + pos), fn(x_ref + neg)
        dy_pos = 0.5 * (f_pos - y_ref) + 0.5 * (y - f_neg)
        dy_neg = 0.5 * (f_neg - y_ref) + 0.5 * (y - f_pos)
        m_pos = _ratio(dy_pos, pos, lambda: derivative(fn, x_ref), eps)
        m_neg = _ratio(dy_neg, neg, lambda: derivative(fn, x_ref), eps)
        dx = x - x_ref
        combined = _ratio(m_pos * pos + m_neg * neg, dx, lambda: 0.5 * (m_pos + m_neg), eps)
        ctx.save_for_backward(m_pos, m_neg, combined)
        ctx.head = head
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        m_pos, m_neg, combined = ctx.saved_tensors
        ctx.head.receive(g * m_pos, g * m_neg)
        return g * combined, None, None, None, None, None, None, None


class Rescale(Rule):
    """Elementwise y = f(x): m = Δy/Δx (the derivative where |Δx| < eps). Under
    rule=revealcancel, RevealCancel when the input comes straight from a Conv2d/Linear
    (through eval BatchNorm only); Rescale elsewhere."""

    name = "rescale"

    def memo(self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> tuple:
        return inputs[0].detach(), output.detach()

    def forward(self, module: nn.Module, inputs: tuple[Any, ...], memo: tuple,
                opts: RuleOptions, head: RevealCancelHead | None = None) -> Tensor:
        x = inputs[0]
        x_ref, y_ref = memo
        if head is not None and opts.rule == "revealcancel" and head.ready():
            pos, neg = head.input_split()
            return _RevealCancelFn.apply(x, module, x_ref, y_ref, pos, neg, opts.eps, head)
        return _RescaleFn.apply(x, module, x_ref, y_ref, opts.eps)


# ------------------------------------------------------------------ max pooling
def pool_with_indices(pool: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(y, flat argmax indices per channel) of a MaxPool2d / AdaptiveMaxPool2d."""
    if isinstance(pool, nn.AdaptiveMaxPool2d):
        return F.adaptive_max_pool2d(x, pool.output_size, return_indices=True)
    return F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                        pool.ceil_mode, return_indices=True)


def _unpool(pool: nn.Module, values: Tensor, like: Tensor, index: Tensor) -> Tensor:
    """Sum `values` (pooled shape) into the input positions `index` points at (shape of
    `like`), with PyTorch's own max-pool backward kernels (overlapping windows add up)."""
    if isinstance(pool, nn.AdaptiveMaxPool2d):
        return torch.ops.aten.adaptive_max_pool2d_backward(values, like, index)
    ks, st = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size)
    return torch.ops.aten.max_pool2d_with_indices_backward(
        values, like, ks, st, _pair(pool.padding), _pair(pool.dilation), pool.ceil_mode,
        index)


class _MaxPoolFn(Function):
    """With y = maxpool(x), y' = maxpool(x'), d = y − y':
    m_x = [scatter(g·max(d, 0), argmax x) + scatter(g·min(d, 0), argmax x')] / Δx, and 0
    where Δx = 0. The contributions of a window sum to g·d."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, pool: nn.Module, x_ref: Tensor, y_ref: Tensor,
                idx_ref: Tensor, eps: float) -> Tensor:
        y, idx = pool_with_indices(pool, x)
        d = y - y_ref
        ctx.save_for_backward(x - x_ref, d.clamp(min=0), d.clamp(max=0), idx,
                              idx_ref.expand_as(idx).contiguous())
        ctx.pool = pool
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        dx, up, down, idx, idx_ref = ctx.saved_tensors
        pool = ctx.pool

        def scatter(values: Tensor, index: Tensor) -> Tensor:
            """Values routed to (and summed at) the argmax positions: max-pool's backward."""
            return _unpool(pool, values, dx, index)

        # |routed| <= |g| |dx| position by position, so the ratio is bounded; only an
        # input equal to its reference (dx = 0, contribution 0 whatever the multiplier)
        # gives 0/0, and gets multiplier 0
        m = scatter(g * up, idx).add_(scatter(g * down, idx_ref)).div_(dx)
        return m.nan_to_num_(0.0, 0.0, 0.0), None, None, None, None, None


class MaxPool(Rule):
    """MaxPool2d and AdaptiveMaxPool2d: Captum's maxpool rule (see `_MaxPoolFn`)."""

    name = "maxpool"

    def reference(self, module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Tensor, tuple]:
        x = inputs[0]
        y, idx = pool_with_indices(module, x)
        return y, (x.detach(), y.detach(), idx)

    def forward(self, module: nn.Module, inputs: tuple[Any, ...], memo: tuple,
                opts: RuleOptions) -> Tensor:
        x_ref, y_ref, idx_ref = memo
        return _MaxPoolFn.apply(inputs[0], module, x_ref, y_ref, idx_ref, opts.eps)


# ------------------------------------------------------------------ products of two signals
class _ProductFn(Function):
    """y = a·b (broadcasting): ab − a'b' = ((b + b')/2)(a − a') + ((a + a')/2)(b − b')."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor, a_ref: Tensor, b_ref: Tensor) -> Tensor:
        ctx.save_for_backward((a + a_ref) * 0.5, (b + b_ref) * 0.5)
        ctx.shapes = a.shape, b.shape
        return a * b

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        a_mid, b_mid = ctx.saved_tensors
        sa, sb = ctx.shapes
        return (g * b_mid).sum_to_size(sa), (g * a_mid).sum_to_size(sb), None, None


class _BilinearFn(Function):
    """y = f(a, b) bilinear (matmul, einsum of two operands): the same split, i.e. the
    gradient of f taken at the midpoint ((a + a')/2, (b + b')/2)."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor, a_ref: Tensor, b_ref: Tensor,
                fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        ctx.save_for_backward((a + a_ref) * 0.5, (b + b_ref) * 0.5)
        ctx.fn = fn
        return fn(a, b)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        a_mid, b_mid = ctx.saved_tensors
        with torch.enable_grad():
            a_, b_ = a_mid.detach().requires_grad_(True), b_mid.detach().requires_grad_(True)
            ga, gb = torch.autograd.grad(ctx.fn(a_, b_), (a_, b_), g)
        return ga, gb, None, None, None


class Product(Rule):
    """A product of two signals (squeeze-excitation `x * gate`, gating, x·x): the exact
    symmetric split ab − a'b' = ((b+b')/2)(a−a') + ((a+a')/2)(b−b'). Modules built by the
    canonicaliser: `Multiply` (elementwise) and `Bilinear` (matmul and friends)."""

    name = "product"

    def memo(self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> tuple:
        return inputs[0].detach(), inputs[1].detach()

    def forward(self, module: nn.Module, inputs: tuple[Any, ...], memo: tuple,
                opts: RuleOptions) -> Tensor:
        a, b = inputs
        a_ref, b_ref = memo
        if isinstance(module, Bilinear):
            return _BilinearFn.apply(a, b, a_ref, b_ref, module.fn)
        return _ProductFn.apply(a, b, a_ref, b_ref)


class Multiply(nn.Module):
    """a * b as a module (the canonicaliser's form of a product of two signals)."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a * b


class Bilinear(nn.Module):
    """fn(a, b) for a function bilinear in its two tensor arguments (matmul, bmm, ...)."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.fn(a, b)


# ------------------------------------------------------------------ LayerNorm / GroupNorm
class _NormaliseFn(Function):
    """n = c·s over rows of a (rows, M) view, c = x − mean(x), s = (mean(c²) + eps)^-½.

    decompose: every elementary step with an exact DeepLIFT rule,
      Δn = s·Δc + c'·Δs         (product, anchored at the input's scale s),
      Δs = r·Δv                  (Rescale of v ↦ (v + eps)^-½, r = Δs/Δv),
      Δv = Σ_j (2c̄_j / M)·Δc_j  (difference of squares, c̄ = (c + c')/2),
      so m_c = s·g + (2c̄/M)·r·Σ_i c'_i g_i and m_x = m_c − mean(m_c) (centring).
      The symmetric product split ((s + s')/2 for Δc) is exact too, but when a reference
      row has no variance (every reference activation 0, as with zero-initialised biases)
      s' = eps^-½ and its multipliers cancel at ~1000x magnification per LayerNorm; the
      anchored split reduces to the constant-statistics rule there, with nothing left over.
    constant: s held fixed at the input's value (Ali et al. 2022): m_x = centred(s·g); this
      leaves c'·(s − s') per element unattributed (reported as convergence delta).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, x_ref: Tensor, eps: float, mode: str,
                small: float) -> Tensor:
        c, c_ref = x - x.mean(1, keepdim=True), x_ref - x_ref.mean(1, keepdim=True)
        v, v_ref = c.pow(2).mean(1, keepdim=True), c_ref.pow(2).mean(1, keepdim=True)
        s, s_ref = (v + eps).rsqrt(), (v_ref + eps).rsqrt()
        if mode == "constant":
            ctx.save_for_backward(s)
        else:
            r = _ratio(s - s_ref, v - v_ref, lambda: -0.5 * (v + eps).pow(-1.5), small)
            ctx.save_for_backward(s, c_ref, (c + c_ref) * 0.5, r)
        ctx.mode = mode
        return c * s

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.mode == "constant":
            (s,) = ctx.saved_tensors
            m_c = s * g
        else:
            s, c_ref, c_mid, r = ctx.saved_tensors
            m = g.shape[1]
            m_c = s * g + (2.0 / m) * c_mid * r * (c_ref * g).sum(1, keepdim=True)
        return m_c - m_c.mean(1, keepdim=True), None, None, None, None


def _normalise(x: Tensor, x_ref: Tensor, rows: int, eps: float, opts: RuleOptions) -> Tensor:
    """Normalise x (R, ...) in `rows` groups of equal size per leading row (no affine)."""
    shape = x.shape
    n = _NormaliseFn.apply(x.reshape(rows, -1), match_rows(x_ref, shape[0]).reshape(rows, -1),
                           eps, opts.layernorm, opts.eps)
    return n.reshape(shape)


class LayerNormRule(Rule):
    """nn.LayerNorm (and F.layer_norm): `_NormaliseFn` over the normalised trailing dims,
    then the elementwise affine (linear). Option layernorm=decompose|constant."""

    name = "layernorm"

    def memo(self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> tuple:
        return (inputs[0].detach(),)

    def forward(self, module: nn.Module, inputs: tuple[Any, ...], memo: tuple,
                opts: RuleOptions) -> Tensor:
        x = inputs[0]
        k = len(tuple(module.normalized_shape))
        rows = x.numel() // max(1, math.prod(x.shape[x.dim() - k:]))
        y = _normalise(x, memo[0], rows, module.eps, opts)
        if module.weight is not None:
            y = y * module.weight
        if module.bias is not None:
            y = y + module.bias
        return y


class GroupNormRule(Rule):
    """nn.GroupNorm (and F.group_norm): `_NormaliseFn` per (sample, group), then the
    per-channel affine. Option layernorm=decompose|constant."""

    name = "groupnorm"

    def memo(self, module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> tuple:
        return (inputs[0].detach(),)

    def forward(self, module: nn.Module, inputs: tuple[Any, ...], memo: tuple,
                opts: RuleOptions) -> Tensor:
        x = inputs[0]
        y = _normalise(x, memo[0], x.shape[0] * module.num_groups, module.eps, opts)
        view = (1, -1) + (1,) * (x.dim() - 2)
        if module.weight is not None:
            y = y * module.weight.view(view)
        if module.bias is not None:
            y = y + module.bias.view(view)
        return y


class FunctionalLayerNorm(nn.Module):
    """F.layer_norm(x, shape, weight, bias, eps) as a module (weight/bias are the model's
    own tensors, shared, not copies)."""

    def __init__(self, normalized_shape: Any, weight: Tensor | None, bias: Tensor | None,
                 eps: float) -> None:
        super().__init__()
        self.normalized_shape = tuple(normalized_shape) if not isinstance(
            normalized_shape, int) else (normalized_shape,)
        self.weight, self.bias, self.eps = weight, bias, float(eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class FunctionalGroupNorm(nn.Module):
    """F.group_norm(x, groups, weight, bias, eps) as a module (shared weight/bias)."""

    def __init__(self, num_groups: int, weight: Tensor | None, bias: Tensor | None,
                 eps: float) -> None:
        super().__init__()
        self.num_groups, self.weight, self.bias, self.eps = int(num_groups), weight, bias, eps

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


# ------------------------------------------------------------------ RevealCancel heads
class RevealCancelHead:
    """The Conv2d/Linear feeding a RevealCancel nonlinearity (through eval BatchNorms).

    Input pass: records Δz⁺ = Σ_j max(w_ij Δa_j, 0) and Δz⁻ = Σ_j min(w_ij Δa_j, 0) of the
    layer output (two extra passes of the layer with the split weights W⁺ = max(W, 0),
    W⁻ = min(W, 0)). The nonlinearity reads them scaled by the BatchNorm factor k
    (`input_split`), and hands back its split multipliers (`receive`); the layer's backward
    then routes them: a positive term w_ij Δa_j gets the positive multiplier, a negative
    term the negative one (`backward_input`), as the reference implementation does.
    """

    def __init__(self, layer: nn.Module, norms: list[nn.Module]) -> None:
        self.layer, self.norms = layer, norms
        self.clear()

    def clear(self) -> None:
        self.dz: tuple[Tensor, Tensor] | None = None
        self.da: Tensor | None = None
        self.grads: tuple[Tensor, Tensor] | None = None

    def ready(self) -> bool:
        return self.dz is not None

    @staticmethod
    def eligible(layer: nn.Module) -> bool:
        if isinstance(layer, nn.Linear):
            return type(layer).forward is nn.Linear.forward
        return (isinstance(layer, nn.Conv2d) and type(layer).forward is nn.Conv2d.forward
                and layer.padding_mode == "zeros" and not isinstance(layer.padding, str))

    def _scale(self, like: Tensor) -> Tensor:
        """Per-channel factor k of the BatchNorm chain, shaped to broadcast over `like`."""
        k = torch.ones(self.layer.weight.shape[0], dtype=like.dtype, device=like.device)
        for bn in self.norms:
            var = bn.running_var.to(like.dtype)
            k = k * (bn.weight.to(like.dtype) if bn.weight is not None else 1.0) / (
                var + bn.eps).sqrt()
        return k.view(-1, *([1] * (like.dim() - 2))) if isinstance(
            self.layer, nn.Conv2d) else k

    def _apply(self, a: Tensor, w: Tensor) -> Tensor:
        if isinstance(self.layer, nn.Linear):
            return F.linear(a, w)
        lay = self.layer
        return F.conv2d(a, w, None, lay.stride, lay.padding, lay.dilation, lay.groups)

    def record(self, da: Tensor) -> None:
        w = self.layer.weight.detach().to(da.dtype)
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        ap, an = da.clamp(min=0), da.clamp(max=0)
        self.da = da
        self.dz = (self._apply(ap, wp) + self._apply(an, wn),
                   self._apply(an, wp) + self._apply(ap, wn))

    def input_split(self) -> tuple[Tensor, Tensor]:
        """(Δx⁺, Δx⁻) of the nonlinearity's input: k·Δz± re-split by sign."""
        assert self.dz is not None
        k = self._scale(self.dz[0])
        p, n = k * self.dz[0], k * self.dz[1]
        return p.clamp(min=0) + n.clamp(min=0), p.clamp(max=0) + n.clamp(max=0)

    def receive(self, g_pos: Tensor, g_neg: Tensor) -> None:
        """Split multipliers of the nonlinearity's input -> those of Δz⁺ and Δz⁻."""
        k = self._scale(g_pos)
        up = k > 0
        self.grads = (k * torch.where(up, g_pos, g_neg), k * torch.where(up, g_neg, g_pos))

    def split(self) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """(Δz⁺, Δz⁻, m⁺, m⁻) of the layer output once the backward pass reached it."""
        if self.dz is None or self.grads is None:
            return None
        return self.dz[0], self.dz[1], self.grads[0], self.grads[1]

    def backward_input(self, a_shape: torch.Size) -> Tensor:
        """Multiplier of the layer input: W⁺ᵀm⁺ + W⁻ᵀm⁻ where Δa > 0, W⁺ᵀm⁻ + W⁻ᵀm⁺ where
        Δa < 0, and ½Wᵀ(m⁺ + m⁻) where Δa = 0 (its contribution is 0 either way)."""
        assert self.grads is not None and self.da is not None
        gp, gn = self.grads
        w = self.layer.weight.detach().to(gp.dtype)
        wp, wn = w.clamp(min=0), w.clamp(max=0)

        def back(g: Tensor, ww: Tensor) -> Tensor:
            if isinstance(self.layer, nn.Linear):
                return g @ ww
            lay = self.layer
            return torch.nn.grad.conv2d_input(a_shape, ww, g, lay.stride, lay.padding,
                                              lay.dilation, lay.groups)

        pos, neg = back(gp, wp) + back(gn, wn), back(gn, wp) + back(gp, wn)
        da = self.da
        return torch.where(da > 0, pos, torch.where(da < 0, neg, 0.5 * (pos + neg)))


class _HeadLayerFn(Function):
    """A RevealCancel head's layer: forward as usual, backward from the split multipliers."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, layer: nn.Module, head: RevealCancelHead) -> Tensor:
        ctx.head, ctx.shape = head, a.shape
        return layer(a)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        head = ctx.head
        if head.grads is None:  # the nonlinearity was not reached: plain gradient
            raise RuntimeError("RevealCancel head reached without split multipliers")
        return head.backward_input(ctx.shape), None, None


def head_forward(layer: nn.Module, a: Tensor, a_ref: Tensor, head: RevealCancelHead) -> Tensor:
    """Input pass of a RevealCancel head layer (records Δz±, routes multipliers)."""
    head.clear()
    head.record((a - a_ref).detach())
    return _HeadLayerFn.apply(a, layer, head)


# ------------------------------------------------------------------ the table
#: module type -> rule. Exact types; a subclass matches a base type only when it does not
#: override `forward` (timm's LayerNorm2d permutes first: it is traced into instead).
_RULES: dict[type[nn.Module], Rule] = {}


def register_rule(module_type: type[nn.Module], rule: Rule, *, overwrite: bool = False) -> None:
    """Attribute every `module_type` module (as one unit, not traced into) with `rule`.

    Raises XaiCompressError when the type already has a rule, unless `overwrite=True`.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise XaiCompressError(f"register_rule: module_type {module_type!r} is not an "
                               "nn.Module subclass")
    if not isinstance(rule, Rule):
        raise XaiCompressError(f"register_rule: rule {rule!r} is not a "
                               "xaicompress.relevance.rules.Rule")
    if module_type in _RULES and not overwrite:
        raise XaiCompressError(f"register_rule: {module_type.__name__} already has rule "
                               f"{_RULES[module_type]!r}; pass overwrite=True to replace it")
    _RULES[module_type] = rule


def rule_for(module: nn.Module) -> Rule | None:
    """The rule of `module`'s type (or of a base type whose forward it keeps), or None."""
    cls = type(module)
    for base in cls.__mro__:
        rule = _RULES.get(base)
        if rule is not None and (base is cls or cls.forward is base.forward):
            return rule
        if base is nn.Module:
            break
    return None


def rules_table() -> dict[str, str]:
    """Module type name -> rule name, for documentation and error messages."""
    return {t.__name__: r.name for t, r in _RULES.items()}


ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.LogSigmoid, nn.Tanh, nn.Softplus, nn.Softsign,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardshrink, nn.Softshrink, nn.Tanhshrink,
    nn.Threshold,
)
LINEAR: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear,
    nn.Identity,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.FeatureAlphaDropout, nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d,
    nn.ConstantPad2d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d,
    nn.ReplicationPad2d, nn.CircularPad2d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
)
MAXPOOL: tuple[type[nn.Module], ...] = (nn.MaxPool2d, nn.AdaptiveMaxPool2d)


def _builtins() -> None:
    for t in (*ELEMENTWISE, Elementwise):
        register_rule(t, Rescale())
    for t in LINEAR:
        register_rule(t, PassThrough())
    for t in MAXPOOL:
        register_rule(t, MaxPool())
    register_rule(nn.LayerNorm, LayerNormRule())
    register_rule(FunctionalLayerNorm, LayerNormRule())
    register_rule(nn.GroupNorm, GroupNormRule())
    register_rule(FunctionalGroupNorm, GroupNormRule())
    register_rule(Multiply, Product())
    register_rule(Bilinear, Product())


_builtins()
