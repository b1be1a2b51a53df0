"""Entropy-constrained, relevance-weighted cluster assignment (ECQx, Becking et al. 2022).

Weight sharing for an entropy-coded file: a weight i of a layer goes to the cluster c that
minimises

    R_i (w_i - c)^2 + lambda * (-log2 p_c)

where R_i is its relevance (normalised to mean 1 in its layer; 1 for criterion `none`, which
is plain entropy-constrained quantization), p_c the share of the layer's weights in cluster
c, and -log2 p_c the bits the range coder spends on an index of c. One cluster is pinned at
exactly 0: pruned weights are in it, and kept weights of low relevance move into it as
lambda grows, so sparsity is one more (cheap) cluster rather than a separate stream. The
assignment alternates with centroid updates (relevance-weighted means; the zero centroid
stays 0) and probability updates, a few rounds per layer.

One lambda for the whole model (equal slope of distortion against bits in every layer) is
found by bisection so that the entropy-coded size of the shared layers (indices, positions
and codebooks, as `export.packed` writes them) fits the budget of `avg_bits` bits per weight;
the estimate is the empirical entropy, and the chosen clustering is then measured with the
real coder and the target lowered until the real size fits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from xaicompress.encoding import Codebook, LayerEncoding, Mask
from xaicompress.encoding.codebook import CODEBOOK_BITS, round_to_dtype
from xaicompress.errors import XaiCompressError

#: the assignments weight sharing offers: nearest centroid (k-means, fixed-width indices in
#: mind) or entropy-constrained (this module)
ASSIGNMENTS = ("nearest", "entropy")
#: codebook size (the zero cluster included) of entropy-constrained sharing when `clusters`
#: is not given: lambda, not k, sets the rate; unused clusters are dropped
ECQ_CLUSTERS = 16
#: assignment / centroid rounds per layer and lambda
ROUNDS = 5
#: bisection steps on log(lambda) over 10 decades: the last step moves lambda by ~0.6%
SEARCH_STEPS = 12


@dataclass
class LayerData:
    """One layer: kept weights (n,), their relevance (n,), mean 1, and how many weights are
    pruned already (they sit in the zero cluster)."""

    values: np.ndarray
    relevance: np.ndarray
    pruned: int
    start: np.ndarray  # initial centroids; the one nearest 0 is replaced by the zero cluster


def assign(d: LayerData, lam: float, codebook_dtype: str, rounds: int = ROUNDS
           ) -> tuple[np.ndarray, np.ndarray]:
    """(codebook (k,) sorted, float32 exactly in `codebook_dtype`, with one entry 0; labels of
    the kept weights (n,)) minimising relevance-weighted error + lam * code length."""
    v = d.values.astype(np.float32)
    r = d.relevance.astype(np.float32)
    # the start centroid nearest 0 becomes the zero cluster (first entry): it is the densest
    # one for weights peaked at 0, so low-relevance weights flow into it as lambda grows
    start = np.asarray(d.start, dtype=np.float64)
    centers = np.concatenate([[0.0], np.delete(start, int(np.argmin(np.abs(start))))])
    total = v.size + d.pruned
    labels = np.zeros(v.size, dtype=np.int64)
    bits = np.zeros(len(centers))  # no code lengths yet: the first round is nearest
    counts = np.zeros(len(centers))
    for step in range(rounds + 1):
        diff = v[:, None] - centers[None, :].astype(np.float32)
        diff *= diff
        diff *= r[:, None]
        diff += (lam * bits[None, :]).astype(np.float32)
        labels = np.argmin(diff, axis=1)
        counts = np.bincount(labels, minlength=len(centers)).astype(np.float64)
        counts[0] += d.pruned
        if step == rounds:
            break
        used = counts > 0
        used[0] = True
        sums = np.bincount(labels, weights=(r * v).astype(np.float64), minlength=len(centers))
        mass = np.bincount(labels, weights=r, minlength=len(centers))
        moved = np.where(mass > 0, sums / np.maximum(mass, 1e-300), centers)
        # rounded now so that the last assignment sees the stored values
        centers = round_to_dtype(moved[used], codebook_dtype).astype(np.float64)
        centers[0] = 0.0
        # a zero cluster nobody is in yet costs as if half a weight were
        bits = -np.log2(np.maximum(counts[used], 0.5) / max(total, 1))
    used = counts > 0
    used[0] = True
    labels = (np.cumsum(used) - 1)[labels]
    centers = centers[used]
    order = np.argsort(centers, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return centers[order].astype(np.float32), rank[labels]


def entropy_bits(labels: np.ndarray, k: int, pruned: int, zero: int, codebook_dtype: str
                 ) -> float:
    """Empirical-entropy estimate of a layer's coded size: indices of every weight (pruned
    ones in the zero cluster) plus the codebook."""
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    counts[zero] += pruned
    n = counts.sum()
    p = counts[counts > 0] / max(n, 1)
    return float(-(counts[counts > 0] * np.log2(p)).sum()) + k * CODEBOOK_BITS[codebook_dtype]


def _clusterings(data: Mapping[str, LayerData], lam: float, codebook_dtype: str
                 ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
    out = {}
    total = 0.0
    for name, d in data.items():
        book, labels = assign(d, lam, codebook_dtype)
        zero = int(np.flatnonzero(book == 0)[0])
        out[name] = (book, labels)
        total += entropy_bits(labels, len(book), d.pruned, zero, codebook_dtype)
    return out, total


def search_lambda(data: Mapping[str, LayerData], target_bits: float, codebook_dtype: str
                  ) -> tuple[float, dict[str, tuple[np.ndarray, np.ndarray]], float]:
    """The smallest lambda (bisection on its log) whose estimated size is <= target_bits;
    returns (lambda, clusterings, estimated bits)."""
    scale = max(float(np.mean(np.concatenate([d.values for d in data.values()]) ** 2)), 1e-30)
    lo, hi = math.log(scale * 1e-6), math.log(scale * 1e4)
    best = _clusterings(data, math.exp(hi), codebook_dtype)
    if best[1] > target_bits:
        raise XaiCompressError(f"--avg-bits: budget infeasible, even with every weight in the "
                               f"zero cluster the layers take {best[1]:.0f} bits "
                               f"(budget {target_bits:.0f})")
    best_lam = math.exp(hi)
    small = _clusterings(data, math.exp(lo), codebook_dtype)
    if small[1] <= target_bits:
        return math.exp(lo), small[0], small[1]
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) / 2
        found = _clusterings(data, math.exp(mid), codebook_dtype)
        if found[1] <= target_bits:
            hi, best, best_lam = mid, found, math.exp(mid)
        else:
            lo = mid
    return best_lam, best[0], best[1]


def encodings(keeps: Mapping[str, np.ndarray],
              shapes: Mapping[str, tuple[int, ...]],
              found: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, LayerEncoding]:
    """The layers' encodings: codebook + indices of every weight, and a mask that is exactly
    'not in the zero cluster' (pruned weights and those the assignment zeroed)."""
    out = {}
    for name, (book, labels) in found.items():
        keep = keeps[name]
        zero = int(np.flatnonzero(book == 0)[0])
        idx = np.full(keep.size, zero, dtype=np.int64)
        idx[keep] = labels
        idx_t = torch.from_numpy(idx).reshape(shapes[name])
        kept = idx_t != zero
        mask = Mask(kept) if not bool(kept.all()) else None
        out[name] = LayerEncoding(mask, Codebook(torch.from_numpy(book.astype(np.float32)),
                                                 idx_t))
    return out


def coded_bits(encs: Mapping[str, LayerEncoding], weights: Mapping[str, torch.Tensor]) -> int:
    """Bits the packed file spends on these layers' weights (whole bytes per stream)."""
    total = 0
    for name, lc in encs.items():
        _, streams = lc.pack(lc.effective(weights[name]))
        total += 8 * sum(len(s.data) for s in streams)
    return total


#: tries to bring the real coded size within the budget (each aims lower than the last)
FIT_ATTEMPTS = 12


def share_entropy(data: Mapping[str, LayerData], keeps: Mapping[str, np.ndarray],
                  weights: Mapping[str, torch.Tensor], avg_bits: float, codebook_dtype: str
                  ) -> tuple[dict[str, LayerEncoding], dict[str, object]]:
    """Entropy-constrained sharing of every layer of `data` under `avg_bits` coded bits per
    weight (all weights of the layers, pruned ones included: indices, positions and
    codebooks as packed). keeps: layer -> flat bool of the weights kept so far; weights:
    layer -> weight tensor (its shape). Returns the layers' encodings and what was chosen."""
    if not (math.isfinite(avg_bits) and avg_bits > 0):
        raise XaiCompressError(f"--avg-bits {avg_bits}: expected a positive number of bits")
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    budget = float(avg_bits) * sum(k.size for k in keeps.values())
    target = budget
    for attempt in range(FIT_ATTEMPTS):
        lam, found, estimate = search_lambda(data, target, codebook_dtype)
        encs = encodings(keeps, shapes, found)
        real = coded_bits(encs, weights)
        if real <= budget:
            break
        # the coder's real size is a little above the entropy estimate: aim lower, by more
        # each time (near the 16-value codebooks' saturation a lower target can return the
        # same assignment; QAT's re-assignment at 1.8 bits failed 8 equal steps)
        target -= ((real - budget) + 8 * len(data)) * 2 ** attempt
    else:
        raise XaiCompressError(f"--avg-bits {avg_bits}: could not fit the entropy-coded "
                               "layers in the budget")
    per_layer = {n: coded_bits({n: lc}, weights) for n, lc in encs.items()}
    info: dict[str, object] = {
        "assignment": "entropy", "budget_bits": budget, "used_bits": real,
        "estimated_bits": estimate, "lambda": lam,
        "coded_bits_per_weight": {n: b / max(1, keeps[n].size) for n, b in per_layer.items()},
        "zero_fraction": {n: 1.0 - (lc.mask.kept / lc.mask.keep.numel() if lc.mask else 1.0)
                          for n, lc in encs.items()}}
    return encs, info
