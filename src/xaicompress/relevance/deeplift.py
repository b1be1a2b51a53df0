"""The `deeplift` criterion: mean DeepLIFT contribution of every Conv2d/Linear unit and weight.

The rules are in relevance/rules.py, the one-pass engine in relevance/engine.py, the
per-unit and per-weight kernels in relevance/kernels.py; this module only aggregates what
the engine hands over, batch by batch, into an `AccumulatingCriterion`'s sums.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
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
)
from xaicompress.relevance.engine import (  # noqa: F401  (layer_attributions: public API)
    DeepLiftEngine,
    LayerPass,
    layer_attributions,
)
from xaicompress.relevance.kernels import pass_units, pass_weights, weight_energy
from xaicompress.relevance.references import Reference, parse_reference, resolve_reference
from xaicompress.relevance.registry import register_criterion
from xaicompress.relevance.rules import EPS, LAYERNORM_RULES, RULES

# kept importable from here for callers written before the split into options.py
parse_target, parse_aggregate, rows_target = opt.parse_target, opt.parse_aggregate, \
    opt.rows_target


@dataclass
class _Run:
    """The state of one scoring run."""

    engine: DeepLiftEngine
    layers: dict[str, nn.Module]
    loader: DataLoader
    need: frozenset[str]
    dtype: Any
    ref: Reference | None = None
    group: int = 1
    reached: set[str] = field(default_factory=set)
    #: aggregate=classmax: the labels of the samples being attributed, and the class count
    labels: Tensor | None = None
    classes: int = 0


#: how per-sample contributions become a score (see DeepLift); classmax exists because the
#: mean over all samples ranks class-specific filters low together: on a vgg11 of mnist5k,
#: one-shot 0.5 per layer, DeepLIFT (abs) left class 3 at 0% (docs/relevance.md)
AGGREGATES = ("abs", "signed", "classmax")
#: how per-weight contributions become a weight score (see DeepLift). "layer" exists because
#: DeepLIFT's weight ranking inside a layer lost to plain magnitude in one-shot unstructured
#: pruning (resnet20 at 90%: 50.8% validation vs 88.8% for the Hessian criterion, whose
#: per-layer form is magnitude inside a layer), while its split of the cut between layers
#: was as good as the Hessian's (docs/relevance.md)
WEIGHT_MODES = ("sample", "batch", "layer")


@register_criterion("deeplift")
class DeepLift(AccumulatingCriterion):
    """DeepLIFT contributions of every Conv2d/Linear output unit and weight.

    Options: reference = zeros | mean | blur | samples:N (also samplesN) | tensor | callable;
    target = true | pred | all | class index; aggregate = abs | signed | classmax (units:
    the mean |contribution| over each class's samples, then the largest over the classes,
    so a filter one class needs is not ranked low because the others do not; weights as
    abs); pixel_mean,
    pixel_std = the dataset normalisation (for the black `zeros` reference; passed by
    `compute_relevance` from a DatasetBundle); sigma = blur width in pixels (0, 1000];
    seed = which training images `samples:N` draws; normalise = per-layer L1
    normalisation; tolerance = relative convergence delta above which a warning is raised;
    eps = Rescale 0/0 guard; weights = sample (mean over samples of |contribution|) | batch
    (|mean|) | layer (the layer's root-mean-square contribution, shared out over its weights
    in proportion to w²: relevance sets how much of each layer is cut, magnitude which
    weights); maxpool = rescale | captum; rule =
    rescale | revealcancel; layernorm = decompose | constant.
    """

    uses_normalisation = True
    seeded = True

    def __init__(self, reference: Any = "zeros", target: Any = "true", aggregate: str = "abs",
                 pixel_mean: Sequence[float] | None = None,
                 pixel_std: Sequence[float] | None = None, sigma: float | None = None,
                 seed: int = 0, normalise: bool = False, tolerance: float = 1e-4,
                 eps: float = EPS, weights: str = "sample", maxpool: str = "rescale",
                 rule: str = "rescale", layernorm: str = "decompose") -> None:
        super().__init__(reference=reference, target=target, aggregate=aggregate,
                         pixel_mean=pixel_mean, pixel_std=pixel_std, sigma=sigma, seed=seed,
                         normalise=normalise, tolerance=tolerance, eps=eps, weights=weights,
                         maxpool=maxpool, rule=rule, layernorm=layernorm)
        self.options = {k: v for k, v in self.options.items()
                        if v is not None or k not in ("pixel_mean", "pixel_std", "sigma")}
        self.reference = parse_reference(reference)
        self.target = opt.parse_target(target)
        self.aggregate = opt.parse_aggregate(aggregate, AGGREGATES)
        self.pixel_mean = opt.per_channel("pixel_mean", pixel_mean)
        self.pixel_std = opt.per_channel("pixel_std", pixel_std)
        if (self.pixel_mean is None) != (self.pixel_std is None):
            raise XaiCompressError("pixel_mean/pixel_std: give both or neither")
        self.sigma = None if sigma is None else opt.number("sigma", sigma, 0, 1000,
                                                             open_lo=True)
        self.seed, self.normalise = opt.seed(seed), opt.boolean("normalise", normalise)
        self.tolerance = opt.number("tolerance", tolerance, 0, 1, open_lo=True)
        self.eps = opt.number("eps", eps, 0, 1e-3, open_lo=True)
        self.weights = opt.choice("weights", weights, WEIGHT_MODES)
        if self.weights == "layer" and self.aggregate == "signed":
            raise XaiCompressError("weights=layer scores are magnitudes: use aggregate=abs "
                                   "(or classmax), not signed")
        self.maxpool = opt.choice("maxpool", maxpool, ("rescale", "captum"))
        self.rule = opt.choice("rule", rule, RULES)
        self.layernorm = opt.choice("layernorm", layernorm, LAYERNORM_RULES)

    # ------------------------------------------------------------ the batch loop
    def setup(self, model: nn.Module, loader: DataLoader, sums: Sums,
              need: frozenset[str]) -> _Run:
        layers = super().setup(model, loader, sums, need)
        for key in ("rows", "abs_delta_f"):
            sums.zeros(key, (1,))
        engine = DeepLiftEngine(model, eps=self.eps, maxpool=self.maxpool, rule=self.rule,
                                layernorm=self.layernorm)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        return _Run(engine, layers, loader, need, dtype)

    def accumulate(self, run: _Run, x: Tensor, y: Tensor, sums: Sums) -> None:
        x = x.to(run.dtype) if run.dtype is not None else x.float()
        if run.ref is None:
            run.ref = resolve_reference(self.reference, run.loader, x,
                                        pixel_mean=self.pixel_mean, pixel_std=self.pixel_std,
                                        sigma=self.sigma, seed=self.seed)
            run.group = run.ref.group
        if run.ref.constant is not None:
            run.engine.set_reference(run.ref.constant)  # a no-op after the first batch
        group = run.group
        # K references per sample multiply the rows: keep each pass near the batch size
        step = max(1, math.ceil(len(x) / group))
        for i in range(0, len(x), step):
            xs, ys = x[i:i + step], y[i:i + step]
            if run.ref.per_sample is not None:
                run.engine.set_reference(run.ref.per_sample(xs))
            if self.aggregate == "classmax":
                self._count_classes(run, ys, sums)
            rows = xs.repeat_interleave(group, 0) if group > 1 else xs
            res = run.engine.attribute(rows, opt.rows_target(self.target, ys, group),
                                       lambda p: self._on_layer(run, sums, p), inputs=False)
            sums.maximum("delta", float(res.delta.abs().max()))
            sums.add("rows", len(rows))
            sums.add("abs_delta_f", res.delta_f.abs().sum())

    def _count_classes(self, run: _Run, ys: Tensor, sums: Sums) -> None:
        """aggregate=classmax: remember the rows' labels; count the samples per class (as
        many classes as the reference pass gave the model outputs)."""
        if not run.classes:
            run.classes = run.engine.classes
            sums.zeros("class_samples", (run.classes,))
        labels = ys.long().to(sums.device)
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= run.classes):
            raise XaiCompressError(f"deeplift aggregate=classmax: a label outside 0.."
                                   f"{run.classes - 1} (the model's outputs)")
        run.labels = labels
        sums.add("class_samples", torch.bincount(labels, minlength=run.classes))

    def _on_layer(self, run: _Run, sums: Sums, p: LayerPass) -> None:
        group, absolute = run.group, self.aggregate in ("abs", "classmax")
        if UNITS in run.need:
            c = pass_units(p.layer, p.z, p.z_ref, p.m, p.split)
            c = c.view(-1, group, c.shape[1]).mean(1)
            sums.add(f"{UNITS}/{p.name}", (c.abs() if absolute else c).sum(0))
            if self.aggregate == "classmax":
                key = f"class_units/{p.name}"
                if key not in sums.tensors:
                    sums.zeros(key, (run.classes, c.shape[1]))
                sums.tensors[key].index_add_(0, run.labels, c.abs().to(torch.float64))
        if WEIGHTS in run.need:
            dx = p.x - p.x_ref
            if self.weights == "layer":  # squares summed; shared out in `finish`
                scores = weight_energy(p.layer, dx, p.m, group=group, split=p.split)
            else:  # weights=batch: signed sums over samples, |.| once at the end (one GEMM)
                scores = pass_weights(p.layer, dx, p.m, group=group,
                                      absolute=absolute and self.weights == "sample",
                                      split=p.split)
            sums.add(f"{WEIGHTS}/{p.name}", scores)
        run.reached.add(p.name)

    def finish(self, run: _Run, sums: Sums, need: frozenset[str]) -> Relevance:
        max_delta = sums.maxima.get("delta", 0.0)
        mean_df = float(sums.tensors["abs_delta_f"]) / max(1.0, float(sums.tensors["rows"]))
        rel_delta = max_delta / max(mean_df, 1e-12)
        if rel_delta > self.tolerance:
            warnings.warn(f"deeplift: convergence delta {rel_delta:.2e} (relative to mean "
                          f"|f(x) - f(ref)| = {mean_df:.3g}) exceeds {self.tolerance:g}; "
                          "contributions do not sum to the output difference", stacklevel=3)
        rel = super().finish(run, sums, need)
        if self.aggregate == "classmax" and UNITS in need:
            n = sums.tensors["class_samples"]
            seen = n > 0
            for name in rel.units:
                per_class = sums.tensors[f"class_units/{name}"][seen] / n[seen, None]
                rel.units[name] = per_class.max(0).values.float()
        if self.aggregate in ("abs", "classmax") and self.weights == "batch":
            rel.weights = {k: v.abs() for k, v in rel.weights.items()}
        if self.weights == "layer":
            rel.weights = {k: layer_shares(run.layers[k].weight, v)
                           for k, v in rel.weights.items()}
        rel.meta = {
            "criterion": self.name, "reference": run.ref.spec.describe() if run.ref else None,
            "target": self.target, "aggregate": self.aggregate, "samples": sums.samples,
            "weights": self.weights, "maxpool": self.maxpool, "rule": self.rule,
            "layernorm": self.layernorm, "references_per_sample": run.group,
            "revealcancel_nonlinearities": run.engine.heads if self.rule == "revealcancel"
            else 0,
            "convergence_delta": max_delta, "convergence_delta_rel": rel_delta,
            "mean_abs_output_delta": mean_df, "unit": "Conv2d/Linear output (pre-activation)",
            "normalised_reference": self.pixel_mean is not None,
            "unreached_layers": sorted(set(run.layers) - run.reached)}
        return rel.normalised() if self.normalise else rel


def layer_shares(weight: Tensor, energy: Tensor) -> Tensor:
    """weights=layer: the layer's score L = mean over its weights of |w| sqrt(E), E = the
    mean over samples of Σ_positions (m Δx)² (`kernels.weight_energy`), i.e. of each
    weight's root-mean-square contribution, shared out as L w² / mean(w²): the scores of a
    layer average to L and rank its weights by magnitude."""
    w = weight.detach().to(energy.dtype)
    w2 = w * w
    total = (w.abs() * energy.clamp(min=0).sqrt()).mean()
    return w2 / w2.mean().clamp(min=torch.finfo(w2.dtype).tiny) * total
