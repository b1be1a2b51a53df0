"""`compress`: take a model and data through the configured stages, cache every stage,
write the packed file, ONNX, the final checkpoint, report.json / report.md and plots.

Determinism: the baseline trains with the config seed; stage i (0-based) runs with seed
`stage_seed(seed, i)`; each stage starts from the checkpoint *as stored in the cache*, so
an interrupted run resumed from its cache computes exactly what an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xaicompress.atomic import atomic_write_text, check_writable, record_writes
from xaicompress.checkpoint import Checkpoint, check_data_fits, load_checkpoint
from xaicompress.data import DatasetBundle, load_dataset
from xaicompress.data.fingerprint import data_fingerprint
from xaicompress.data.holdout import calibration_bundle, carve_validation
from xaicompress.device import Runtime, current_device, use_runtime
from xaicompress.errors import OptionError, XaiCompressError
from xaicompress.interrupt import Interrupted, deferred
from xaicompress.metrics import evaluate
from xaicompress.pipeline.budget import (
    SearchResult,
    bisect_strength,
    correct_on,
    packed_size,
    paired_drop,
    stage_floors,
    start_value,
    strength_of,
)
from xaicompress.pipeline.cache import StageCache, baseline_key, file_hash, stage_key
from xaicompress.pipeline.config import PipelineConfig, stage_model
from xaicompress.pipeline.outputs import load_report, write_outputs
from xaicompress.pipeline.stages import run_stage
from xaicompress.progress import track

IDENTITY_FIDELITY = {"cosine": 1.0, "top10_overlap": 1.0, "agreement": 100.0}


def stage_seed(seed: int, index: int) -> int:
    """Seed of stage `index` (0-based): distinct per stage and per config seed."""
    return seed * 1000 + index + 1


@dataclass
class PipelineResult:
    """What `run_pipeline` produced: the report dict, the checkpoints, the files written and
    which steps came from the cache (baseline first, then one flag per stage)."""

    out_dir: Path
    report: dict[str, Any]
    baseline: Checkpoint
    final: Checkpoint
    cached: list[bool]
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    #: what `write_result` needs to write the outputs (again) elsewhere
    steps: list[Checkpoint] = field(default_factory=list, repr=False)
    config: PipelineConfig | None = field(default=None, repr=False)
    bundle: DatasetBundle | None = field(default=None, repr=False)
    #: the accuracy budget's search per searched stage (`pipeline.budget`)
    searches: list[dict[str, Any]] = field(default_factory=list, repr=False)


def check_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Check, creating nothing, that `out_dir` can be the output folder: a folder or
    creatable under its nearest existing parent, with OUT/cache free for the cache."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise XaiCompressError(f"--out {out}: exists and is not a folder")
    cache = out / "cache"
    if os.path.lexists(cache) and not cache.is_dir():
        raise XaiCompressError(f"--out {out}: {cache} exists and is not a folder; the stage "
                               "cache needs that name (move the file away)")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise XaiCompressError(f"--out {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise XaiCompressError(f"--out {out}: {parent} is not writable")
    return out


def prepare_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Create the output folder (and its parents) after `check_out_dir`; sweep this tool's
    own temporary files a killed run left there and in OUT/cache."""
    out = check_out_dir(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise XaiCompressError(f"--out {out}: cannot create folder ({exc.strerror or exc})"
                               ) from None
    check_writable(out / "report.json")
    from xaicompress.atomic import remove_stale_temps

    for folder in (out, out / "cache"):
        remove_stale_temps(folder)
    return out


def _source(config: PipelineConfig, start: Checkpoint | None = None,
            in_memory: bool = False) -> dict[str, Any]:
    if in_memory:  # xc.compress: the user's module, as its checkpoint bytes
        import hashlib

        from xaicompress.checkpoint import checkpoint_bytes

        assert start is not None
        return {"python": hashlib.sha256(checkpoint_bytes(start)).hexdigest()}
    extra = ({"preprocess": config.preprocess.model_dump(mode="json")}
             if "preprocess" in config.model_fields_set else {})
    if config.checkpoint is not None:
        kwargs = config.model.kwargs if config.model is not None else {}
        return {"checkpoint_sha256": file_hash(config.checkpoint),
                "trusted": config.trusted_model, **({"kwargs": kwargs} if kwargs else {}),
                **extra}
    assert config.model is not None
    return {"model": config.model.name, "kwargs": config.model.kwargs, **extra}


def _start_checkpoint(config: PipelineConfig) -> tuple[Checkpoint | None, DatasetBundle]:
    """The checkpoint `compress` starts from and the data as its model sees it: an
    xaicompress checkpoint (its own preprocessing), or a state dict of the user's
    (`checkpoint: weights.pth` with `model:`), imported like `xaicompress import` does."""
    from xaicompress.importing import build_imported
    from xaicompress.models.weights import file_kind

    pre = config.preprocess.preprocess()
    path = Path(config.checkpoint) if config.checkpoint is not None else None
    if path is None:
        return None, load_dataset(config.data, seed=config.seed, preprocess=pre)
    if not path.is_file():
        raise XaiCompressError(f"checkpoint {config.checkpoint}: file does not exist")
    if file_kind(path) in ("torch", "safetensors"):
        if config.model is None:
            raise XaiCompressError(f"checkpoint {path}: is a state dict of your own model; give "
                                   "model: (its architecture, with kwargs) to import it")
        bundle = load_dataset(config.data, seed=config.seed, preprocess=pre)
        return build_imported(path, config.model.name, bundle,
                              model_kwargs=dict(config.model.kwargs)), bundle
    if config.model is not None and config.model.kwargs:
        raise XaiCompressError("model.kwargs does not apply when starting from an xaicompress "
                               "checkpoint (it stores them); model: names only the factory "
                               "you trust")
    if "preprocess" in config.model_fields_set:
        raise XaiCompressError("preprocess does not apply when starting from an xaicompress "
                               "checkpoint (it stores the model's own)")
    start = load_checkpoint(path, model=config.trusted_model)
    return start, load_dataset(config.data, seed=config.seed,
                               preprocess=start.spec.preprocess)


def read_inputs(config: PipelineConfig) -> tuple[DatasetBundle, Checkpoint | None]:
    """Everything `compress` reads and checks before it writes anything: the data, the
    checkpoint it starts from (its factory trusted when the config's `model:` names it, a
    user's state dict imported) and the stages' budgets (`preflight`)."""
    start, bundle = _start_checkpoint(config)
    if config.val > 0:
        bundle = carve_validation(bundle, config.val)
    if start is not None:
        check_data_fits(start, bundle.input_shape, bundle.num_classes, config.data)
    preflight(config, bundle, start)
    return bundle, start


def preflight(config: PipelineConfig, bundle: DatasetBundle,
              start: Checkpoint | None = None) -> None:
    """Refuse options no model can meet before anything is trained or written.

    A `quantize` stage's `size_kb` must at least hold what is never quantized (biases,
    norms, one scale per channel); only structured pruning before it can shrink that, so
    the check is exact until such a stage appears. A structured stage's `min_channels` must
    leave something to prune in the model as it starts.
    """
    from xaicompress.checkpoint import ModelSpec
    from xaicompress.pipeline.stages import check_min_channels
    from xaicompress.quant.integer import fixed_bytes, quantizable_layers

    probe = start
    if probe is None:
        assert config.model is not None
        spec = ModelSpec(config.model.name, tuple(bundle.input_shape), bundle.num_classes,
                         dict(config.model.kwargs))
        probe = Checkpoint(spec.build(), spec)
    shrunk = False
    for i, st in enumerate(config.stages):
        if st.type == "prune_structured":
            try:
                check_min_channels(probe, st.min_channels)  # type: ignore[union-attr]
            except OptionError as exc:
                raise exc.named(f"stages[{i}].{exc.option}") from None
            shrunk = True
        size_kb = getattr(st, "size_kb", None)
        if st.type == "quantize" and size_kb is not None and not shrunk:
            floor = fixed_bytes(probe, quantizable_layers(probe))
            if size_kb * 1024 < floor:
                raise XaiCompressError(
                    f"stages[{i}].size_kb: {size_kb} KiB is smaller than the smallest possible "
                    f"model; its unquantized parts alone take {floor / 1024:.2f} KiB")


def _make_baseline(config: PipelineConfig, bundle: DatasetBundle,
                   start: Checkpoint | None) -> Checkpoint:
    """The user's checkpoint (already read), or a model trained like `xaicompress train`
    (on the bundle already loaded: loading a dataset twice is slow)."""
    if start is not None:
        return start.copy()
    from xaicompress.train import train_checkpoint

    assert config.model is not None
    return train_checkpoint(config.model.name, config.data, seed=config.seed,
                            model_kwargs=dict(config.model.kwargs), bundle=bundle,
                            **config.train.model_dump())


def _measure(ckpt: Checkpoint, bundle: DatasetBundle, config: PipelineConfig, *, key: str,
             name: str, kind: str, criterion: str | None, seconds: float,
             fidelity: dict[str, Any]) -> Checkpoint:
    ckpt.metrics = {}
    # size_bytes is the size of this model's packed file (it holds no run bookkeeping)
    m = evaluate(ckpt, bundle.test, latency_repeats=config.report.latency_repeats)
    m["val_accuracy"] = _val_accuracy(ckpt, bundle)
    ckpt.metrics = {"accuracy": m["accuracy"], "val_accuracy": m["val_accuracy"],
                    "pipeline": {
        "key": key, "name": name, "type": kind, "criterion": criterion,
        "seconds": round(seconds, 3), "eval": m, "fidelity": fidelity}}
    return ckpt


def _val_accuracy(ckpt: Checkpoint, bundle: DatasetBundle) -> float | None:
    from xaicompress.train import accuracy

    return accuracy(ckpt.model, bundle.val) if bundle.val is not None else None


def _store(cache: StageCache, ckpt: Checkpoint, key: str, label: str) -> Checkpoint:
    from xaicompress.checkpoint import checkpoint_from_bytes

    raw = cache.save(ckpt, key, label)
    # Continue from the stored bytes, exactly what a resumed run would load.
    return _placed(checkpoint_from_bytes(raw, str(cache.path(key, label)), model=cache.model))


NO_DEEPLIFT = "DeepLIFT cannot explain this model"


class _Fidelity:
    """The explanation fidelity of each stage against the baseline (`report.fidelity`).

    Built lazily at the first computed stage. With `report: {fidelity: false}`, or when
    DeepLIFT has no rule for a module of the model, the maps are skipped: cosine and top-10
    overlap are NaN, `skipped` says why, and the prediction agreement is still measured."""

    def __init__(self, config: PipelineConfig, baseline: Checkpoint, bundle: DatasetBundle):
        self.config, self.baseline, self.bundle = config, baseline, bundle
        self.probe: Any = None
        self.skipped: str | None = None if config.report.fidelity else \
            "switched off (report: {fidelity: false})"
        self.reference: Any = None

    def measure(self, model: Any) -> dict[str, Any]:
        from xaicompress.report.fidelity import FidelityProbe

        if self.probe is None and self.skipped is None:
            try:
                self.probe = FidelityProbe.build(self.baseline.model, self.bundle,
                                                 self.config.report.fidelity_samples,
                                                 seed=self.config.seed)
            except XaiCompressError as exc:
                self.skipped = f"{NO_DEEPLIFT}: {exc}"
        if self.probe is not None:
            return self.probe.measure(model)
        return {"cosine": float("nan"), "top10_overlap": float("nan"),
                "agreement": self._agreement(model), "samples": 0, "skipped": self.skipped}

    def _agreement(self, model: Any) -> float:
        from xaicompress.train import predict

        if self.reference is None:
            self.reference = predict(self.baseline.model, self.bundle.test)[0].argmax(1)
        pred = predict(model, self.bundle.test)[0].argmax(1)
        return round(float((pred == self.reference).float().mean() * 100), 4)


def _kept(cache: StageCache, done: int, total: int) -> str:
    if done == 0:
        return "nothing was kept; the next run starts from scratch"
    what = "the baseline" + (f" and {done - 1} of {total} stage(s)" if done > 1 else "")
    return (f"{what} finished and kept in {cache.folder}; run the same command again to "
            "resume from there")


def run_pipeline(config: PipelineConfig, out_dir: str | os.PathLike[str], *,
                 cache_dir: str | os.PathLike[str] | None = None, plots: bool = True,
                 echo: Callable[[str], None] | None = None) -> PipelineResult:
    """Run `config` into `out_dir` and return the result (see module docstring).

    cache_dir: where stage checkpoints are kept (default OUT/cache); `compare` shares one
    across criteria so the baseline of a seed is trained once.
    echo: called with one line per step (e.g. print), for a terminal log.
    An interruption (SIGINT / SIGTERM) leaves every finished stage in the cache and is
    re-raised with a note of what was kept.
    Runs on `config.device` (`device: auto` = the GPU when there is one): every model is
    placed there after loading; files are written from CPU copies.
    """
    with use_runtime(_runtime(config)):
        return _run(config, out_dir, cache_dir, plots, echo)


def _runtime(config: PipelineConfig) -> Runtime:
    try:
        return config.runtime()
    except XaiCompressError as exc:  # the config's key, not the flag, when it came from there
        raise XaiCompressError(str(exc).replace("--device", "device:", 1)) from None


def _placed(ckpt: Checkpoint) -> Checkpoint:
    """`ckpt` with its model on the run's device (checkpoints load on the CPU)."""
    ckpt.model.to(current_device())
    return ckpt


def _run(config: PipelineConfig, out_dir: str | os.PathLike[str],
         cache_dir: str | os.PathLike[str] | None, plots: bool,
         echo: Callable[[str], None] | None) -> PipelineResult:
    t_start = time.perf_counter()
    check_out_dir(out_dir)
    bundle, start = read_inputs(config)
    if start is not None:
        _placed(start)
    out = prepare_out_dir(out_dir)
    cache = StageCache(cache_dir if cache_dir is not None else out / "cache",
                       model=config.trusted_model)
    res = _run_cached(config, cache, echo, bundle, start)
    try:
        res.files = write_result(res, out, plots=plots)
    except Interrupted as exc:
        exc.kept = f"the run had finished; its outputs in {out} were completed first"
        raise
    res.out_dir = out
    res.report = load_report(res.files["report_json"])
    res.seconds = time.perf_counter() - t_start
    return res


def run_in_memory(config: PipelineConfig, bundle: DatasetBundle, start: Checkpoint, *,
                  echo: Callable[[str], None] | None = None) -> PipelineResult:
    """`run_pipeline` for the Python API (`xc.compress`): the model and data are given as
    objects (`config` validated with `in_memory=True`), stages are cached in a temporary
    folder deleted afterwards, nothing is written; `write_result` writes the outputs."""
    import tempfile

    from xaicompress.export.packed import packed_report
    from xaicompress.report.report import build_report

    t_start = time.perf_counter()
    if config.val > 0:
        bundle = carve_validation(bundle, config.val)
    preflight(config, bundle, start)
    with use_runtime(_runtime(config)), tempfile.TemporaryDirectory(prefix="xaicompress-") as tmp:
        _placed(start)
        res = _run_cached(config, StageCache(tmp, model=start.spec.loader_model), echo,
                          bundle, start, in_memory=True)
    res.config = _heatmaps_possible(config, res.steps)
    sizes = packed_report(res.final)
    res.report = build_report(res.config, res.baseline, res.steps, sizes.file_bytes, {},
                              sizes.tensor_bits, searches=res.searches)
    res.seconds = time.perf_counter() - t_start
    return res


def _run_cached(config: PipelineConfig, cache: StageCache,
                echo: Callable[[str], None] | None, bundle: DatasetBundle,
                start: Checkpoint | None, in_memory: bool = False) -> PipelineResult:
    """The baseline and the stages through `cache` (no outputs written yet)."""
    steps: list[Checkpoint] = []
    searches: list[dict[str, Any]] = []
    try:
        baseline, cached = _run_stages(config, cache, steps, echo or (lambda _msg: None),
                                       bundle, start, in_memory, searches)
    except Interrupted as exc:
        exc.kept = _kept(cache, len(steps), len(config.stages))
        raise
    return PipelineResult(cache.folder, {}, baseline, steps[-1] if steps else baseline,
                          cached, steps=steps, config=_heatmaps_possible(config, steps),
                          bundle=bundle, searches=searches)


def write_result(res: PipelineResult, out_dir: str | os.PathLike[str], *,
                 plots: bool = True) -> dict[str, Path]:
    """Write a run's outputs (final checkpoint, packed file, ONNX, report, plots) into
    `out_dir` as one set (see `_write_outputs`); returns the files written."""
    assert res.config is not None and res.bundle is not None
    out = prepare_out_dir(out_dir)
    return _write_outputs(res.config, out, res.baseline, res.steps, res.bundle, plots,
                          res.searches)


def _run_stages(config: PipelineConfig, cache: StageCache, steps: list[Checkpoint],
                say: Callable[[str], None], bundle: DatasetBundle, start: Checkpoint | None,
                in_memory: bool = False, searches: list[dict[str, Any]] | None = None
                ) -> tuple[Checkpoint, list[bool]]:
    """The baseline and every stage, each from the cache or computed and stored; `steps`
    receives the baseline first (so an interruption knows how many were kept), and leaves
    with the stages only. in_memory: data given as objects (the cache lives for one run).
    With a `target`, each searchable stage's strength is searched first
    (`pipeline.budget`); `searches` receives one record per searched stage."""
    data_id = "python" if in_memory else data_fingerprint(
        bundle, memo=cache.folder / "data-fingerprints.json")
    # amp changes the numbers of every training: part of the keys (absent when off, so the
    # keys of float32 runs are those of before); the device is not (same numbers up to
    # float rounding, and a cache moves between a GPU and a CPU machine)
    amp = {"amp": config.amp} if config.amp != "off" else {}
    key = baseline_key(_source(config, start, in_memory),
                       {"spec": config.data, "content": data_id, "val": config.val},
                       {**config.train.model_dump(mode="json"), **amp}
                       if config.checkpoint is None else {}, config.seed)
    label = "00-baseline"
    baseline = _placed_or_none(cache.load(key, label))
    cached = [baseline is not None]
    if baseline is None:
        say("baseline: " + ("loading checkpoint" if start is not None else "training"))
        t0 = time.perf_counter()
        base = _make_baseline(config, bundle, start)
        base = _measure(base, bundle, config, key=key, name="baseline", kind="baseline",
                        criterion=None, seconds=time.perf_counter() - t0,
                        fidelity=dict(IDENTITY_FIDELITY, samples=0))
        baseline = _store(cache, base, key, label)
    else:
        say("baseline: cached")
    steps.append(baseline)

    run = _StageRun(config, cache, bundle, _Fidelity(config, baseline, bundle), say, baseline)
    floors = (stage_floors(baseline.metrics["val_accuracy"], config.target.max_drop,
                           list(config.stages))
              if config.target is not None else [None] * len(config.stages))
    # A stage left out although an earlier searched stage (not the one just before it, which
    # backed off already) could still weaken: that one backs off and every stage after it is
    # searched again (probes cached, so only the new ones run); the attempt with the
    # smallest final file is kept. (mnist5k?split=2 seed 1: sharing failed by 0.0003 pt of
    # margin after unstructured pruning backed off twice, and the run ended at 13x.)
    forced: dict[int, int] = {}
    exhausted: set[int] = set()
    attempts: list[tuple[list[Checkpoint], list[bool], list[dict[str, Any]]]] = []
    for attempt in range(CASCADES + 1):
        del steps[1:]  # the baseline stays (an interruption counts what was kept)
        del cached[1:]
        a_searches: list[dict[str, Any]] = []
        left_out, searched, last_backed = _search_and_run(
            config, run, floors, key, steps, cached, a_searches, say, forced, exhausted)
        attempts.append((list(steps), list(cached), a_searches))
        candidates = [s for s in searched
                      if left_out is not None and s < left_out and s != last_backed
                      and s not in exhausted]
        if not candidates or attempt == CASCADES:
            break
        k = max(candidates)
        forced[k] = forced.get(k, 0) + 1
        say(f"stage {left_out + 1}/{len(config.stages)} was left out: stage {k + 1} backs off "
            "and the stages after it are searched again")
    # the smallest final file (the first on a tie); one pass, the usual case, packs nothing
    kept_steps, kept_cached, kept_searches = (
        attempts[0] if len(attempts) == 1 else min(attempts, key=lambda a: packed_size(a[0][-1])))
    steps[:], cached[:] = kept_steps, kept_cached
    if searches is not None:
        searches.extend(kept_searches)
    steps.pop(0)
    return baseline, cached


def _search_and_run(config: PipelineConfig, run: _StageRun, floors: list[float | None],
                    key: str, steps: list[Checkpoint],
                    cached: list[bool], searches: list[dict[str, Any]],
                    say: Callable[[str], None], forced: dict[int, int], exhausted: set[int]
                    ) -> tuple[int | None, list[int], int | None]:
    """One pass over the stages from the baseline (`steps[0]`, keyed `key`): `steps` and
    `cached` receive each stage's checkpoint and cache flag, `searches` each searched
    stage's record; stage k of `forced` backs off that many times after its search (an
    index lands in `exhausted` when it has nothing weaker left). Returns the first stage
    left out (None: none), the searched stages kept, and the stage that backed off for the
    one left out (None: none could)."""
    ckpt = steps[0]
    n = len(config.stages)
    prev: _Searched | None = None  # the stage just run, when it was searched
    left_out: int | None = None
    last_backed: int | None = None
    searched: list[int] = []
    for i, st in enumerate(track(config.stages, "compress", total=n)):
        floor = floors[i]
        search = None
        if floor is not None:
            chosen, search = run.search(i, st, key, ckpt, floor)
            backing = prev
            for _ in range(BACK_OFFS):
                if chosen is not None or prev is None or not prev.weaker():
                    break
                say(f"stage {i + 1}/{n}: no setting keeps the budget; stage {prev.index + 1} "
                    f"backs off to {prev.result.field}={prev.result.chosen}")
                key, ckpt = run.back_off(prev, steps, cached)
                chosen, search = run.search(i, st, key, ckpt, floor)
            record = {"stage": i, "name": st.label(), "type": st.type, **search.as_dict()}
            searches.append(record)
            if chosen is None:
                say(f"stage {i + 1}/{n}: left out (no setting keeps the budget)"
                    + _margin_note(search, len(run.bundle.val)))
                if left_out is None:
                    left_out = i
                    last_backed = backing.index if backing is not None else None
                prev = None
                continue
            prev = _Searched(i, st, key, ckpt, search, record)
            for _ in range(forced.get(i, 0)):
                if not prev.weaker():
                    exhausted.add(i)
                    break
            if forced.get(i):
                say(f"stage {i + 1}/{n}: backs off to {search.field}={search.chosen}")
            st = _with_value(st, search.chosen)
            searched.append(i)
        else:
            prev = None
        key, hit, was_cached = run.stage(i, st, key, ckpt, search)
        cached.append(was_cached)
        steps.append(hit)
        ckpt = hit
    return left_out, searched, last_backed


def _margin_note(search: SearchResult, images: int) -> str:
    """Why a stage was left out, when its floor held but the margin did not: the user can
    then give the budget more validation images or a smaller margin."""
    held = [p for p in search.probes if p.val_accuracy >= search.floor]
    if not held or search.bound is None:
        return ""
    best = max(held, key=lambda p: p.val_accuracy)
    return (f"; at {search.field}={best.value} it kept its floor, but {search.margin:g} "
            f"standard error(s) of its drop on {images} validation images "
            f"({search.margin * best.drop_se:.2f} pt) left no room in the budget: more "
            "validation images (`val`) or a smaller `margin` would let it in")


#: how many times a searched stage that keeps the budget at no setting may make the stage
#: before it back off to its next weaker passing probe (each costs one more search)
BACK_OFFS = 2
#: how many times a stage left out after those back-offs makes an earlier searched stage
#: back off, with every stage after it searched again (`_run_stages`)
CASCADES = 2


@dataclass
class _Searched:
    """A searched stage as it was run: what a later stage needs to make it back off."""

    index: int
    stage: Any  # the configured stage (its strength at the config's value)
    key_before: str
    ckpt_before: Checkpoint
    result: SearchResult
    record: dict[str, Any]

    def weaker(self) -> bool:
        """Move `result.chosen` to the next weaker probe that passed (a larger file), or,
        when no weaker probe passed, to the setting halfway between the chosen one and the
        weakest (a setting the bisection takes to pass, as it does the weakest: a stage's
        accuracy falls with its strength). False when the chosen one is the weakest.
        (Without the halfway step a stage whose only passing probe was its first could not
        back off at all, and the next stage was left out: lenet5 ended at 9x, without its
        sharing, when 0.4 pt of a 0.5 pt budget remained.)"""
        sizes = {p.value: p.size_bytes for p in self.result.probes}
        assert self.result.chosen is not None
        bigger = ([p for p in self.result.probes if p.passed and
                   p.size_bytes > sizes[self.result.chosen]]
                  if self.result.chosen in sizes else [])  # a halfway setting is no probe
        if bigger:
            self.result.chosen = min(bigger, key=lambda p: p.size_bytes).value
        else:
            strength = strength_of(self.stage)
            assert strength is not None
            u = strength.position(self.result.chosen) / 2
            if u < strength.resolution():
                u = 0.0
            value = strength.value(u)
            if value == self.result.chosen:
                return False
            self.result.chosen = value
        self.record.update(chosen=self.result.chosen,
                           backed_off=int(self.record.get("backed_off", 0)) + 1)
        return True


def _placed_or_none(ckpt: Checkpoint | None) -> Checkpoint | None:
    return None if ckpt is None else _placed(ckpt)


@dataclass
class _StageRun:
    """Runs (or loads) one stage, and searches a stage's strength under a budget."""

    config: PipelineConfig
    cache: StageCache
    bundle: DatasetBundle
    fidelity: _Fidelity
    say: Callable[[str], None]
    baseline: Checkpoint | None = None
    _base_correct: Any = None

    def drop_of(self, model: Any) -> tuple[float, float]:
        """`model`'s validation accuracy (%) and the standard error (points) of its drop
        from the baseline, paired on the same validation images (`budget.paired_drop`)."""
        assert self.bundle.val is not None and self.baseline is not None
        if self._base_correct is None:
            self._base_correct = correct_on(self.baseline.model, self.bundle.val)
        correct = correct_on(model, self.bundle.val)
        return float(correct.float().mean() * 100), paired_drop(self._base_correct, correct)[1]

    def measured(self) -> dict[str, Any]:
        """What a stage's stored measurements depend on besides the stage itself."""
        return self.config.report.model_dump(include={"fidelity", "fidelity_samples",
                                                      "latency_repeats"})

    def stage_bundle(self, st: Any) -> tuple[DatasetBundle, int | None]:
        """The data a stage reads: in the post-training mode (`calibration: N`) a stage
        that does not fine-tune sees only N training images."""
        n = self.config.calibration
        if n is None or _fine_tunes(st):
            return self.bundle, None
        return calibration_bundle(self.bundle, n, seed=self.config.seed), n

    def key(self, previous: str, st: Any, seed: int, probe: bool = False) -> str:
        _, calibration = self.stage_bundle(st)
        amp = {"amp": self.config.amp} if self.config.amp != "off" else {}
        ident = {**st.model_dump(mode="json"), "measured": self.measured(), **amp}
        if calibration is not None:
            ident["calibration"] = calibration
        if probe:
            ident["probe"] = True
        return stage_key(previous, ident, seed)

    def stage(self, i: int, st: Any, previous: str, ckpt: Checkpoint,
              search: SearchResult | None) -> tuple[str, Checkpoint, bool]:
        seed_i = stage_seed(self.config.seed, i)
        key = self.key(previous, st, seed_i)
        label = f"{i + 1:02d}-{st.type}"
        n = len(self.config.stages)
        hit = _placed_or_none(self.cache.load(key, label))
        was_cached = hit is not None
        if hit is None:
            self.say(f"stage {i + 1}/{n} {st.label()}: running")
            t0 = time.perf_counter()
            new = (_placed_or_none(self.cache.load(self.key(previous, st, seed_i, probe=True),
                                                   f"{label}-probe"))
                   if search is not None else None)
            if new is None:
                bundle, _ = self.stage_bundle(st)
                try:
                    new = run_stage(ckpt, bundle, st, seed_i)
                except OptionError as exc:
                    raise exc.named(f"stages[{i}].{exc.option}") from None
            new = _measure(new, self.bundle, self.config, key=key, name=st.label(),
                           kind=st.type, criterion=getattr(st, "criterion", None),
                           seconds=time.perf_counter() - t0,
                           fidelity=self.fidelity.measure(new.model))
            hit = _store(self.cache, new, key, label)
        else:
            self.say(f"stage {i + 1}/{n} {st.label()}: cached")
        if search is not None:
            hit.metrics["pipeline"]["search"] = search.as_dict()
        return key, hit, was_cached

    def back_off(self, prev: _Searched, steps: list[Checkpoint], cached: list[bool]
                 ) -> tuple[str, Checkpoint]:
        """Run `prev`'s stage again at its (new) chosen value, a probe already cached, in
        place of the last step; returns the key and checkpoint the next stage starts from."""
        assert prev.result.chosen is not None
        st = _with_value(prev.stage, prev.result.chosen)
        key, hit, was_cached = self.stage(prev.index, st, prev.key_before, prev.ckpt_before,
                                          prev.result)
        steps[-1], cached[-1] = hit, was_cached
        return key, hit

    def search(self, i: int, st: Any, previous: str, ckpt: Checkpoint, floor: float
               ) -> tuple[Any, SearchResult]:
        """The stage with its strength chosen under the budget (None: left out)."""
        strength = strength_of(st)
        assert strength is not None
        seed_i = stage_seed(self.config.seed, i)
        label = f"{i + 1:02d}-{st.type}-probe"

        def with_value(value: float) -> Any:
            return _with_value(st, value)

        def run_probe(value: float) -> tuple[float, float, int, bool]:
            trial = with_value(value)
            key = self.key(previous, trial, seed_i, probe=True)
            hit = self.cache.load(key, label)
            if hit is not None:
                se = hit.metrics.get("val_drop_se")
                if se is None:  # cached before the margin existed: measure it now
                    se = self.drop_of(_placed(hit).model)[1]
                return (float(hit.metrics["val_accuracy"]), float(se),
                        int(hit.metrics["size_bytes"]), True)
            self.say(f"stage {i + 1} {st.label()}: probing {strength.field}={value}")
            bundle, _ = self.stage_bundle(trial)
            try:
                new = run_stage(ckpt, bundle, trial, seed_i)
            except OptionError as exc:
                raise exc.named(f"stages[{i}].{exc.option}") from None
            acc, se = self.drop_of(new.model)  # a target needs val > 0 (config check)
            new.metrics = {"val_accuracy": acc, "val_drop_se": se,
                           "size_bytes": packed_size(new),
                           "pipeline": {"key": key, "probe": True}}
            self.cache.save(new, key, label)
            return acc, se, new.metrics["size_bytes"], False

        target = self.config.target
        assert target is not None and self.baseline is not None
        bound = float(self.baseline.metrics["val_accuracy"]) - target.max_drop
        result = bisect_strength(strength, start_value(st, strength), floor, run_probe,
                                 probes=target.probes, bound=bound, margin=target.margin)
        chosen = with_value(result.chosen) if result.chosen is not None else None
        return chosen, result


def _with_value(st: Any, value: float) -> Any:
    """Stage `st` with its searched strength set to `value`."""
    strength = strength_of(st)
    assert strength is not None
    data = {**st.model_dump(exclude_unset=True), "type": st.type,
            strength.field: int(value) if strength.grid else float(value)}
    data.update({c: None for c in strength.clear})
    return stage_model(st.type).model_validate(data)


def _fine_tunes(st: Any) -> bool:
    """Whether a stage trains (then it reads the whole training split)."""
    if st.type == "finetune":
        return True
    return float(getattr(st, "finetune_epochs", 0) or 0) > 0 or float(
        getattr(st, "qat_epochs", 0) or 0) > 0


def _heatmaps_possible(config: PipelineConfig, steps: list[Checkpoint]) -> PipelineConfig:
    """`config`, with no heatmaps when DeepLIFT could not explain the model (the report's
    fidelity says why), so the outputs are still written."""
    reasons = [ck.metrics["pipeline"]["fidelity"].get("skipped") or "" for ck in steps]
    if not any(r.startswith(NO_DEEPLIFT) for r in reasons):
        return config
    return config.model_copy(update={"report": config.report.model_copy(
        update={"heatmaps": 0})})


MANIFEST_NAME = ".xaicompress-outputs.json"
REPORT_NAMES = ("report.json", "report.md")


def _read_manifest(out: Path) -> dict[str, str]:
    """name -> sha256 of the files the previous run wrote into `out` (empty if none)."""
    try:
        data = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
        files = data["files"]
        return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _remove_ours(out: Path, names: list[str], manifest: dict[str, str]) -> None:
    """Delete the named files of `out` that the previous run wrote and nobody changed since
    (same content as recorded); anything else, the user's files included, stays."""
    for name in names:
        p = out / name
        if name not in manifest or "/" in name or not p.is_file() or p.is_symlink():
            continue
        with contextlib.suppress(OSError):
            if file_hash(p) == manifest[name]:
                p.unlink()


def _write_outputs(config: PipelineConfig, out: Path, baseline: Checkpoint,
                   steps: list[Checkpoint], bundle: DatasetBundle, plots: bool,
                   searches: list[dict[str, Any]] | None = None) -> dict[str, Path]:
    """Write the output set consistently: the previous run's report goes first (so new model
    files never stand next to an old report), then the models, plots and the new report;
    files the previous run wrote that this one does not (model.onnx after `export: {onnx:
    false}`) are removed if unchanged; a manifest records what was written. A SIGINT /
    SIGTERM meanwhile is held until the set is complete. Only rank 0 writes (no collectives
    in there); the others wait for its list of files."""
    from xaicompress.distributed import broadcast_object, is_rank0

    files = None
    if is_rank0():
        with deferred():
            old = _read_manifest(out)
            _remove_ours(out, list(REPORT_NAMES), old)
            with record_writes() as written:
                files = write_outputs(config, out, baseline, steps, bundle, plots=plots,
                                      searches=searches)
            mine = {p.name: p for p in written if p.parent == out}
            _remove_ours(out, [n for n in old if n not in mine], old)
            atomic_write_text(out / MANIFEST_NAME, json.dumps(
                {"files": {n: file_hash(p) for n, p in sorted(mine.items())}}, indent=1) + "\n")
    return broadcast_object(files)
