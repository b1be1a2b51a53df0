from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from xaicompress.atomic import check_writable
from xaicompress.checkpoint import save_checkpoint
from xaicompress.cli_app import DataOpt, SeedOpt, app
from xaicompress.train import train_checkpoint


@app.command("train")
def train_cmd(
    model: Annotated[str, typer.Option("--model", help="Registered name or "
                                       "package.module:factory.")] = "lenet5",
    data: DataOpt = "mnist5k",
    epochs: Annotated[float, typer.Option("--epochs", min=0)] = 15,
    optimizer: Annotated[str, typer.Option("--optimizer", help="adam or sgd")] = "adam",
    lr: Annotated[float | None, typer.Option("--lr", min=0)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    augment: Annotated[int | None, typer.Option(
        "--augment", min=0, help="Random shifts of up to N pixels while training (0 = off; "
        "default: image height // 12).")] = None,
    seed: SeedOpt = 0,
    out: Annotated[str, typer.Option("--out", help="Checkpoint to write.")] = "model.safetensors",
) -> None:
    """Train a model from scratch and save a checkpoint."""
    check_writable(out)
    ckpt = train_checkpoint(model, data, epochs=epochs, seed=seed, optimizer=optimizer, lr=lr,
                            batch_size=batch_size, augment=augment)
    save_checkpoint(ckpt, out)
    Console().print(f"{model} on {data}: test accuracy {ckpt.metrics['accuracy']:.2f}% -> {out}")
