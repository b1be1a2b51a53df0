"""DeepLIFT reference inputs: zeros (black), mean, blur, samples:N, a tensor or a callable.

A reference is resolved once per scoring run into either
- a *constant* stack of K reference images (K, C, H, W) shared by every input (zeros,
  mean, samples:N, a tensor); with K > 1 each input is attributed against each reference
  and the contributions are averaged (DeepLiftShap), or
- a *per-sample* function x (N, C, H, W) -> reference (N, C, H, W) (blur, a callable).

All references live in the model's (normalised) input space. `zeros` is a black image in
PIXEL space, i.e. ``-mean / std`` per channel, which needs the dataset normalisation.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from xaicompress.errors import XaiCompressError

KINDS = ("zeros", "mean", "blur", "samples:N")
_SAMPLES = re.compile(r"^samples[:=_]?(\d+)$")
#: most references per input for samples:N (each costs one more pass per sample)
MAX_REFERENCES = 256
#: widest blur accepted, in pixels (the kernel is cut at the image size anyway)
MAX_SIGMA = 1000.0


@dataclass
class ReferenceSpec:
    """What the user asked for: kind in zeros|mean|blur|samples|tensor|callable."""

    kind: str
    count: int = 1
    value: Tensor | Callable[[Tensor], Tensor] | None = None

    def describe(self) -> str:
        if self.kind == "samples":
            return f"samples:{self.count}"
        return self.kind


@dataclass
class Reference:
    """A resolved reference: exactly one of `constant` (K, C, H, W) and `per_sample` is set."""

    spec: ReferenceSpec
    constant: Tensor | None = None
    per_sample: Callable[[Tensor], Tensor] | None = None

    @property
    def group(self) -> int:
        """Number of references each input is attributed against (K)."""
        return 1 if self.constant is None else int(self.constant.shape[0])


def parse_reference(value: Any) -> ReferenceSpec:
    """Parse the `reference` option: a name, `samples:N` (also `samples8`, `samples=8`,
    `samples_8`), a tensor (C, H, W) / (K, C, H, W), or a callable x -> reference."""
    if isinstance(value, Tensor):
        if value.dim() not in (3, 4) or not value.is_floating_point():
            raise XaiCompressError(f"reference tensor of shape {tuple(value.shape)}: expected "
                                   "a float tensor (C, H, W) or (K, C, H, W)")
        return ReferenceSpec("tensor", 1 if value.dim() == 3 else value.shape[0], value)
    if callable(value):
        return ReferenceSpec("callable", 1, value)
    text = str(value).strip().lower()
    if text in ("zeros", "zero", "black"):
        return ReferenceSpec("zeros")
    if text in ("mean", "blur"):
        return ReferenceSpec(text)
    m = _SAMPLES.match(text)
    if m:
        n = int(m.group(1))
        if not 1 <= n <= MAX_REFERENCES:
            raise XaiCompressError(f"reference={value!r}: samples:N needs 1 <= N <= "
                                   f"{MAX_REFERENCES}")
        return ReferenceSpec("samples", n)
    raise XaiCompressError(f"reference={value!r}: expected one of zeros, mean, blur, samples:N "
                           "(or samplesN), a tensor or a callable")


def resolve_reference(spec: ReferenceSpec, loader: DataLoader, first: Tensor, *,
                      pixel_mean: Sequence[float] | None = None,
                      pixel_std: Sequence[float] | None = None, sigma: float | None = None,
                      seed: int = 0) -> Reference:
    """Turn `spec` into tensors for inputs shaped like `first` (N, C, H, W).

    `mean` and `samples:N` read `loader.dataset` (the whole dataset the loader draws from,
    identical on every rank, so distributed runs agree without a collective).
    """
    shape = tuple(first.shape[1:])
    dtype = first.dtype
    if spec.kind == "zeros":
        return Reference(spec, black_image(shape, pixel_mean, pixel_std, dtype).unsqueeze(0))
    if spec.kind == "tensor":
        t = spec.value.to(dtype)  # type: ignore[union-attr]
        t = t.unsqueeze(0) if t.dim() == 3 else t
        if tuple(t.shape[1:]) != shape:
            raise XaiCompressError(f"reference tensor of shape {tuple(t.shape)}: expected "
                                   f"(C, H, W) = {shape}")
        return Reference(spec, t.detach())
    if spec.kind == "callable":
        fn = spec.value

        def checked(x: Tensor) -> Tensor:
            r = fn(x)  # type: ignore[misc]
            if not isinstance(r, Tensor) or r.shape != x.shape:
                raise XaiCompressError("reference callable: must return a tensor shaped like "
                                       f"its input {tuple(x.shape)}")
            return r.detach().to(x.dtype)

        return Reference(spec, per_sample=checked)
    if spec.kind == "blur":
        s = sigma if sigma is not None else max(0.5, shape[-1] / 10)
        return Reference(spec, per_sample=lambda x: gaussian_blur(x, check_sigma(s)))
    from xaicompress.data import dataset_tensors

    dataset = loader.dataset
    if spec.kind == "mean":
        x, _ = dataset_tensors(dataset)
        return Reference(spec, x.to(torch.float64).mean(0, keepdim=True).to(dtype))
    # samples:N: N seeded-random images of the dataset, averaged over as DeepLiftShap does
    size = len(dataset)  # type: ignore[arg-type]
    n = min(spec.count, size)
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(size, generator=g)[:n].tolist()
    refs = torch.stack([torch.as_tensor(dataset[i][0]) for i in idx]).to(dtype)
    return Reference(spec, refs)


def black_image(shape: tuple[int, ...], pixel_mean: Sequence[float] | None,
                pixel_std: Sequence[float] | None, dtype: torch.dtype = torch.float32) -> Tensor:
    """A black image (C, H, W) in normalised input space: ``(0 - mean) / std`` per channel.

    Without the dataset normalisation the input space's zero is used, with a warning.
    """
    c = shape[0]
    if pixel_mean is None or pixel_std is None:
        warnings.warn("deeplift reference=zeros: dataset normalisation unknown (pass "
                      "pixel_mean/pixel_std, or the DatasetBundle to compute_relevance); using "
                      "an all-zero input tensor", stacklevel=3)
        return torch.zeros(shape, dtype=dtype)
    mean = _per_channel(pixel_mean, c, "pixel_mean")
    std = _per_channel(pixel_std, c, "pixel_std")
    if (std <= 0).any():
        raise XaiCompressError(f"pixel_std={tuple(pixel_std)}: expected positive values")
    return (-mean / std).view(c, 1, 1).expand(shape).to(dtype).clone()


def _per_channel(v: Sequence[float] | Tensor | float, c: int, name: str) -> Tensor:
    t = torch.as_tensor(v, dtype=torch.float64).reshape(-1)
    if t.numel() == 1:
        t = t.expand(c)
    if t.numel() != c:
        raise XaiCompressError(f"{name}={tuple(t.tolist())}: expected {c} values, one per "
                               "channel")
    return t


def check_sigma(sigma: float) -> float:
    """A blur width in pixels, in (0, MAX_SIGMA]."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(
            sigma) or not 0 < sigma <= MAX_SIGMA:
        raise XaiCompressError(f"sigma={sigma!r}: expected a blur width in pixels in "
                               f"(0, {MAX_SIGMA:g}]")
    return float(sigma)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (N, C, H, W) with replicate borders (linear, so blurring
    normalised inputs equals normalising blurred pixels). The kernel is cut at the image
    size, so a huge sigma costs no more than the image (it tends to the mean)."""
    radius = max(1, min(int(math.ceil(3 * check_sigma(sigma))), max(x.shape[-2:]) - 1))
    grid = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(grid ** 2) / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    out = x
    for dim in (2, 3):
        size = out.shape[dim]
        r = min(radius, size - 1) if size > 1 else 0
        kk = k[radius - r: radius + r + 1]
        kk = kk / kk.sum()
        if dim == 2:
            weight = kk.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
            pad = (0, 0, r, r)
        else:
            weight = kk.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
            pad = (r, r, 0, 0)
        out = F.conv2d(F.pad(out, pad, mode="replicate"), weight, groups=c)
    return out
