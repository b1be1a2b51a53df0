"""Weight sharing: relevance-weighted k-means per layer (Han et al., Deep Compression).

Every prunable layer's kept weights are clustered into k shared values (the codebook) with
scikit-learn's `KMeans`, initialised linearly over [min, max] (found best by Deep
Compression) and weighted by the square root of the criterion's per-weight scores
(`WEIGHT_POWER`), so the centroids sit where the weights that matter are. Weights already
pruned (mask False) are left out of the clustering and stay exactly zero through the mask:
a fixed zero, not a drifting cluster.

With `avg_bits` the number of clusters per layer is chosen by the shared bit-allocation
solver (`quant.allocate.allocate_bits`) from a table of relevance-weighted clustering
errors, so the size budget goes where it lowers the weighted error most.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from xaicompress.calibration import correct_bias, reestimate_batchnorm
from xaicompress.checkpoint import Checkpoint
from xaicompress.distill import check_distill
from xaicompress.encoding import Codebook, LayerEncoding
from xaicompress.encoding.bitpack import index_bits
from xaicompress.encoding.codebook import CODEBOOK_BITS, CODEBOOK_DTYPES, round_to_dtype
from xaicompress.encoding.dense import grid8_round
from xaicompress.errors import XaiCompressError
from xaicompress.progress import track
from xaicompress.quant.allocate import allocate_bits
from xaicompress.quant.entropy_share import ASSIGNMENTS, ECQ_CLUSTERS, LayerData, share_entropy
from xaicompress.quant.share_finetune import finetune_shared
from xaicompress.quant.share_qat import FINETUNES, finetune_qat
from xaicompress.relevance import Criterion, Relevance, compute_relevance, get_criterion
from xaicompress.relevance.base import prunable_layers

MAX_CLUSTERS = 256
#: default exponent of the per-weight relevance before it weights the k-means. Why not 1:
#: relevance scores (|w x m| summed over samples) are heavy-tailed, and at k = 4 the raw scores
#: pulled centroids onto the few largest weights; the square root kept k = 2's gain and
#: recovered most of k = 4's loss (deeplift, 5 seeds, no fine-tuning: lenet5 k = 4 -2.7 ->
#: -1.9 pt, lenet300 k = 4 -9.5 -> -2.8 pt; k = 2 within 1 pt). See
#: docs/results/weight_sharing.md for every exponent and mix tried.
WEIGHT_POWER = 0.5
#: k-means initialisations (`initial_centroids`); linear is the default, as Deep Compression
INITS = ("linear", "quantile", "kmeans++")
#: how the criterion's per-weight scores are scaled across layers (`weight_scope`): "layer"
#: to mean 1 in every layer (each layer's distortion counts as plain squared error, the
#: scores only say which weights of a layer matter), "global" to mean 1 over the kept
#: weights of all shared layers (a layer whose weights score higher gets more bits under
#: the one lambda of entropy-constrained sharing: Hessian-weighted ECSQ, Choi et al. 2017)
WEIGHT_SCOPES = ("layer", "global")
#: the cluster counts `avg_bits` chooses from: k = 2^b, b = 1..8
ALLOC_BITS = tuple(range(1, 9))
# Why a floor: a weight with zero relevance must still be clustered (it is stored too), and
# sklearn needs every cluster's total weight > 0 to compute its centroid.
_WEIGHT_FLOOR = 1e-6


# ------------------------------------------------------------------ one layer
def _nearest(centers: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index (int64) of the nearest of sorted `centers` (k,) for every value (n,)."""
    if len(centers) == 1:
        return np.zeros(values.shape, dtype=np.int64)
    c = centers.astype(np.float64)
    mid = (c[1:] + c[:-1]) / 2
    return np.searchsorted(mid, values.astype(np.float64), side="left").astype(np.int64)


def initial_centroids(values: np.ndarray, sample_weight: np.ndarray, k: int, init: str,
                      seed: int = 0) -> np.ndarray:
    """k starting centroids (k,) float64 for 1-D `values` (n,) with `sample_weight` (n,).

    linear: evenly over [min, max] (Deep Compression's choice; it keeps centroids on the
    rare large weights); quantile: the sample-weighted quantiles (i + 1/2) / k, i.e. density
    initialisation; kmeans++: sklearn's weighted k-means++ seeding.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if init == "linear":
        return np.linspace(float(v.min()), float(v.max()), k)
    sw = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
    if init == "quantile":
        order = np.argsort(v, kind="stable")
        cum = np.cumsum(sw[order])
        at = (np.arange(k) + 0.5) / k * cum[-1]
        return v[order][np.minimum(np.searchsorted(cum, at), v.size - 1)]
    if init == "kmeans++":
        from sklearn.cluster import kmeans_plusplus  # heavy import, only this init needs it

        centers, _ = kmeans_plusplus(v.reshape(-1, 1), k, sample_weight=sw, random_state=seed)
        return np.sort(centers.ravel())
    raise XaiCompressError(f"--init {init!r}: expected one of {', '.join(INITS)}")


def cluster_weights(values: np.ndarray, sample_weight: np.ndarray, k: int, *,
                    codebook_dtype: str = "fp16", seed: int = 0, init: str = "linear"
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Cluster 1-D `values` (n,) into `k` shared values, weighted by `sample_weight` (n,),
    starting from `initial_centroids(..., init)`.

    Returns (codebook float32 (k',) sorted ascending, every entry exactly representable in
    `codebook_dtype`; labels int64 (n,) with values ~ codebook[labels]). k' = k, or the
    number of distinct values (after rounding to the codebook dtype) when there are fewer.
    Every codebook entry is used by at least one value, so the layer holds exactly k' values.
    """
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    if v.size == 0:
        return np.zeros(1, dtype=np.float32), np.zeros(0, dtype=np.int64)
    vr = round_to_dtype(v, codebook_dtype)
    distinct = np.unique(vr)
    if len(distinct) <= k:
        return distinct.astype(np.float32), _nearest(distinct, vr)
    # sklearn takes ~1 s to import; a run that never clusters should not pay for it
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    sw = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
    start = initial_centroids(v, sw, k, init, seed).reshape(-1, 1)
    km = KMeans(n_clusters=k, init=start, n_init=1, random_state=seed)
    # One thread: 1-D k-means gains little from OpenMP, which on a shared CPU spins and slows
    # everything tenfold; and sums in one fixed order make the centroids independent of the
    # machine's core count.
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        # Duplicate points: sklearn warns when it finds fewer distinct clusters; the repair
        # below restores exactly k used values.
        warnings.simplefilter("ignore")
        km.fit(v.reshape(-1, 1).astype(np.float64), sample_weight=sw)
    centers = np.unique(round_to_dtype(km.cluster_centers_.ravel(), codebook_dtype))
    return _repair(centers, vr, sw, k)


def _repair(centers: np.ndarray, vr: np.ndarray, sw: np.ndarray, k: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Make every one of k codebook entries used and distinct.

    Rounding to fp16 can merge two centroids and k-means can leave a cluster empty; each
    missing entry is refilled with the value whose weighted error is largest (it then sits
    exactly on a centroid), as k-means++ would seed it.
    """
    for _ in range(4 * k):
        labels = _nearest(centers, vr)
        used = np.unique(labels)
        if len(used) < len(centers):
            centers = centers[used]
            labels = _nearest(centers, vr)
        if len(centers) >= k:
            break
        err = sw * (vr.astype(np.float64) - centers[labels]) ** 2
        j = int(np.argmax(err))
        if err[j] <= 0:
            break
        centers = np.unique(np.append(centers, vr[j]))
    labels = _nearest(centers, vr)
    return centers.astype(np.float32), labels


def layer_sample_weights(rel: Relevance | None, name: str, shape: tuple[int, ...],
                         keep: np.ndarray, *, power: float = 1.0, mix: float = 0.0
                         ) -> np.ndarray:
    """Per-weight |scores| of layer `name` at the kept positions (flat bool `keep`),
    normalised to mean 1 over the layer's kept weights (uniform when none are known).

    power: scores raised to this power first (< 1 flattens them); mix: the share of a uniform
    weight mixed in, (1 - mix) * r + mix (0 = pure relevance, 1 = plain k-means).
    """
    n = int(keep.sum())
    if rel is None or name not in rel.weights:
        return np.ones(n)
    r = rel.weights[name].detach().float()
    if tuple(r.shape) != tuple(shape):
        raise XaiCompressError(f"relevance of layer {name!r} has shape {tuple(r.shape)}, the "
                               f"weight is {tuple(shape)}")
    r = np.abs(r.reshape(-1).numpy().astype(np.float64))[keep]
    r = np.nan_to_num(r, nan=0.0, posinf=0.0)
    mean = r.mean() if n else 0.0
    if not mean > 0:
        return np.ones(n)
    r = r / mean
    if power != 1.0:
        r = r ** power
        r = r / r.mean()
    r = (1.0 - mix) * r + mix
    return np.maximum(r, _WEIGHT_FLOOR)


# ----------------------------------------------------------------- the step
def share_weights(ckpt: Checkpoint, criterion: Criterion | str, bundle: Any, *,
                  clusters: int | Mapping[str, int] | None = None,
                  avg_bits: float | None = None, size_kb: float | None = None,
                  finetune_epochs: float = 0,
                  samples: int = 512, codebook_dtype: str = "fp16", seed: int = 0,
                  finetune_lr: float | None = None,
                  relevance: Relevance | None = None, init: str = "linear",
                  weight_power: float = WEIGHT_POWER, uniform_mix: float = 0.0,
                  assignment: str = "nearest", finetune: str = "centroids",
                  bias_correction: bool = True, bn_recalibration: bool = True,
                  distill: float = 0.0, weight_scope: str = "layer") -> Checkpoint:
    """Share the weights of every Conv2d/Linear layer of a copy of `ckpt`.

    criterion: weights the k-means (`none` = plain k-means); bundle: a DatasetBundle (its
    train split scores relevance and fine-tunes) or a training Dataset.
    clusters: k for every layer, or layer -> k; exclusive with `avg_bits` (B), which picks
    k = 2^b per layer with `allocate_bits` under the size of B bits everywhere.
    finetune_epochs: then train the centroids (`finetune_shared`, lr `finetune_lr`; its best
    state chosen on `bundle.val` when the bundle has a validation split).
    relevance: scores already computed by `criterion` on this model (skips scoring; lets a
    caller share one model at several k without rescoring).
    init: k-means start (`INITS`); weight_power, uniform_mix: shape the per-weight sample
    weights (`layer_sample_weights`; 1 and 0 = the criterion's scores as they are; the
    default square root is `WEIGHT_POWER`'s).
    assignment: "nearest" (k-means; `avg_bits` counts fixed-width indices, MILP allocation)
    or "entropy" (`quant.entropy_share`: relevance-weighted entropy-constrained assignment
    with a zero cluster, one lambda under `avg_bits` entropy-coded bits per weight, pruned
    weights and the codebooks included; `clusters` = codebook size, default `ECQ_CLUSTERS`).
    size_kb (entropy only, instead of avg_bits): the packed file's size in KiB; the
    assignment gets the bits per weight the rest of the file (header, biases) leaves
    (`size_budget_bits`), so the ratio holds whatever number of weights pruning kept.
    finetune: "centroids" (train the centroids, indices fixed: `finetune_shared`) or "qat"
    (entropy assignment only: quantization-aware training of latent weights with the
    assignment recomputed under the same budget during training and the best state on
    `bundle.val`, `quant.share_qat`).
    bias_correction / bn_recalibration: then, on calibration samples of the training data,
    shift every layer's bias so its per-channel output mean is the float model's, and
    re-estimate the BatchNorm statistics (`xaicompress.calibration`), before fine-tuning.
    distill: weight of distillation from the input model in the fine-tuning loss (either
    kind; `xaicompress.distill`, 0 = off).
    weight_scope: "layer" or "global" (`WEIGHT_SCOPES`): the sample weights normalised per
    layer or over all shared layers.
    Result: `state.get(layer).codebook` float32 (k,), `.indices` int64 (weight shape), model
    weights = codebook[indices] * mask. The input is not modified.
    """
    _check_budget(clusters, avg_bits, assignment, size_kb)
    _check_options(codebook_dtype, finetune_epochs, init, weight_power, uniform_mix,
                   weight_scope)
    _check_finetune(finetune, assignment, distill)
    train_set: Dataset = getattr(bundle, "train", bundle)
    crit = get_criterion(criterion) if isinstance(criterion, str) else criterion

    out = ckpt.copy()
    out.state.apply(out.model)
    layers = prunable_layers(out.model)
    ks = _requested_clusters(clusters, layers) if clusters is not None else None
    for name in layers:
        lc = out.state.layers.get(name)
        if lc is not None and lc.grid is not None:
            raise XaiCompressError(f"layer {name!r} is integer-quantized ({lc.grid.bits} bits); "
                                   "share the weights of a float checkpoint instead")
    # The bundle, when given, tells DeepLIFT the data's normalisation (its reference).
    rel = relevance if relevance is not None else compute_relevance(
        out.model, crit, bundle if hasattr(bundle, "train") else train_set, samples=samples,
        seed=seed)

    data = _layer_data(out, layers, rel, weight_power, uniform_mix, weight_scope)

    results: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    table: dict[str, Any] = {}
    before, assigner = {n: m.weight.detach().clone() for n, m in layers.items()}, None
    if assignment == "entropy":
        avg_bits = float(avg_bits) if size_kb is None else size_budget_bits(
            out, layers, data, float(size_kb), clusters, codebook_dtype, seed, init)
        assigner = entropy_assigner(data, avg_bits, clusters, codebook_dtype, seed, init)
        table = _share_entropy(out, layers, assigner)
    elif ks is None:
        assert avg_bits is not None
        results, table = _allocate(data, float(avg_bits), codebook_dtype, seed, init)
    else:
        for name in track(list(layers), "k-means per layer"):
            v, sw, _ = data[name]
            results[name] = cluster_weights(v, sw, ks[name], codebook_dtype=codebook_dtype,
                                            seed=seed, init=init)

    chosen = {}
    for name, m in layers.items():
        if assignment == "entropy":
            k = out.state.layers[name].codebook.k
            chosen[name] = {"k": k, "bits": index_bits(k), "weights": int(m.weight.numel())}
            continue
        codebook, labels = results[name]
        keep = data[name][2]
        idx = np.zeros(keep.size, dtype=np.int64)
        idx[keep] = labels
        out.state.get(name).weights = Codebook(torch.from_numpy(codebook.astype(np.float32)),
                                               torch.from_numpy(idx).reshape(m.weight.shape))
        chosen[name] = {"k": int(len(codebook)), "bits": index_bits(len(codebook)),
                        "weights": int(keep.sum())}
    out.state.apply(out.model)
    calibrated = _calibrate(out, ckpt, train_set, list(layers), seed, bias_correction,
                            bn_recalibration)
    out.history.append({"stage": "share", "criterion": repr(crit), "clusters": clusters
                        if not isinstance(clusters, Mapping) else dict(clusters),
                        "avg_bits": avg_bits, "size_kb": size_kb, "layers": chosen,
                        "samples": samples,
                        "codebook_dtype": codebook_dtype, "seed": seed, "init": init,
                        "weight_power": weight_power, "uniform_mix": uniform_mix,
                        "weight_scope": weight_scope,
                        "assignment": assignment, "distill": distill, **calibrated,
                        **table})
    if finetune_epochs > 0:
        out = _finetune(out, bundle, finetune, finetune_epochs, finetune_lr, seed,
                        (before, data, assigner), (distill, ckpt.model))
    if assignment == "entropy":
        round_vectors(out, codebook_dtype)
    return out


def _layer_data(out: Checkpoint, layers: Mapping[str, Any], rel: Relevance,
                weight_power: float, uniform_mix: float, weight_scope: str
                ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """layer -> (kept weights, their sample weights, flat keep mask)."""
    data = {}
    for name, m in layers.items():
        w = m.weight.detach().float().reshape(-1).cpu().numpy()
        lc = out.state.layers.get(name)
        keep = (lc.mask.keep.reshape(-1).numpy() if lc is not None and lc.mask is not None
                else np.ones(w.size, dtype=bool))
        data[name] = (w[keep], layer_sample_weights(rel, name, tuple(m.weight.shape), keep,
                                                      power=weight_power, mix=uniform_mix),
                      keep)
    if weight_scope == "global":
        _scale_across_layers(rel, data, weight_power)
    return data


def _scale_across_layers(rel: Relevance, data: dict[str, Any], power: float) -> None:
    """Rescale every layer's sample weights (mean 1 in the layer) by the layer's mean
    |score|^power over the mean of all shared layers' kept weights, in place: the scores'
    scale across layers comes back. Layers without scores keep mean 1."""
    means = {}
    for name, (v, _, keep) in data.items():
        r = rel.weights.get(name)
        if r is None or not v.size:
            continue
        a = np.abs(r.detach().double().reshape(-1).numpy()[keep])
        means[name] = (float(np.mean(np.nan_to_num(a, nan=0.0, posinf=0.0) ** power)), a.size)
    total = sum(m * n for m, n in means.values()) / max(sum(n for _, n in means.values()), 1)
    if not total > 0:
        return
    for name, (m, _) in means.items():
        v, sw, keep = data[name]
        data[name] = (v, np.maximum(sw * (m / total), _WEIGHT_FLOOR), keep)


def _finetune(out: Checkpoint, bundle: Any, finetune: str, epochs: float, lr: float | None,
              seed: int, qat: tuple[Mapping[str, torch.Tensor], Mapping[str, Any], Any],
              distill: tuple[float, torch.nn.Module]) -> Checkpoint:
    """Centroid fine-tuning, or (finetune qat) quantization-aware training from the weights
    before sharing with the entropy assignment: qat = (weights, the layers' (kept weights,
    sample weights, flat keep), assigner); distill = (weight, teacher: the model before
    sharing)."""
    train_set: Dataset = getattr(bundle, "train", bundle)
    before, data, assigner = qat
    if finetune != "qat" or assigner is None:
        # the best fine-tuning state is chosen on the validation split when the bundle has one
        return finetune_shared(out, train_set, epochs=epochs, lr=lr, seed=seed,
                               val_set=getattr(bundle, "val", None), distill=distill[0],
                               teacher=distill[1])
    rel = {}
    for n, (_, sw, keep) in data.items():
        r = np.zeros(keep.size, dtype=np.float32)
        r[keep] = sw
        rel[n] = torch.from_numpy(r).reshape(before[n].shape)
    return finetune_qat(out, before, rel, assigner, train_set, getattr(bundle, "val", None),
                        epochs=epochs, lr=lr, seed=seed, distill=distill[0],
                        teacher=distill[1])


def round_vectors(ckpt: Checkpoint, codebook_dtype: str) -> None:
    """Round the model's float vectors (biases, norm parameters and statistics: every float
    tensor of at most one dimension), in place, so that the packed file stores them
    losslessly at fewer bits (`Dense`): the biases of the Conv2d / Linear layers to an int8
    grid (`grid8_round`: 255 levels of max |b| / 127, one byte a bias; a bias moves by at
    most max |b| / 254), everything else (norms, their statistics) to the codebook dtype
    (fp16: at most 2^-11 of itself). At 100x on LeNet-5 the fp32 biases were ~18% of the
    file, ~8% as fp16 (200 of 2,441 bytes), ~4.5% as int8. codebook_dtype fp32: everything
    stays as it is."""
    if codebook_dtype == "fp32":
        return
    biases = {id(m.bias) for m in prunable_layers(ckpt.model).values()
              if isinstance(getattr(m, "bias", None), torch.Tensor)}
    with torch.no_grad():
        for t in (*ckpt.model.parameters(), *ckpt.model.buffers()):
            if t.is_floating_point() and t.dim() <= 1:
                new = grid8_round(t) if id(t) in biases else torch.from_numpy(
                    round_to_dtype(t.detach().cpu().numpy(), codebook_dtype))
                t.copy_(new.to(t.dtype))


def _check_options(codebook_dtype: str, finetune_epochs: float, init: str,
                   weight_power: float, uniform_mix: float, weight_scope: str = "layer"
                   ) -> None:
    if codebook_dtype not in CODEBOOK_DTYPES:
        raise XaiCompressError(f"--codebook {codebook_dtype!r}: expected fp16 or fp32")
    if finetune_epochs < 0:
        raise XaiCompressError(f"--finetune-epochs {finetune_epochs}: expected >= 0")
    if init not in INITS:
        raise XaiCompressError(f"--init {init!r}: expected one of {', '.join(INITS)}")
    if not (math.isfinite(weight_power) and weight_power > 0):
        raise XaiCompressError(f"weight power {weight_power}: expected a positive number")
    if not (math.isfinite(uniform_mix) and 0 <= uniform_mix <= 1):
        raise XaiCompressError(f"uniform mix {uniform_mix}: expected a number from 0 to 1")
    if weight_scope not in WEIGHT_SCOPES:
        raise XaiCompressError(f"--weight-scope {weight_scope!r}: expected one of "
                               f"{', '.join(WEIGHT_SCOPES)}")


def _check_finetune(finetune: str, assignment: str, distill: float) -> None:
    check_distill(distill)
    if finetune not in FINETUNES:
        raise XaiCompressError(f"--finetune {finetune!r}: expected one of "
                               f"{', '.join(FINETUNES)}")
    if finetune == "qat" and assignment != "entropy":
        raise XaiCompressError("--finetune qat: quantization-aware sharing re-runs the "
                               "entropy-constrained assignment; use --assignment entropy")


def _check_budget(clusters: Any, avg_bits: float | None, assignment: str,
                  size_kb: float | None = None) -> None:
    if assignment not in ASSIGNMENTS:
        raise XaiCompressError(f"--assignment {assignment!r}: expected one of "
                               f"{', '.join(ASSIGNMENTS)}")
    if size_kb is not None and (assignment != "entropy" or avg_bits is not None or not (
            math.isfinite(size_kb) and size_kb > 0)):
        raise XaiCompressError(f"--size-kb {size_kb}: a positive size, the budget of "
                               "entropy-constrained sharing (--assignment entropy) instead of "
                               "--avg-bits")
    if assignment == "entropy":
        if avg_bits is None and size_kb is None:
            raise XaiCompressError("entropy-constrained sharing needs --avg-bits B (entropy-"
                                   "coded bits per weight) or --size-kb S")
        if clusters is not None and (isinstance(clusters, Mapping) or not (
                isinstance(clusters, (int, np.integer)) and 2 <= clusters <= MAX_CLUSTERS)):
            raise XaiCompressError(f"--clusters {clusters!r}: entropy-constrained sharing "
                                   f"takes one codebook size from 2 to {MAX_CLUSTERS}")
        return
    if (clusters is None) == (avg_bits is None):
        raise XaiCompressError("weight sharing: give exactly one of --clusters K and "
                               "--avg-bits B")


#: bytes the file may grow after the size budget is fitted (a re-assignment's stream lengths
#: in the header); kept free below size_kb
SIZE_MARGIN_BYTES = 8


def size_budget_bits(out: Checkpoint, layers: Mapping[str, Any],
                     data: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                     size_kb: float, clusters: Any, codebook_dtype: str, seed: int, init: str
                     ) -> float:
    """The coded bits per weight of the shared layers under which the packed file (header,
    biases at the stage's rounding, every stream) takes at most size_kb KiB less
    `SIZE_MARGIN_BYTES`: the rest of the file is measured, then the real file of the
    assignment is packed and the bits lowered by any excess (a few rounds)."""
    from xaicompress.export.packed import packed_report  # export imports quant: call time

    target = 8 * (1024 * size_kb - SIZE_MARGIN_BYTES)
    n = sum(d[2].size for d in data.values())
    trial = out.copy()
    round_vectors(trial, codebook_dtype)
    rep = packed_report(trial)
    bits = (target - (8 * rep.file_bytes - sum(rep.tensor_bits.get(f"{name}.weight", 0)
                                                for name in layers))) / max(n, 1)
    weights = {name: m.weight.detach() for name, m in layers.items()}
    for _ in range(6):
        if not bits > 0:
            break
        encs, _ = entropy_assigner(data, bits, clusters, codebook_dtype, seed, init)(weights)
        for name, lc in encs.items():
            trial.state.get(name).mask, trial.state.get(name).weights = lc.mask, lc.weights
        trial.state.apply(trial.model)
        rep = packed_report(trial)
        real = 8 * rep.file_bytes
        if real <= target:
            return bits
        # below what the weights really took (the assignment may not use all it was given)
        used = sum(rep.tensor_bits.get(f"{name}.weight", 0) for name in layers)
        bits = min(bits, used / max(n, 1)) - (real - target) / max(n, 1)
    raise XaiCompressError(f"--size-kb {size_kb}: the file does not fit (the rest of the "
                           "model alone is about that large)")


def entropy_assigner(data: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                     avg_bits: float, clusters: Any, codebook_dtype: str, seed: int, init: str
                     ) -> Callable[[Mapping[str, torch.Tensor]],
                                   tuple[dict[str, LayerEncoding], dict[str, Any]]]:
    """The entropy-constrained assignment of these layers as a function of their weights:
    layer -> weight (the module's shape) -> (layer -> encoding within `avg_bits` coded bits
    per weight, what was chosen). data: layer -> (kept weights, sample weights, flat keep);
    the sample weights (relevance) and the kept positions stay those of `data`, so the
    quantization-aware training (`share_qat`) re-assigns its latent weights with it."""
    k = int(clusters) if clusters is not None else ECQ_CLUSTERS
    keeps = {n: d[2] for n, d in data.items()}

    def assign(weights: Mapping[str, torch.Tensor], starts: Mapping[str, Any] | None = None
               ) -> tuple[dict[str, LayerEncoding], dict[str, Any]]:
        """starts: layer -> start centroids (default: `initial_centroids` of `init`)."""
        prepared = {}
        for name, (_, sw, keep) in data.items():
            v = weights[name].detach().float().reshape(-1).cpu().numpy()[keep]
            # the assignment's own rounds are Lloyd's (lambda = 0 is k-means): a start suffices
            start = (np.asarray(starts[name], dtype=np.float64) if starts is not None
                     else initial_centroids(v, sw, k, init, seed) if v.size else np.zeros(1))
            prepared[name] = LayerData(v, sw, int(keep.size - keep.sum()), start)
        return share_entropy(prepared, keeps, weights, avg_bits, codebook_dtype)

    return assign


def _share_entropy(out: Checkpoint, layers: Mapping[str, Any],
                   assign: Callable[[Mapping[str, torch.Tensor]],
                                    tuple[dict[str, LayerEncoding], dict[str, Any]]]
                   ) -> dict[str, Any]:
    """Entropy-constrained sharing of every layer into `out.state` (codebook and the mask
    of the zero cluster); returns the history fields."""
    encs, info = assign({n: m.weight.detach() for n, m in layers.items()})
    for name, lc in encs.items():
        out.state.get(name).mask = lc.mask
        out.state.get(name).weights = lc.weights
    return info


def _calibrate(out: Checkpoint, reference: Checkpoint, train_set: Dataset, layers: list[str],
               seed: int, bias_correction: bool, bn_recalibration: bool) -> dict[str, Any]:
    """Bias correction against `reference` and BatchNorm re-estimation of `out` (in place);
    what was done, for the history. Without data (a data-free criterion and no training
    set) there is nothing to calibrate on."""
    if train_set is None:
        bias_correction = bn_recalibration = False
    shifts = (correct_bias(out.model, reference.model, train_set, layers, seed=seed)
              if bias_correction else {})
    bn = reestimate_batchnorm(out.model, train_set, seed=seed) if bn_recalibration else 0
    return {"bias_correction": bias_correction, "bias_shift": shifts,
            "bn_recalibration": bn_recalibration, "bn_reestimated": bn}


def _requested_clusters(clusters: int | Mapping[str, int], layers: Mapping[str, Any]
                        ) -> dict[str, int]:
    if isinstance(clusters, Mapping):
        unknown = sorted(set(clusters) - set(layers))
        if unknown:
            raise XaiCompressError(f"--clusters names unknown layers {unknown[:3]}; the model's "
                                   f"layers are {', '.join(layers)}")
        ks = {name: int(clusters.get(name, 0)) for name in layers}
        missing = [n for n, k in ks.items() if k == 0]
        if missing:
            raise XaiCompressError(f"--clusters gives no k for layers {missing[:3]}")
    else:
        ks = {name: clusters for name in layers}
    for name, k in ks.items():
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not (
                2 <= k <= MAX_CLUSTERS):
            raise XaiCompressError(f"--clusters {k!r} (layer {name!r}): expected an integer "
                                   f"from 2 to {MAX_CLUSTERS}")
    return {n: int(k) for n, k in ks.items()}


# ------------------------------------------------------------- bit allocation
def codebook_cost(k: int, weights: int, codebook_dtype: str) -> float:
    """Bits a shared layer takes: `weights` indices of ceil(log2 k) bits plus the codebook."""
    return float(index_bits(k) * weights + k * CODEBOOK_BITS[codebook_dtype])


def codebook_error_table(data: Mapping[str, tuple[np.ndarray, np.ndarray, Any]], *,
                         codebook_dtype: str = "fp16", seed: int = 0,
                         bits: tuple[int, ...] = ALLOC_BITS, init: str = "linear"
                         ) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]],
                                    dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]]:
    """errors[layer][b] = sum_w R_w (w - Q_k(w))^2 with k = 2^b clusters, and
    costs[layer][b] = bits of the layer shared that way (indices + codebook).

    data: layer -> (kept weights (n,), R (n,) normalised to mean 1, anything). With R = 1
    (criterion none) the error is the plain squared error, so layers compete on their
    squared errors and the criterion redistributes the weight within each layer.
    Also returns the clusterings, keyed (layer, b), so the chosen ones need no second run.
    """
    errors: dict[str, dict[int, float]] = {}
    costs: dict[str, dict[int, float]] = {}
    found: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    jobs = [(name, b) for name in data for b in bits]
    for name, b in track(jobs, "k-means error table"):
        v, sw, _ = data[name]
        cb, labels = cluster_weights(v, sw, 2 ** b, codebook_dtype=codebook_dtype, seed=seed,
                                     init=init)
        found[(name, b)] = (cb, labels)
        q = cb[labels].astype(np.float64) if v.size else np.zeros(0)
        errors.setdefault(name, {})[b] = float(np.sum(sw * (v.astype(np.float64) - q) ** 2))
        costs.setdefault(name, {})[b] = codebook_cost(len(cb), v.size, codebook_dtype)
    return errors, costs, found


def avg_bits_budget(weights: Mapping[str, int], avg_bits: float, codebook_dtype: str) -> float:
    """Bits of every layer shared with 2^B clusters: sum_l B n_l + 2^B codebook bits."""
    if not math.isfinite(avg_bits) or not (min(ALLOC_BITS) <= avg_bits <= max(ALLOC_BITS)):
        raise XaiCompressError(f"--avg-bits {avg_bits}: expected a number of bits from "
                               f"{min(ALLOC_BITS)} to {max(ALLOC_BITS)}")
    return float(sum(avg_bits * n + 2 ** avg_bits * CODEBOOK_BITS[codebook_dtype]
                     for n in weights.values()))


def _allocate(data: Mapping[str, tuple[np.ndarray, np.ndarray, Any]], avg_bits: float,
              codebook_dtype: str, seed: int, init: str = "linear"
              ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    budget = avg_bits_budget({n: d[0].size for n, d in data.items()}, avg_bits, codebook_dtype)
    errors, costs, found = codebook_error_table(data, codebook_dtype=codebook_dtype, seed=seed,
                                                init=init)
    picks = allocate_bits(errors, costs, budget)
    results = {name: found[(name, b)] for name, b in picks.items()}
    used = sum(costs[n][b] for n, b in picks.items())
    return results, {"budget_bits": budget, "used_bits": used,
                     "allocated_bits": {n: int(b) for n, b in picks.items()}}
