"""The one question every criterion answers: "how much does each unit and weight matter?".

A criterion is a small class with one method, `score(model, loader, need) -> Relevance`.
Options (reference, target, aggregation, seed, ...) go to the constructor, so a configured
criterion is a value any compression step takes. A criterion knows nothing about pruning;
a pruner knows nothing about DeepLIFT.

What a criterion can do is declared on its class, not discovered by probing it:

| attribute            | meaning                                                         |
|----------------------|-----------------------------------------------------------------|
| `needs_data`         | `score` reads batches (False: l1, random; the loader may be None) |
| `uses_normalisation` | takes `pixel_mean`/`pixel_std` (DeepLIFT's black reference)     |
| `seeded`             | takes `seed`; a pipeline stage hands it its own seed            |
| `provides`           | what it can compute: {"units", "weights"}                       |

`need` asks for part of that ("units" only for structured pruning), so a step never pays
for scores it throws away. Data-driven criteria derive from `AccumulatingCriterion`, which
owns the batch loop: zeroed float64 sums, one progress bar, one all-reduce under
torch.distributed and the division by the sample count; a subclass only says what one
batch adds, so it cannot forget the reduction.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from xaicompress.errors import XaiCompressError
from xaicompress.progress import track
from xaicompress.relevance.distributed import all_reduce_max, all_reduce_sums

if TYPE_CHECKING:
    from xaicompress.data import DatasetBundle

UNITS, WEIGHTS = "units", "weights"
ALL: frozenset[str] = frozenset({UNITS, WEIGHTS})
Need = str | Iterable[str] | None


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv2d and Linear layers by module name, in definition order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@dataclass
class Relevance:
    """Scores of every prunable layer (Conv2d / Linear), keyed by module name.

    units:   layer -> float32 (out_units,)   one score per filter / neuron, >= 0 unless
             the criterion was asked for signed aggregation.
    weights: layer -> float32 weight.shape   one score per weight (empty when only units
             were asked for).
    meta:    how it was computed (criterion, options, samples, convergence delta, ...).
    """

    criterion: str
    units: dict[str, Tensor]
    weights: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def layers(self) -> list[str]:
        return list(self.units or self.weights)

    def normalised(self) -> Relevance:
        """Per-layer L1 normalisation (each layer's |scores| sum to 1), for global ranking."""
        def norm(t: Tensor) -> Tensor:
            s = t.abs().sum()
            return t / s if s > 0 else torch.full_like(t, 1.0 / max(1, t.numel()))

        return Relevance(self.criterion, {k: norm(v) for k, v in self.units.items()},
                         {k: norm(v) for k, v in self.weights.items()},
                         {**self.meta, "normalised": True})

    def to_tensors(self) -> dict[str, Tensor]:
        out = {f"units/{k}": v.contiguous() for k, v in self.units.items()}
        out.update({f"weights/{k}": v.contiguous() for k, v in self.weights.items()})
        return out


def resolve_need(need: Need, provides: frozenset[str], label: str) -> frozenset[str]:
    """`need` (None = everything `provides`; a name or names) as a checked frozenset."""
    if need is None:
        return frozenset(provides)
    asked = frozenset({need} if isinstance(need, str) else need)
    unknown = asked - ALL
    if unknown or not asked:
        raise XaiCompressError(f"need={sorted(asked)}: expected a non-empty subset of "
                               f"{sorted(ALL)}")
    missing = asked - provides
    if missing:
        raise XaiCompressError(f"criterion {label!r}: cannot provide {sorted(missing)} "
                               f"(it provides {sorted(provides)})")
    return asked


class Criterion:
    """Base class: set the capability attributes, implement `score`.

    Options are the constructor's parameters (a criterion without `__init__` takes none);
    pass them to `super().__init__(**options)` so `with_options` can rebuild it.
    """

    name: ClassVar[str] = ""
    #: whether `score` reads data (l1 and random do not; the loader may then be None)
    needs_data: ClassVar[bool] = True
    #: takes pixel_mean / pixel_std (the dataset normalisation), see `compute_relevance`
    uses_normalisation: ClassVar[bool] = False
    #: takes `seed`; `get_criterion(spec, default_seed=s)` sets it unless the spec does
    seeded: ClassVar[bool] = False
    #: what `score` can compute
    provides: ClassVar[frozenset[str]] = ALL
    _score_takes_need: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # score(model, loader) written before `need` existed keeps working
        cls._score_takes_need = "need" in inspect.signature(cls.score).parameters

    def __init__(self, **options: Any) -> None:
        self.options = options

    def score(self, model: nn.Module, loader: DataLoader | None,
              need: Need = None) -> Relevance:
        """Score every prunable layer of `model` on batches (x, y) from `loader`; compute
        only what `need` asks for (None: everything the criterion provides)."""
        raise NotImplementedError

    def with_options(self, **changes: Any) -> Criterion:
        """A copy of this criterion with some options changed."""
        return type(self)(**{**self.options, **changes})

    @property
    def accepts_normalisation(self) -> bool:  # the name callers used before `uses_...`
        return self.uses_normalisation

    def __repr__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.name}:{opts}" if opts else self.name


def score(criterion: Criterion, model: nn.Module, loader: DataLoader | None,
          need: Need = None) -> Relevance:
    """`criterion.score(model, loader, need)`, also for criteria whose `score` predates
    `need` (they compute everything)."""
    asked = resolve_need(need, criterion.provides, repr(criterion))
    if criterion._score_takes_need:
        return criterion.score(model, loader, need=asked)
    return criterion.score(model, loader)


class Sums:
    """The float64 running sums of one scoring run, reduced once across ranks.

    tensors: key -> float64 tensor (`zeros` makes them); maxima: key -> float; samples:
    the number of samples seen. Keys "units/<layer>" and "weights/<layer>" become the
    Relevance by default (`AccumulatingCriterion.finish`).
    """

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}
        self.maxima: dict[str, float] = {}
        self.samples = 0

    def zeros(self, key: str, shape: tuple[int, ...] | torch.Size) -> Tensor:
        self.tensors[key] = torch.zeros(tuple(shape), dtype=torch.float64)
        return self.tensors[key]

    def add(self, key: str, value: Tensor | float) -> None:
        t = self.tensors[key]
        t += value.detach().to(torch.float64) if isinstance(value, Tensor) else float(value)

    def maximum(self, key: str, value: float) -> None:
        self.maxima[key] = max(self.maxima.get(key, float("-inf")), float(value))

    def reduce(self) -> None:
        """All-reduce (sum) every tensor and the sample count, max every maximum."""
        count = torch.tensor([float(self.samples)], dtype=torch.float64)
        all_reduce_sums({**self.tensors, "__samples": count})
        self.samples = int(round(float(count)))
        self.maxima = {k: all_reduce_max(v) for k, v in sorted(self.maxima.items())}

    def mean(self, key: str) -> Tensor:
        return (self.tensors[key] / max(1, self.samples)).float()

    def layer_means(self, kind: str) -> dict[str, Tensor]:
        """{layer: mean} of every "kind/<layer>" sum (kind: units or weights)."""
        prefix = f"{kind}/"
        return {k[len(prefix):]: self.mean(k) for k in self.tensors if k.startswith(prefix)}


class AccumulatingCriterion(Criterion):
    """A data-driven criterion written as sums over samples.

    `score` runs the loop: `setup` (zero the sums, install hooks), `accumulate` per batch,
    `teardown` (always), the all-reduce and the sample count, then `finish` builds the
    Relevance from the means (default: "units/<layer>" and "weights/<layer>" sums / n).
    """

    def score(self, model: nn.Module, loader: DataLoader | None,
              need: Need = None) -> Relevance:
        asked = resolve_need(need, self.provides, repr(self))
        if loader is None:
            raise XaiCompressError(f"criterion {self.name!r}: needs data (a loader of (x, y) "
                                   "batches), none given")
        sums = Sums()
        state = self.setup(model, loader, sums, asked)
        try:
            for batch in track(loader, f"{self.name} relevance"):
                x, y = batch[0], batch[1]
                self.accumulate(state, x, y, sums)
                sums.samples += len(x)
        finally:
            self.teardown(state)
        sums.reduce()
        if sums.samples == 0:
            raise XaiCompressError(f"criterion {self.name!r}: the data loader gave no samples")
        rel = self.finish(state, sums, asked)
        rel.meta.setdefault("criterion", self.name)
        rel.meta.setdefault("samples", sums.samples)
        rel.meta["computed"] = sorted(asked)
        return rel

    def setup(self, model: nn.Module, loader: DataLoader, sums: Sums,
              need: frozenset[str]) -> Any:
        """Zero "units/<layer>" and "weights/<layer>" for every prunable layer `need` asks
        for; returns the run's state (here the layers). Override to install hooks too."""
        layers = prunable_layers(model)
        for name, m in layers.items():
            if UNITS in need:
                sums.zeros(f"{UNITS}/{name}", (m.weight.shape[0],))
            if WEIGHTS in need:
                sums.zeros(f"{WEIGHTS}/{name}", m.weight.shape)
        return layers

    def accumulate(self, state: Any, x: Tensor, y: Tensor, sums: Sums) -> None:
        """Add one batch (x (B, ...), y (B,)) to `sums`."""
        raise NotImplementedError

    def teardown(self, state: Any) -> None:
        """Undo `setup` (remove hooks); runs even when a batch failed."""

    def finish(self, state: Any, sums: Sums, need: frozenset[str]) -> Relevance:
        """The Relevance from the reduced sums (`sums.samples` > 0)."""
        return Relevance(self.name, sums.layer_means(UNITS), sums.layer_means(WEIGHTS),
                         {"criterion": self.name})


def compute_relevance(model: nn.Module, criterion: Criterion,
                      dataset: Dataset | DatasetBundle | None, *,
                      samples: int = 512, batch_size: int = 128, seed: int = 0,
                      pixel_mean: tuple[float, ...] | None = None,
                      pixel_std: tuple[float, ...] | None = None,
                      need: Need = None) -> Relevance:
    """Score `model` with `criterion` on `samples` seeded-random items of `dataset`.

    `dataset` is a Dataset of (x, y) or a DatasetBundle (its train split is scored and its
    normalisation is handed to criteria that use it, e.g. DeepLIFT's black `zeros`
    reference); `pixel_mean`/`pixel_std` give that normalisation explicitly. A criterion
    whose options already set them keeps its own. `need`: "units", "weights" or both
    (None: all the criterion provides). Data-free criteria ignore the dataset. Under
    torch.distributed the loader shards the samples across ranks and the criterion reduces
    its sums (`AccumulatingCriterion`).
    """
    from xaicompress.data import DatasetBundle, make_loader, subset

    if isinstance(dataset, DatasetBundle):
        pixel_mean = pixel_mean if pixel_mean is not None else dataset.mean
        pixel_std = pixel_std if pixel_std is not None else dataset.std
        dataset = dataset.train
    if (pixel_mean is not None and criterion.uses_normalisation
            and criterion.options.get("pixel_mean") is None):
        criterion = criterion.with_options(pixel_mean=tuple(pixel_mean),
                                           pixel_std=tuple(pixel_std or ()))
    if not criterion.needs_data:
        return score(criterion, model, None, need)
    if dataset is None:
        raise XaiCompressError(f"criterion {criterion!r}: needs data, none given")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise XaiCompressError(f"samples={samples!r}: expected a positive number of samples")
    loader = make_loader(subset(dataset, samples, seed=seed), batch_size, shuffle=False,
                         seed=seed)
    was_training = model.training
    model.eval()
    try:
        rel = score(criterion, model, loader, need)
    finally:
        model.train(was_training)
    rel.meta.setdefault("samples", min(samples, len(dataset)))  # type: ignore[arg-type]
    return rel
