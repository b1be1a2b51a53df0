from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console

from xaicompress.atomic import check_writable
from xaicompress.checkpoint import save_checkpoint
from xaicompress.cli_app import (
    CkptDataOpt,
    SeedOpt,
    TrustOpt,
    app,
    model_options,
    runtime_options,
    validate_options,
)
from xaicompress.commands._step import load_inputs, run_step
from xaicompress.pipeline.config import FinetuneStage
from xaicompress.train import accuracy


@app.command("finetune")
@runtime_options()
@model_options({None: FinetuneStage})
def finetune_cmd(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint (or packed file) to "
                                              "fine-tune.")],
    options: dict[str, Any],
    model: TrustOpt = None,
    data: CkptDataOpt = None,
    seed: SeedOpt = 0,
    out: Annotated[str, typer.Option("--out", help="Fine-tuned checkpoint to write.")]
    = "finetuned.safetensors",
) -> None:
    """Fine-tune keeping every constraint: masks, codebooks (centroid training) and integer
    grids (QAT) stay as they are."""
    stage = validate_options(FinetuneStage, options, command="finetune",
                             fixed={"type": "finetune"})
    check_writable(out)
    ckpt, bundle, spec = load_inputs(checkpoint, model, data, seed)
    before = accuracy(ckpt.model, bundle.test)
    tuned = run_step(ckpt, bundle, stage, seed)
    tuned.metrics = {**tuned.metrics, "accuracy": accuracy(tuned.model, bundle.test)}
    save_checkpoint(tuned, out)
    Console().print(f"{checkpoint} on {spec}: test accuracy {before:.2f}% -> "
                    f"{tuned.metrics['accuracy']:.2f}% -> {out}")
