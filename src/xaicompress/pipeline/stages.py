"""The stage registry: config `type` -> the library step that runs it.

Each stage function has the shape `fn(ckpt, bundle, stage_config, seed) -> Checkpoint`: it
calls one library step (pruning, weight sharing, quantization, fine-tuning) with the
options of its config, and never mutates `ckpt`. The pipeline knows nothing else about a
stage, so a new compression step adds one function here and one config model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xaicompress.checkpoint import Checkpoint
from xaicompress.data import DatasetBundle
from xaicompress.errors import XaiCompressError
from xaicompress.pipeline.config import (
    FinetuneStage,
    PruneStructuredStage,
    PruneUnstructuredStage,
    QuantizeStage,
    ShareStage,
)

StageFn = Callable[[Checkpoint, DatasetBundle, Any, int], Checkpoint]
STAGES: dict[str, StageFn] = {}


def register_stage(stage_type: str) -> Callable[[StageFn], StageFn]:
    def deco(fn: StageFn) -> StageFn:
        STAGES[stage_type] = fn
        return fn

    return deco


def run_stage(ckpt: Checkpoint, bundle: DatasetBundle, stage: Any, seed: int) -> Checkpoint:
    """Run one configured stage on a copy of `ckpt` (seeded with `seed`)."""
    fn = STAGES.get(stage.type)
    if fn is None:
        raise XaiCompressError(f"stage type {stage.type!r}: no implementation registered "
                               f"(known: {', '.join(STAGES)})")
    return fn(ckpt, bundle, stage, seed)


def stage_criterion(spec: str, seed: int) -> Any:
    """Build the criterion of a stage. A criterion that declares `seeded` (random, sampled
    references) and was not given a seed in its spec gets the stage's seed, so `compare`
    over seeds really varies it. (The data's normalisation reaches DeepLIFT through
    `compute_relevance`, which every step calls with the whole bundle.)"""
    if spec.startswith("tp:"):
        return spec  # Torch-Pruning importances are resolved by the structured pruner
    from xaicompress.relevance import get_criterion

    return get_criterion(spec, default_seed=seed)


@register_stage("prune_structured")
def _prune_structured(ckpt: Checkpoint, bundle: DatasetBundle, st: PruneStructuredStage,
                      seed: int) -> Checkpoint:
    from xaicompress.prune.structured import prune_structured

    return prune_structured(ckpt, stage_criterion(st.criterion, seed), bundle, seed=seed,
                            **st.options())


@register_stage("prune_unstructured")
def _prune_unstructured(ckpt: Checkpoint, bundle: DatasetBundle, st: PruneUnstructuredStage,
                        seed: int) -> Checkpoint:
    from xaicompress.prune.unstructured import prune_unstructured

    return prune_unstructured(ckpt, stage_criterion(st.criterion, seed), bundle, seed=seed,
                              **st.options())


@register_stage("share")
def _share(ckpt: Checkpoint, bundle: DatasetBundle, st: ShareStage, seed: int) -> Checkpoint:
    from xaicompress.quant.codebook import share_weights

    return share_weights(ckpt, stage_criterion(st.criterion, seed), bundle, seed=seed,
                         **st.options())


@register_stage("quantize")
def _quantize(ckpt: Checkpoint, bundle: DatasetBundle, st: QuantizeStage,
              seed: int) -> Checkpoint:
    from xaicompress.quant.integer import quantize

    return quantize(ckpt, stage_criterion(st.criterion, seed), bundle, seed=seed,
                    **st.options())


@register_stage("finetune")
def _finetune(ckpt: Checkpoint, bundle: DatasetBundle, st: FinetuneStage,
              seed: int) -> Checkpoint:
    """Fine-tune with the training that keeps this checkpoint's constraints: centroid
    training when layers are shared, straight-through QAT when integer-quantized, masked
    training otherwise (the projection is exact for masks)."""
    layers = ckpt.state.layers.values()
    batch = {"batch_size": st.batch_size} if st.batch_size is not None else {}
    if any(lc.codebook is not None for lc in layers):
        from xaicompress.quant.codebook import finetune_shared

        return finetune_shared(ckpt, bundle.train, epochs=st.epochs, lr=st.lr, seed=seed,
                               **batch)
    if any(lc.bits is not None for lc in layers):
        from xaicompress.quant.qat import qat_train

        out = ckpt.copy()
        qat_train(out, bundle.train, epochs=st.epochs, lr=st.lr or 1e-4, seed=seed, **batch)
        out.history.append({"stage": "qat", "epochs": st.epochs, "lr": st.lr, "seed": seed})
        return out
    from xaicompress.train import finetune_checkpoint

    return finetune_checkpoint(ckpt, bundle.train, epochs=st.epochs, lr=st.lr, seed=seed,
                               optimizer=st.optimizer, **batch)
