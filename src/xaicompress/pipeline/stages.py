"""The stage registry: config `type` -> its options model and the function that runs it.

A stage is a pydantic model of its options (in `pipeline/config.py`: types, defaults,
ranges, help) and a runner `fn(ckpt, bundle, stage_config, seed) -> Checkpoint` that calls
one library step (pruning, weight sharing, quantization, fine-tuning) with those options and
never mutates `ckpt`. `compress` runs configured stages through `run_stage`, and so do the
`prune`, `share`, `quantize` and `finetune` commands: one runner, one set of defaults.
A new step adds its model to `config.STAGE_MODELS` and one `@register_stage(Model)` here;
registering a type twice is an error, never a silent overwrite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xaicompress.checkpoint import Checkpoint
from xaicompress.data import DatasetBundle
from xaicompress.errors import OptionError, XaiCompressError
from xaicompress.pipeline.config import (
    STAGE_MODELS,
    FinetuneStage,
    PruneStructuredStage,
    PruneUnstructuredStage,
    QuantizeStage,
    ShareStage,
)

StageFn = Callable[[Checkpoint, DatasetBundle, Any, int], Checkpoint]


@dataclass(frozen=True)
class StageDef:
    """A registered stage: its options model and its runner."""

    model: type
    run: StageFn


STAGES: dict[str, StageDef] = {}


def register_stage(model: type, *, replace: bool = False) -> Callable[[StageFn], StageFn]:
    """Register `fn` as the runner of `model`'s stage type; refuses a type already
    registered unless `replace=True` (an explicit overwrite)."""
    stage_type = model.stage_type()  # type: ignore[attr-defined]

    def deco(fn: StageFn) -> StageFn:
        if stage_type in STAGES and not replace:
            raise ValueError(f"stage type {stage_type!r} is already registered (by "
                             f"{STAGES[stage_type].run.__qualname__}); pass replace=True to "
                             "overwrite it")
        STAGES[stage_type] = StageDef(model, fn)
        return fn

    return deco


def run_stage(ckpt: Checkpoint, bundle: DatasetBundle, stage: Any, seed: int) -> Checkpoint:
    """Run one configured stage on a copy of `ckpt` (seeded with `seed`)."""
    entry = STAGES.get(stage.type)
    if entry is None:
        raise XaiCompressError(f"stage type {stage.type!r}: no implementation registered "
                               f"(known: {', '.join(STAGES)})")
    return entry.run(ckpt, bundle, stage, seed)


def stage_criterion(spec: str, seed: int) -> Any:
    """Build the criterion of a stage. A criterion that declares `seeded` (random, sampled
    references) and was not given a seed in its spec gets the stage's seed, so `compare`
    over seeds really varies it. (The data's normalisation reaches DeepLIFT through
    `compute_relevance`, which every step calls with the whole bundle.)"""
    if spec.startswith("tp:"):
        return spec  # Torch-Pruning importances are resolved by the structured pruner
    from xaicompress.relevance import get_criterion

    return get_criterion(spec, default_seed=seed)


@register_stage(PruneStructuredStage)
def _prune_structured(ckpt: Checkpoint, bundle: DatasetBundle, st: PruneStructuredStage,
                      seed: int) -> Checkpoint:
    from xaicompress.prune.structured import prune_structured

    check_min_channels(ckpt, st.min_channels)
    return prune_structured(ckpt, stage_criterion(st.criterion, seed), bundle, seed=seed,
                            **st.options())


def check_min_channels(ckpt: Checkpoint, min_channels: int) -> None:
    """A floor at or above every layer's width would prune nothing: say so."""
    from torch import nn

    widths = [m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
              for m in ckpt.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    widest = max(widths[:-1] or widths, default=0)  # the classifier's outputs never go
    if widths and min_channels >= widest:
        raise OptionError("min_channels", min_channels, f"expected fewer than the widest "
                          f"prunable layer's {widest} channels (nothing could be pruned)")


@register_stage(PruneUnstructuredStage)
def _prune_unstructured(ckpt: Checkpoint, bundle: DatasetBundle, st: PruneUnstructuredStage,
                        seed: int) -> Checkpoint:
    from xaicompress.prune.unstructured import prune_unstructured

    return prune_unstructured(ckpt, stage_criterion(st.criterion, seed), bundle, seed=seed,
                              **st.options())


@register_stage(ShareStage)
def _share(ckpt: Checkpoint, bundle: DatasetBundle, st: ShareStage, seed: int) -> Checkpoint:
    from xaicompress.quant.codebook import share_weights

    return share_weights(ckpt, stage_criterion(st.criterion, seed), bundle, seed=seed,
                         **st.options())


@register_stage(QuantizeStage)
def _quantize(ckpt: Checkpoint, bundle: DatasetBundle, st: QuantizeStage,
              seed: int) -> Checkpoint:
    from xaicompress.quant.integer import quantize

    return quantize(ckpt, stage_criterion(st.criterion, seed), bundle, seed=seed,
                    **st.options())


@register_stage(FinetuneStage)
def _finetune(ckpt: Checkpoint, bundle: DatasetBundle, st: FinetuneStage,
              seed: int) -> Checkpoint:
    """Fine-tune with the training that keeps this checkpoint's constraints: centroid
    training when layers are shared, straight-through QAT when integer-quantized, masked
    training otherwise (the projection is exact for masks). Options left unset (None) take
    that training's own default."""
    layers = ckpt.state.layers.values()
    given = {k: v for k, v in (("lr", st.lr), ("batch_size", st.batch_size)) if v is not None}
    given["distill"] = st.distill
    if any(lc.codebook is not None for lc in layers):
        from xaicompress.quant.share_finetune import finetune_shared

        return finetune_shared(ckpt, bundle.train, epochs=st.epochs, seed=seed,
                               val_set=bundle.val, **given)
    if any(lc.grid is not None for lc in layers):
        from xaicompress.quant.qat import qat_train

        out = ckpt.copy()
        qat_train(out, bundle.train, epochs=st.epochs, seed=seed, **given)
        out.history.append({"stage": "qat", "epochs": st.epochs, "lr": st.lr, "seed": seed})
        return out
    from xaicompress.train import finetune_checkpoint

    return finetune_checkpoint(ckpt, bundle.train, epochs=st.epochs, seed=seed,
                               optimizer=st.optimizer, **given)


_missing = [m.stage_type() for m in STAGE_MODELS if m.stage_type() not in STAGES]
if _missing:  # a model in the config schema without a runner: fail at import, not mid-run
    raise ImportError(f"stage types without a runner: {_missing}")
