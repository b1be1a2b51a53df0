from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console

from xaicompress.atomic import check_writable
from xaicompress.checkpoint import save_checkpoint
from xaicompress.cli_app import (
    DataOpt,
    SeedOpt,
    app,
    model_options,
    runtime_options,
    validate_options,
)
from xaicompress.pipeline.config import TrainConfig
from xaicompress.train import train_checkpoint


@app.command("train")
@runtime_options()
@model_options({None: TrainConfig}, panel="Training options")
def train_cmd(
    options: dict[str, Any],
    model: Annotated[str, typer.Option("--model", help="Registered name or "
                                       "package.module:factory.")] = "lenet5",
    data: DataOpt = "mnist5k",
    seed: SeedOpt = 0,
    out: Annotated[str, typer.Option("--out", help="Checkpoint to write.")] = "model.safetensors",
) -> None:
    """Train a model from scratch and save a checkpoint."""
    cfg = validate_options(TrainConfig, options, command="train")
    check_writable(out)
    ckpt = train_checkpoint(model, data, seed=seed, **cfg.model_dump())
    save_checkpoint(ckpt, out)
    Console().print(f"{model} on {data}: test accuracy {ckpt.metrics['accuracy']:.2f}% -> {out}")
