"""The accuracy budget (`target: {max_drop: D}`, `compress --max-drop D`): each stage's
strength found by bisection on the validation split.

Stages are searched in the order written. A stage's *strength* is the option that sets
how much it removes: `ratio` (or `macs_ratio`) of pruning, `clusters` or `avg_bits` of
weight sharing, `avg_bits` of quantization (a `size_kb` budget is searched as average
bits). Stage i of n searchable stages may leave the validation accuracy at most
D * (i + 1) / n points below the baseline's (the budget is spent evenly, what a stage does
not use is left to the next). Its strength is bisected between the weakest setting (taken
to pass) and the strongest: the first probe is the value the config gives, each probe runs
the whole stage (its fine-tuning included) from the previous stage's chosen checkpoint,
and the stage keeps, among the probes that passed, the one with the smallest packed file
(`export.packed.packed_report(ckpt).file_bytes`, the one definition of size). When no probe
passes, the weakest setting is tried; if that fails too the stage is left out.

The probes are cached like stages (`OUT/cache`), keyed by the previous stage and the
probe's options, so a rerun searches nothing twice; the test split is never read while
searching. Anchors: NNCF's accuracy-aware compression, AIMET's greedy ratio selection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xaicompress.checkpoint import Checkpoint
from xaicompress.export.packed import packed_report

#: weight-sharing cluster counts a search chooses from (about half a bit apart)
CLUSTER_GRID = (256, 192, 128, 96, 64, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2)
#: probes per searched stage (the first is the config's value)
PROBES = 6
#: strongest settings searched: pruning ratios beyond these leave too little to matter
STRUCTURED_MAX, UNSTRUCTURED_MAX = 0.9, 0.98


def packed_size(ckpt: Checkpoint) -> int:
    """The size a budget compares: bytes of the checkpoint's packed file."""
    return packed_report(ckpt).file_bytes


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

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "val_accuracy": round(self.val_accuracy, 4),
                "size_bytes": self.size_bytes, "passed": self.passed, "cached": self.cached}


@dataclass
class SearchResult:
    """One stage's search: the probes in order, the chosen value (None: stage left out)."""

    field: str
    floor: float
    probes: list[Probe] = field(default_factory=list)
    chosen: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"field": self.field, "floor": round(self.floor, 4), "chosen": self.chosen,
                "probes": [p.as_dict() for p in self.probes]}


#: run_probe(value) -> (validation accuracy, packed bytes, from the cache?)
ProbeFn = Callable[[float], tuple[float, int, bool]]


def bisect_strength(strength: Strength, start: float | None, floor: float,
                    run_probe: ProbeFn, probes: int = PROBES) -> SearchResult:
    """Bisect `strength` for the smallest packed file whose validation accuracy is at least
    `floor` (see the module docstring); `run_probe` runs the stage at a value."""
    result = SearchResult(strength.field, floor)
    tried: dict[float, Probe] = {}

    def probe(value: float) -> Probe:
        if value not in tried:
            acc, size, cached = run_probe(value)
            tried[value] = Probe(value, acc, size, acc >= floor, cached)
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
