"""`compress`: take a model and data through the configured stages, cache every stage,
write the packed file, ONNX, the final checkpoint, report.json / report.md and plots.

Determinism: the baseline trains with the config seed; stage i (0-based) runs with seed
`stage_seed(seed, i)`; each stage starts from the checkpoint *as stored in the cache*, so
an interrupted run resumed from its cache computes exactly what an uninterrupted one does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xaicompress.atomic import check_writable
from xaicompress.checkpoint import Checkpoint, check_data_fits, load_checkpoint
from xaicompress.data import DatasetBundle, load_dataset
from xaicompress.errors import XaiCompressError
from xaicompress.metrics import evaluate
from xaicompress.pipeline.cache import StageCache, baseline_key, file_hash, stage_key
from xaicompress.pipeline.config import PipelineConfig
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


def prepare_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Create the output folder (its parent must exist) and check it is writable."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise XaiCompressError(f"--out {out}: exists and is not a folder")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise XaiCompressError(f"--out {out}: parent folder {parent} does not exist")
    try:
        out.mkdir(exist_ok=True)
    except OSError as exc:
        raise XaiCompressError(f"--out {out}: cannot create folder ({exc.strerror})") from None
    check_writable(out / "report.json")
    from xaicompress.atomic import remove_stale_temps

    for folder in (out, out / "cache"):
        remove_stale_temps(folder)
    return out


def _source(config: PipelineConfig) -> dict[str, Any]:
    if config.checkpoint is not None:
        p = Path(config.checkpoint)
        if not p.is_file():
            raise XaiCompressError(f"checkpoint {p}: file does not exist")
        return {"checkpoint_sha256": file_hash(p)}
    assert config.model is not None
    return {"model": config.model.name, "kwargs": config.model.kwargs}


def preflight(config: PipelineConfig, bundle: DatasetBundle) -> None:
    """Refuse budgets no model can meet before anything is trained or written.

    A `quantize` stage's `size_kb` must at least hold what is never quantized (biases,
    norms, one scale per channel); only structured pruning before it can shrink that, so
    the check is exact until such a stage appears.
    """
    from xaicompress.checkpoint import ModelSpec
    from xaicompress.quant.integer import fixed_bytes, quantizable_layers

    if config.checkpoint is not None:
        return  # its size is known only after loading it; the stage itself will check
    assert config.model is not None
    spec = ModelSpec(config.model.name, tuple(bundle.input_shape), bundle.num_classes,
                     dict(config.model.kwargs))
    probe: Checkpoint | None = None
    for i, st in enumerate(config.stages):
        if st.type == "prune_structured":
            return
        size_kb = getattr(st, "size_kb", None)
        if st.type == "quantize" and size_kb is not None:
            probe = probe or Checkpoint(spec.build(), spec)
            floor = fixed_bytes(probe, quantizable_layers(probe))
            if size_kb * 1024 < floor:
                raise XaiCompressError(
                    f"stages[{i}].size_kb: {size_kb} KiB is smaller than the smallest possible "
                    f"model; its unquantized parts alone take {floor / 1024:.2f} KiB")


def _make_baseline(config: PipelineConfig, bundle: DatasetBundle) -> Checkpoint:
    """The user's checkpoint, or a model trained like `xaicompress train` (on the bundle
    already loaded: loading a dataset twice is slow)."""
    if config.checkpoint is not None:
        ckpt = load_checkpoint(config.checkpoint)
        check_data_fits(ckpt, bundle.input_shape, bundle.num_classes, config.data)
        return ckpt
    from xaicompress.train import train_checkpoint

    assert config.model is not None
    t = config.train
    return train_checkpoint(config.model.name, config.data, epochs=t.epochs, seed=config.seed,
                            optimizer=t.optimizer, lr=t.lr, batch_size=t.batch_size,
                            model_kwargs=dict(config.model.kwargs), augment=t.augment,
                            bundle=bundle)


def _measure(ckpt: Checkpoint, bundle: DatasetBundle, config: PipelineConfig, *, key: str,
             name: str, kind: str, criterion: str | None, seconds: float,
             fidelity: dict[str, Any]) -> Checkpoint:
    ckpt.metrics = {}
    # size_bytes is the size of this model's packed file (it holds no run bookkeeping)
    m = evaluate(ckpt, bundle.test, latency_repeats=config.report.latency_repeats)
    ckpt.metrics = {"accuracy": m["accuracy"], "pipeline": {
        "key": key, "name": name, "type": kind, "criterion": criterion,
        "seconds": round(seconds, 3), "eval": m, "fidelity": fidelity}}
    return ckpt


def _store(cache: StageCache, ckpt: Checkpoint, key: str, label: str) -> Checkpoint:
    from xaicompress.checkpoint import checkpoint_from_bytes

    raw = cache.save(ckpt, key, label)
    # Continue from the stored bytes, exactly what a resumed run would load.
    return checkpoint_from_bytes(raw, str(cache.path(key, label)), model=cache.model)


def run_pipeline(config: PipelineConfig, out_dir: str | os.PathLike[str], *,
                 cache_dir: str | os.PathLike[str] | None = None, plots: bool = True,
                 echo: Callable[[str], None] | None = None) -> PipelineResult:
    """Run `config` into `out_dir` and return the result (see module docstring).

    cache_dir: where stage checkpoints are kept (default OUT/cache); `compare` shares one
    across criteria so the baseline of a seed is trained once.
    echo: called with one line per step (e.g. print), for a terminal log.
    """
    from xaicompress.report.fidelity import FidelityProbe

    say = echo or (lambda _msg: None)
    t_start = time.perf_counter()
    out = prepare_out_dir(out_dir)
    cache = StageCache(cache_dir if cache_dir is not None else out / "cache",
                       model=config.model.name if config.model else None)
    bundle = load_dataset(config.data, seed=config.seed)
    preflight(config, bundle)
    source = _source(config)
    key = baseline_key(source, config.data,
                       config.train.model_dump(mode="json") if config.model else {},
                       config.seed)
    label = "00-baseline"
    baseline = cache.load(key, label)
    cached = [baseline is not None]
    if baseline is None:
        say("baseline: " + ("loading checkpoint" if config.checkpoint else "training"))
        t0 = time.perf_counter()
        base = _make_baseline(config, bundle)
        base = _measure(base, bundle, config, key=key, name="baseline", kind="baseline",
                        criterion=None, seconds=time.perf_counter() - t0,
                        fidelity=dict(IDENTITY_FIDELITY, samples=0))
        baseline = _store(cache, base, key, label)
    else:
        say("baseline: cached")

    probe: FidelityProbe | None = None
    steps: list[Checkpoint] = []
    ckpt = baseline
    n = len(config.stages)
    for i, st in enumerate(track(config.stages, "compress", total=n)):
        seed_i = stage_seed(config.seed, i)
        key = stage_key(key, st.model_dump(mode="json"), seed_i)
        label = f"{i + 1:02d}-{st.type}"
        hit = cache.load(key, label)
        cached.append(hit is not None)
        if hit is None:
            say(f"stage {i + 1}/{n} {st.label()}: running")
            t0 = time.perf_counter()
            new = run_stage(ckpt, bundle, st, seed_i)
            seconds = time.perf_counter() - t0
            if probe is None:
                probe = FidelityProbe.build(baseline.model, bundle,
                                            config.report.fidelity_samples, seed=config.seed)
            fid = probe.measure(new.model)
            new = _measure(new, bundle, config, key=key, name=st.label(), kind=st.type,
                           criterion=getattr(st, "criterion", None), seconds=seconds,
                           fidelity=fid)
            hit = _store(cache, new, key, label)
        else:
            say(f"stage {i + 1}/{n} {st.label()}: cached")
        steps.append(hit)
        ckpt = hit

    from xaicompress.distributed import broadcast_object, is_rank0

    # Only rank 0 writes the outputs (no collectives in there); the others wait for its
    # list of files and read its report.
    files = write_outputs(config, out, baseline, steps, bundle, plots=plots) if is_rank0() \
        else None
    files = broadcast_object(files)

    report = load_report(files["report_json"])
    return PipelineResult(out, report, baseline, ckpt, cached, files,
                          time.perf_counter() - t_start)
