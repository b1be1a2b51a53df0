from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from xaicompress.cli_app import SeedOpt, app
from xaicompress.data import load_dataset
from xaicompress.metrics import evaluate
from xaicompress.train import train_checkpoint


@app.command("demo")
def demo_cmd(
    seed: SeedOpt = 0,
    epochs: Annotated[float, typer.Option("--epochs", min=0)] = 15,
) -> None:
    """Train LeNet-5 on the embedded MNIST digits and print its measurements."""
    t0 = time.perf_counter()
    ckpt = train_checkpoint("lenet5", "mnist5k", epochs=epochs, seed=seed)
    m = evaluate(ckpt, load_dataset("mnist5k").test)
    t = Table(title="lenet5 on mnist5k")
    for col in ("accuracy %", "params", "MACs", "size bytes", "latency ms (batch 64)"):
        t.add_column(col, justify="right")
    t.add_row(f"{m['accuracy']:.2f}", str(m["params"]), str(m["macs"]), str(m["size_bytes"]),
              f"{m['latency_ms']:.2f}")
    Console().print(t)
    Console().print(f"done in {time.perf_counter() - t0:.1f} s")
