"""Per-unit and per-weight contribution kernels shared by DeepLIFT and the gradient criteria.

For a layer z = W x + b (Conv2d or Linear) with output multiplier m (DeepLIFT's, or a plain
gradient), over R rows:
  unit i:    C_i = Σ_positions Δz_i · m_i                              -> (R, O)
  weight ij: Σ_positions m_i · w_ij · Δx_j, summed over samples, with |.| taken per sample
             (`absolute`) before the sum, or signed                  -> weight.shape
The per-weight sum with |.| per sample is what costs: it needs one weight-sized product per
sample. The kernels pick the cheapest exact form: one GEMM of |m| and |Δx| when a row has a
single position (|m_i Δx_j| = |m_i||Δx_j|), a backward-weight convolution with the samples
as convolution groups for large feature maps, batched GEMMs on unfolded inputs otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xaicompress.errors import XaiCompressError

#: elements of the per-sample weight-sized temporaries processed at once: small enough to
#: stay in cache while |.| and the sum over samples read them (measured: 2-4x faster than
#: 1 << 24 on layers with 2x2 and 4x4 outputs)
BUDGET = 1 << 21
#: output positions from which a backward-weight convolution with the samples as groups
#: beats batched GEMMs on unfolded inputs (measured on 1 CPU thread)
GROUPED_FROM = 128


def positions_sum(layer: nn.Module, c: Tensor) -> Tensor:
    """(R, O) from per-element contributions: a Conv2d output (R, O, H, W) sums over H, W;
    a Linear output (R, ..., O) over the middle dims (positions of a sequence)."""
    if c.dim() == 2:
        return c
    return c.flatten(2).sum(2) if isinstance(layer, nn.Conv2d) else c.flatten(1, -2).sum(1)


def unit_contributions(layer: nn.Module, dz: Tensor, m: Tensor) -> Tensor:
    """C (R, O) = Σ_positions dz · m (dz may broadcast against m)."""
    return positions_sum(layer, dz * m)


def pass_units(layer: nn.Module, z: Tensor, z_ref: Tensor, m: Tensor,
               split: tuple[Tensor, ...] | None = None) -> Tensor:
    """C (R, O) of one DeepLIFT layer pass: Σ_p (z − z_ref)·m, or under RevealCancel
    Σ_p (Δz⁺·m⁺ + Δz⁻·m⁻)."""
    if split is not None:
        dzp, dzn, mp, mn = split
        return positions_sum(layer, dzp * mp + dzn * mn)
    return positions_sum(layer, (z - z_ref).mul_(m))


def conv_input(layer: nn.Conv2d, dx: Tensor, out_hw: tuple[int, ...]
               ) -> tuple[Tensor, tuple[int, int]]:
    """(input, padding) for the weight kernels: dx itself with the layer's own zero
    padding when that gives the layer's output size (no copy), else dx padded as the
    layer pads it (other padding modes, "same", timm's Conv2dSame: TensorFlow "same"
    padding done in `forward`, asymmetric) with padding 0; checked against the output."""
    pad = layer.padding
    if (layer.padding_mode == "zeros" and not isinstance(pad, str)
            and _conv_out(layer, dx.shape[-2:], pad) == tuple(out_hw)):
        return dx, (int(pad[0]), int(pad[1]))
    return _padded(layer, dx, out_hw), (0, 0)


def _padded(layer: nn.Conv2d, dx: Tensor, out_hw: tuple[int, ...]) -> Tensor:
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    padded = F.pad(dx, layer._reversed_padding_repeated_twice, mode=mode)
    if _conv_out(layer, padded.shape[-2:]) == tuple(out_hw):
        return padded
    pads: list[int] = []
    for size, k, s, d in zip(dx.shape[-2:], layer.kernel_size, layer.stride, layer.dilation,
                             strict=True):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads = [total // 2, total - total // 2] + pads  # F.pad: last dim first
    padded = F.pad(dx, pads)
    if _conv_out(layer, padded.shape[-2:]) == tuple(out_hw):
        return padded
    raise XaiCompressError(f"layer {type(layer).__name__}: its output size {tuple(out_hw)} "
                           "does not follow from its input and padding, so its weights "
                           "cannot be scored")


def _conv_out(layer: nn.Conv2d, hw: torch.Size, pad: tuple[int, ...] = (0, 0)
              ) -> tuple[int, ...]:
    return tuple((h + 2 * p - d * (k - 1) - 1) // s + 1 for h, p, k, s, d in zip(
        hw, pad, layer.kernel_size, layer.stride, layer.dilation, strict=True))


def weight_contributions(layer: nn.Module, dx: Tensor, m: Tensor, *, group: int = 1,
                         absolute: bool = True) -> Tensor:
    """Sum over samples of the per-weight contribution, shaped like `layer.weight`.

    dx (R, ...) is the layer's input minus its reference input, m (R, ...) the multiplier
    of its output; R = samples * group rows, the `group` rows of one sample (one per
    reference) are averaged before the absolute value. `absolute` takes |.| per sample.
    """
    w = layer.weight.detach()
    return _weight_sums(layer, dx, m, group, absolute) * (w.abs() if absolute else w)


def _weight_sums(layer: nn.Module, dx: Tensor, m: Tensor, group: int, absolute: bool
                 ) -> Tensor:
    """`weight_contributions` without the weight factor: the sum over rows of m_i dx_j per
    weight (over the positions that use it; |.| per sample when `absolute`), shaped like
    `layer.weight`, divided by `group`."""
    w = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        g = _linear_weights(dx, m, group, absolute, w)
    elif isinstance(layer, nn.Conv2d):
        inp, pad = conv_input(layer, dx, m.shape[-2:])
        g = _conv_weights(layer, inp, pad, m, group, absolute)
    else:
        raise TypeError(type(layer).__name__)
    return g.reshape(w.shape) / group


def pass_weights(layer: nn.Module, dx: Tensor, m: Tensor, *, group: int = 1,
                 absolute: bool = True, split: tuple[Tensor, ...] | None = None) -> Tensor:
    """`weight_contributions` of one DeepLIFT layer pass. Under RevealCancel a positive
    term w_ij Δx_j takes m⁺_i and a negative one m⁻_i: for w > 0 the sample's sum is
    G(Δx⁺, m⁺) + G(Δx⁻, m⁻), for w < 0 G(Δx⁺, m⁻) + G(Δx⁻, m⁺) (both rows of a sample merged
    before the absolute value, as for K references)."""
    if split is None:
        return weight_contributions(layer, dx, m, group=group, absolute=absolute)
    _, _, mp, mn = split
    xp, xn = dx.clamp(min=0), dx.clamp(max=0)

    def merged(a: Tensor, b: Tensor, ma: Tensor, mb: Tensor) -> Tensor:
        rows_x = torch.stack([a, b], 1).flatten(0, 1)
        rows_m = torch.stack([ma, mb], 1).flatten(0, 1)
        return 2 * weight_contributions(layer, rows_x, rows_m, group=2 * group,
                                        absolute=absolute)

    return torch.where(layer.weight.detach() > 0, merged(xp, xn, mp, mn),
                       merged(xp, xn, mn, mp))


def weight_energy(layer: nn.Module, dx: Tensor, m: Tensor, *, group: int = 1,
                  split: tuple[Tensor, ...] | None = None) -> Tensor:
    """Sum over rows and output positions of the squared contribution per unit weight,
    Σ (m_i Δx_j)², shaped like `layer.weight` and divided by `group` (with K references the
    mean over them of the squares). One weight-gradient GEMM of the squares: squaring each
    position's term before the sum means a convolution weight's terms at different
    positions cannot cancel. Under RevealCancel Δx⁺ and Δx⁻ never overlap, so the square
    of a position's term is (Δx⁺ m^±)² + (Δx⁻ m^∓)², as `pass_weights` pairs them."""
    def energy(x: Tensor, mm: Tensor) -> Tensor:  # the signed GEMM of the squares
        return _weight_sums(layer, x * x, mm * mm, group, absolute=False)

    if split is None:
        return energy(dx, m)
    _, _, mp, mn = split
    xp, xn = dx.clamp(min=0), dx.clamp(max=0)
    return torch.where(layer.weight.detach() > 0, energy(xp, mp) + energy(xn, mn),
                       energy(xp, mn) + energy(xn, mp))


def _linear_weights(dx: Tensor, m: Tensor, group: int, absolute: bool, w: Tensor) -> Tensor:
    din, dout = dx.shape[-1], m.shape[-1]
    dx = dx.expand(m.shape[:-1] + (din,)) if dx.shape[0] != m.shape[0] else dx
    xs = dx.reshape(-1, group * (dx.numel() // (dx.shape[0] * din)), din)
    ms = m.reshape(xs.shape[0], -1, dout)
    if not absolute:
        return ms.flatten(0, 1).t() @ xs.flatten(0, 1)
    if xs.shape[1] == 1:
        return ms[:, 0].abs().t() @ xs[:, 0].abs()  # |m_i Δx_j| = |m_i| |Δx_j|: one GEMM
    return _chunked(lambda a, b: _abs_sum(torch.bmm(b.transpose(1, 2), a)), xs, ms, w)


def _conv_weights(layer: nn.Conv2d, inp: Tensor, pad: tuple[int, int], m: Tensor, group: int,
                  absolute: bool) -> Tensor:
    w = layer.weight
    if inp.shape[0] != m.shape[0]:
        inp = inp.expand(m.shape[0], *inp.shape[1:])
    if not absolute:  # the plain weight gradient with Δx as input: one backward-conv
        return torch.nn.grad.conv2d_weight(inp, w.shape, m, layer.stride, pad,
                                           layer.dilation, layer.groups)
    positions = m[0, 0].numel()
    if positions >= GROUPED_FROM:
        return _per_sample_conv_grouped(layer, inp, pad, m, group)
    if pad != (0, 0):
        inp = F.pad(inp, (pad[1], pad[1], pad[0], pad[0]))
    if positions == 1 and group == 1:
        return _conv_rank_one(layer, inp, m)
    cols, ms = _conv_columns(layer, inp, m, group)
    return _chunked(_per_sample_conv, cols, ms, w)


def im2col(x: Tensor, layer: nn.Conv2d) -> Tensor:
    """F.unfold(x, kernel, dilation, stride) for padded x (B, C, H, W) -> (B, C·kh·kw, P),
    as one strided copy (2-3x faster than F.unfold on CPU)."""
    b, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s0, s1, s2, s3 = x.stride()
    view = x.as_strided((b, c, kh, kw, ho, wo), (s0, s1, s2 * dh, s3 * dw, s2 * sh, s3 * sw))
    return view.reshape(b, c * kh * kw, ho * wo)


def _conv_rank_one(layer: nn.Conv2d, padded: Tensor, m: Tensor) -> Tensor:
    """One output position per sample: Σ_s |m_s ⊗ col_s| = |M|ᵀ|Cols| per conv group."""
    cols = im2col(padded, layer)
    r, ckk, _ = cols.shape
    gr, o = layer.groups, m.shape[1]
    cols = cols.reshape(r, gr, ckk // gr).abs().transpose(0, 1)  # (groups, R, k)
    ms = m.reshape(r, gr, o // gr).abs().transpose(0, 1)         # (groups, R, o/g)
    return torch.bmm(ms.transpose(1, 2), cols)                    # (groups, o/g, k)


def _abs_sum(g: Tensor) -> Tensor:
    """sum over dim 0 of |g|, in place on the (temporary) g."""
    return g.abs_().sum(0)


def _per_sample_conv(cols: Tensor, ms: Tensor) -> Tensor:
    """sum_b |ms_b @ cols_b^T| for cols (b, groups, k, p), ms (b, groups, o, p)."""
    b, gr, k, p = cols.shape
    o = ms.shape[2]
    g = torch.bmm(ms.reshape(b * gr, o, p), cols.reshape(b * gr, k, p).transpose(1, 2))
    return _abs_sum(g.view(b, gr, o, k))


def _per_sample_conv_grouped(layer: nn.Conv2d, inp: Tensor, pad: tuple[int, int], m: Tensor,
                             group: int, budget: int = BUDGET) -> Tensor:
    """sum over samples of |per-sample weight contribution|, via one backward-weight
    convolution per chunk with the samples as convolution groups (fast for large maps)."""
    w = layer.weight
    r, c, h, wd = inp.shape
    o = m.shape[1]
    step = max(1, budget // (w.numel() * group)) * group
    out = torch.zeros_like(w, dtype=m.dtype)
    for i in range(0, r, step):
        p, mm = inp[i:i + step], m[i:i + step]
        n = len(p)
        g = torch.nn.grad.conv2d_weight(
            p.reshape(1, n * c, h, wd), (n * o, c // layer.groups, *w.shape[2:]),
            mm.reshape(1, n * o, *mm.shape[2:]), layer.stride, pad, layer.dilation,
            n * layer.groups).view(n // group, group, *w.shape)
        g = g[:, 0] if group == 1 else g.sum(1)  # a view, not a copy, for one reference
        out += g.abs_().sum(0)
    return out


def _conv_columns(layer: nn.Conv2d, padded: Tensor, m: Tensor, group: int
                  ) -> tuple[Tensor, Tensor]:
    """Unfolded inputs (B, groups, Cin/groups * kh * kw, group * P) and multipliers
    (B, groups, Cout/groups, group * P), rows of one sample merged along positions."""
    cols = im2col(padded, layer)
    r, ckk, p = cols.shape
    gr = layer.groups
    b = r // group
    o = m.shape[1]
    if group == 1:  # views: no permuted copies
        return cols.view(b, gr, ckk // gr, p), m.reshape(b, gr, o // gr, p)
    cols = cols.view(b, group, gr, ckk // gr, p).permute(0, 2, 3, 1, 4).reshape(
        b, gr, ckk // gr, group * p)
    ms = m.reshape(b, group, gr, o // gr, p).permute(0, 2, 3, 1, 4).reshape(
        b, gr, o // gr, group * p)
    return cols, ms


def _chunked(fn: Callable[[Tensor, Tensor], Tensor], xs: Tensor, ms: Tensor, w: Tensor,
             budget: int = BUDGET) -> Tensor:
    """Apply fn to sample chunks so per-sample weight-sized tensors stay within `budget`."""
    step = max(1, budget // max(1, w.numel()))
    out = None
    for i in range(0, xs.shape[0], step):
        part = fn(xs[i:i + step], ms[i:i + step])
        out = part if out is None else out + part
    assert out is not None
    return out
