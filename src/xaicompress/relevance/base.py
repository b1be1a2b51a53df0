"""The one question every criterion answers: "how much does each unit and weight matter?".

A criterion is a small class with one method, `score(model, loader) -> Relevance`. Options
(reference, target, aggregation, seed, ...) go to the constructor, so a configured
criterion is a value that can be passed to any compression step. A criterion knows
nothing about pruning; a pruner knows nothing about DeepLIFT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from xaicompress.errors import XaiCompressError

if TYPE_CHECKING:
    from xaicompress.data import DatasetBundle


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv2d and Linear layers by module name, in definition order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@dataclass
class Relevance:
    """Scores of every prunable layer (Conv2d / Linear), keyed by module name.

    units:   layer -> float32 (out_units,)   one score per filter / neuron, >= 0 unless
             the criterion was asked for signed aggregation.
    weights: layer -> float32 weight.shape   one score per weight.
    meta:    how it was computed (criterion, options, samples, convergence delta, ...).
    """

    criterion: str
    units: dict[str, Tensor]
    weights: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def layers(self) -> list[str]:
        return list(self.units)

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


class Criterion:
    """Base class. Subclasses set `name` and implement `score`."""

    name: ClassVar[str] = ""
    #: whether `score` reads data (l1 and random do not; the loader may then be None)
    needs_data: ClassVar[bool] = True

    def __init__(self, **options: Any) -> None:
        self.options = options

    def score(self, model: nn.Module, loader: DataLoader | None) -> Relevance:
        """Score every prunable layer of `model` on batches (x, y) from `loader`."""
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.name}:{opts}" if opts else self.name


_CRITERIA: dict[str, type[Criterion]] = {}


def register_criterion(name: str) -> Callable[[type[Criterion]], type[Criterion]]:
    """Class decorator: make a criterion available as `--criterion name`."""

    def deco(cls: type[Criterion]) -> type[Criterion]:
        cls.name = name
        _CRITERIA[name] = cls
        return cls

    return deco


def list_criteria() -> list[str]:
    return sorted(_CRITERIA)


def get_criterion(spec: str, **overrides: Any) -> Criterion:
    """Build a criterion from `name` or `name:key=value,key=value` (values parsed as
    int/float/bool when they look like one)."""
    name, _, opt_text = str(spec).strip().partition(":")
    if name not in _CRITERIA:
        raise XaiCompressError(f"--criterion {spec!r}: unknown criterion, expected one of "
                               f"{', '.join(list_criteria())}")
    options: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in opt_text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise XaiCompressError(f"--criterion {spec!r}: option {item!r} is not key=value")
        options[key.strip()] = _parse_value(value.strip())
    options.update(overrides)
    try:
        return _CRITERIA[name](**options)
    except TypeError as exc:
        raise XaiCompressError(f"--criterion {spec!r}: {exc}") from exc


def _parse_value(v: str) -> Any:
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def compute_relevance(model: nn.Module, criterion: Criterion,
                      dataset: Dataset | DatasetBundle | None, *,
                      samples: int = 512, batch_size: int = 128, seed: int = 0,
                      pixel_mean: tuple[float, ...] | None = None,
                      pixel_std: tuple[float, ...] | None = None) -> Relevance:
    """Score `model` with `criterion` on `samples` seeded-random items of `dataset`.

    `dataset` is a Dataset of (x, y) or a DatasetBundle (its train split is scored and its
    normalisation is handed to criteria that use it, e.g. DeepLIFT's black `zeros`
    reference); `pixel_mean`/`pixel_std` give that normalisation explicitly. A criterion
    whose options already set them keeps its own. Data-free criteria ignore the dataset.
    Under torch.distributed the loader shards the samples across ranks and the criterion
    reduces its sums (see relevance/distributed.py).
    """
    from xaicompress.data import DatasetBundle, make_loader, subset

    if isinstance(dataset, DatasetBundle):
        pixel_mean = pixel_mean if pixel_mean is not None else dataset.mean
        pixel_std = pixel_std if pixel_std is not None else dataset.std
        dataset = dataset.train
    if (pixel_mean is not None and getattr(criterion, "accepts_normalisation", False)
            and criterion.options.get("pixel_mean") is None):
        criterion = type(criterion)(**{**criterion.options, "pixel_mean": tuple(pixel_mean),
                                       "pixel_std": tuple(pixel_std or ())})
    if not criterion.needs_data:
        return criterion.score(model, None)
    if dataset is None:
        raise XaiCompressError(f"--criterion {criterion!r}: needs data, none given")
    if samples < 1:
        raise XaiCompressError(f"--samples {samples}: expected a positive number of samples")
    loader = make_loader(subset(dataset, samples, seed=seed), batch_size, shuffle=False,
                         seed=seed)
    was_training = model.training
    model.eval()
    try:
        rel = criterion.score(model, loader)
    finally:
        model.train(was_training)
    rel.meta.setdefault("samples", min(samples, len(dataset)))  # type: ignore[arg-type]
    return rel
