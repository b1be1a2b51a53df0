"""The accuracy budget (`target: {max_drop: D}`, `compress --max-drop D`): each stage's
strength found by bisection on the validation split.

Stages are searched in the order written. A stage's *strength* is the option that sets
how much it removes: `ratio` (or `macs_ratio`) of pruning, `clusters` or `avg_bits` of
weight sharing, `avg_bits` of quantization (a `size_kb` budget is searched as average
bits). Stage i of n searchable stages may leave the validation accuracy at most
D * (i + 1) / n points below the baseline's (the budget is spent evenly, what a stage does
not use is left to the next), and the drop must hold with a margin: the validation drop plus
`margin` standard errors of it (paired: baseline and probe on the same validation images,
`paired_drop`) may not exceed the whole budget D. A probe that looks good on a few hundred
images is partly luck (on 400 images one image is 0.25 pt); without the margin the kept
model's test drop exceeded the budget in 4 of 4 runs (docs/results/post_training.md). Its
strength is bisected between the weakest setting (taken
to pass) and the strongest: the first probe is the value the config gives, each probe runs
the whole stage (its fine-tuning included) from the previous stage's chosen checkpoint,
and the stage keeps, among the probes that passed, the one with the smallest packed file
(`export.packed.packed_report(ckpt).file_bytes`, the one definition of size). When no probe
passes, the weakest setting is tried; if that fails too, the searched stage just before it
backs off to its next weaker passing probe and the stage is searched again
(`pipeline.run.BACK_OFFS` times at most); if the stage still keeps the budget nowhere,
the searched stage before that one backs off and every stage after it is searched again
(`pipeline.run.CASCADES` times at most, the run with the smallest file kept); only then is
the stage left out. (Greedy stages spend the budget first come, first served: without the
back-off, a pruning stage that took its whole share left entropy sharing, whose weakest
setting still costs a few tenths of a point, no room, and the run ended at 10x.)

The probes are cached like stages (`OUT/cache`), keyed by the previous stage and the
probe's options, so a rerun searches nothing twice; the test split is never read while
searching. Anchors: NNCF's accuracy-aware compression, AIMET's greedy ratio selection.

Multiple comparisons: a stage tests up to `probes` settings and keeps the smallest passing
one, so the kept probe's validation drop is the best of several noisy estimates and is
optimistic; the margin is a one-sided bound per probe (z = `MARGIN`, see docs/design.md
for the choice), and the report states the kept model's drop and bound on the same images
that chose it. The test split, read once at the end, is the honest check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from xaicompress.checkpoint import Checkpoint
from xaicompress.export.packed import packed_report

#: weight-sharing cluster counts a search chooses from (about half a bit apart)
CLUSTER_GRID = (256, 192, 128, 96, 64, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2)
#: probes per searched stage (the first is the config's value)
PROBES = 6
#: standard errors of the paired validation drop added to it before it is compared with the
#: budget (`target: {margin: z}`, `compress --margin z`; one-sided, about 84% per probe).
#: Chosen on mnist5k?split=2 (docs/design.md): the smallest of 0 / 0.5 / 1 / 1.645 at which
#: no probe the rule accepted exceeded the budget on the test split (0 of 27; z = 0.5: 4 of
#: 37, z = 0: 8 of 54) and every run kept it
MARGIN = 1.0
#: coded bits per weight searched for entropy-constrained sharing, weak to strong: its
#: codebooks have at most `ECQ_CLUSTERS` = 16 values (<= 4 bits), and it goes below one bit
#: (the shipped lenet5 config: 0.9, which the index range 8..1 clipped to 1)
ENTROPY_BITS = (4.0, 0.5)
#: strongest settings searched: pruning ratios beyond these leave too little to matter
STRUCTURED_MAX, UNSTRUCTURED_MAX = 0.9, 0.98


def packed_size(ckpt: Checkpoint) -> int:
    """The size a budget compares: bytes of the checkpoint's packed file."""
    return packed_report(ckpt).file_bytes


def correct_on(model: torch.nn.Module, dataset: Any) -> torch.Tensor:
    """bool (N,): which items of `dataset` `model` classifies correctly, in order."""
    from xaicompress.train import predict

    logits, y = predict(model, dataset)
    return logits.argmax(1) == y


def paired_drop(base: torch.Tensor, probe: torch.Tensor) -> tuple[float, float]:
    """(drop, standard error) in points of accuracy: the mean and the standard error of the
    per-image differences base - probe (bool (N,) correctness of the same N images each).
    Images both get right or both get wrong add nothing to the error; only the ones on
    which they disagree do, so the pairing is far tighter than two separate accuracies."""
    if base.shape != probe.shape or base.numel() == 0:
        raise ValueError(f"paired_drop: expected two equal non-empty vectors, got "
                         f"{tuple(base.shape)} and {tuple(probe.shape)}")
    d = base.double() - probe.double()
    n = d.numel()
    se = float(d.std(unbiased=True)) / n ** 0.5 if n > 1 else 0.0
    return float(d.mean()) * 100, se * 100


@dataclass(frozen=True)
class Strength:
    """How a stage's strength is searched: `field` from `weak` (largest file) to `strong`,
    continuous or on `grid` (ordered weak to strong)."""

    field: str
    weak: float
    strong: float
    grid: tuple[float, ...] | None = None
    #: options set to None when `field` is searched (a size_kb budget becomes avg_bits)
    clear: tuple[str, ...] = ()

    def value(self, u: float) -> float:
        """The option value at position u in [0, 1] (0 = weakest)."""
        if self.grid is not None:
            return self.grid[int(round(u * (len(self.grid) - 1)))]
        return round(self.weak + u * (self.strong - self.weak), 4)

    def position(self, value: float | None) -> float:
        if value is None:
            return 0.5
        if self.grid is not None:
            near = min(range(len(self.grid)), key=lambda i: abs(self.grid[i] - value))
            return near / (len(self.grid) - 1)
        u = (float(value) - self.weak) / (self.strong - self.weak)
        return min(1.0, max(0.0, u))

    def resolution(self) -> float:
        return 1.0 / (len(self.grid) - 1) if self.grid is not None else 1.0 / 64


def strength_of(stage: Any) -> Strength | None:
    """How `stage`'s strength is searched; None for stages that remove nothing
    (fine-tuning) or whose strength is per layer (share with clusters: {layer: k})."""
    kind = stage.type
    if kind == "prune_structured":
        name = "macs_ratio" if stage.macs_ratio is not None else "ratio"
        return Strength(name, 0.0, STRUCTURED_MAX)
    if kind == "prune_unstructured":
        return Strength("ratio", 0.0, UNSTRUCTURED_MAX)
    if kind == "share":
        if isinstance(stage.clusters, dict):
            return None
        if stage.assignment == "entropy":
            # a size_kb budget is searched as coded bits per weight (it set them anyway)
            return Strength("avg_bits", *ENTROPY_BITS, clear=("size_kb",))
        if stage.clusters is not None:
            return Strength("clusters", CLUSTER_GRID[0], CLUSTER_GRID[-1], CLUSTER_GRID)
        return Strength("avg_bits", 8.0, 1.0, clear=("size_kb",))
    if kind == "quantize":
        return Strength("avg_bits", 8.0, 2.0, clear=("size_kb",))
    return None


def start_value(stage: Any, strength: Strength) -> float | None:
    return getattr(stage, strength.field, None)


@dataclass
class Probe:
    value: float
    val_accuracy: float
    size_bytes: int
    passed: bool
    cached: bool = False
    #: standard error (points) of the paired validation drop against the baseline
    drop_se: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "val_accuracy": round(self.val_accuracy, 4),
                "drop_se": round(self.drop_se, 4), "size_bytes": self.size_bytes,
                "passed": self.passed, "cached": self.cached}


@dataclass
class SearchResult:
    """One stage's search: the probes in order, the chosen value (None: stage left out).
    floor: the validation accuracy the stage must keep; bound: the lowest the accuracy
    minus `margin` standard errors of the drop may reach (baseline - the whole budget)."""

    field: str
    floor: float
    probes: list[Probe] = field(default_factory=list)
    chosen: float | None = None
    bound: float | None = None
    margin: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"field": self.field, "floor": round(self.floor, 4), "chosen": self.chosen,
                "bound": None if self.bound is None else round(self.bound, 4),
                "margin": self.margin, "probes": [p.as_dict() for p in self.probes]}


#: run_probe(value) -> (validation accuracy, standard error of the paired drop in points,
#: packed bytes, from the cache?)
ProbeFn = Callable[[float], tuple[float, float, int, bool]]


def passes(acc: float, se: float, floor: float, bound: float | None, margin: float) -> bool:
    """Whether a probe keeps the budget: its validation accuracy at least `floor`, and (with
    a `bound`) its accuracy lowered by `margin` standard errors of its drop at least
    `bound`."""
    return acc >= floor and (bound is None or acc - margin * se >= bound)


def bisect_strength(strength: Strength, start: float | None, floor: float,
                    run_probe: ProbeFn, probes: int = PROBES, *, bound: float | None = None,
                    margin: float = MARGIN) -> SearchResult:
    """Bisect `strength` for the smallest packed file whose validation accuracy is at least
    `floor` and, with `bound`, whose accuracy minus `margin` standard errors of its paired
    drop is at least `bound` (see the module docstring); `run_probe` runs the stage at a
    value."""
    result = SearchResult(strength.field, floor, bound=bound, margin=margin)
    tried: dict[float, Probe] = {}

    def probe(value: float) -> Probe:
        if value not in tried:
            acc, se, size, cached = run_probe(value)
            tried[value] = Probe(value, acc, size, passes(acc, se, floor, bound, margin),
                                 cached, se)
            result.probes.append(tried[value])
        return tried[value]

    lo, hi = 0.0, 1.0  # lo: strongest position known to pass (0 assumed); hi: known to fail
    u = strength.position(start)
    for _ in range(probes):
        p = probe(strength.value(u))
        if p.passed:
            lo = max(lo, u)
        else:
            hi = min(hi, u)
            if any(q is not p and not q.passed and q.size_bytes == p.size_bytes
                   for q in result.probes):
                # two settings gave the same file (the stage saturates: entropy sharing's
                # 16-value codebooks code no more bits than they need), so every setting
                # between them gives it too: bisecting on would re-run the same failure
                break
        if hi - lo <= strength.resolution() + 1e-9:
            break
        u = (lo + hi) / 2
        if strength.value(u) in tried:  # a grid too coarse to split further
            break
    if not any(p.passed for p in result.probes):
        probe(strength.value(0.0))
    passing = [p for p in result.probes if p.passed]
    if passing:
        result.chosen = min(passing, key=lambda p: (p.size_bytes, -p.val_accuracy)).value
    return result


def stage_floors(base_val: float, max_drop: float, stages: list[Any]) -> list[float | None]:
    """The validation accuracy each searchable stage must keep (None: not searched)."""
    searchable = [i for i, st in enumerate(stages) if strength_of(st) is not None]
    floors: list[float | None] = [None] * len(stages)
    for rank, i in enumerate(searchable):
        floors[i] = base_val - max_drop * (rank + 1) / len(searchable)
    return floors
