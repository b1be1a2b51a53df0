"""What the step commands (prune, share, quantize, finetune) share: load the checkpoint and
its data, run the configured stage through the pipeline's own runner."""

from __future__ import annotations

from collections.abc import Mapping

from xaicompress.checkpoint import Checkpoint, check_data_fits
from xaicompress.cli_app import option_error
from xaicompress.data import DEFAULT_SPEC, DatasetBundle, load_dataset
from xaicompress.errors import OptionError
from xaicompress.pipeline.stages import run_stage


def load_inputs(checkpoint: str, model: str | None, data: str | None, seed: int
                ) -> tuple[Checkpoint, DatasetBundle, str]:
    """The checkpoint (or packed file), loaded on the CPU and placed on the command's
    `--device`, and its data (`data`, else the checkpoint's own)."""
    from xaicompress.device import current_device
    from xaicompress.export.packed import load_any

    ckpt = load_any(checkpoint, model=model)
    ckpt.model.to(current_device())
    spec = data or ckpt.data or DEFAULT_SPEC
    bundle = load_dataset(spec, seed=seed, preprocess=ckpt.spec.preprocess)
    check_data_fits(ckpt, bundle.input_shape, bundle.num_classes, spec)
    return ckpt, bundle, spec


def run_step(ckpt: Checkpoint, bundle: DatasetBundle, stage: object, seed: int,
             flags: Mapping[str, tuple[str, ...]] | None = None) -> Checkpoint:
    """`run_stage` (what `compress` runs), with a step's option errors named by flag."""
    try:
        return run_stage(ckpt, bundle, stage, seed)
    except OptionError as exc:
        raise option_error(exc, flags) from None
