from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xaicompress.cli_app import app
from xaicompress.commands.compress import SeedOverride, run_compress
from xaicompress.errors import XaiCompressError

DEMO_CONFIG = "lenet5-mnist.yaml"


def demo_config_path() -> Path:
    """The shipped configs/lenet5-mnist.yaml (package data, so wheels have it too)."""
    import xaicompress

    cand = Path(xaicompress.__file__).resolve().parent / "configs" / DEMO_CONFIG
    if not cand.is_file():
        raise XaiCompressError(f"demo: the shipped config {cand} is missing; reinstall "
                               "xaicompress or pass --config")
    return cand


@app.command("demo")
def demo_cmd(
    seed: SeedOverride = None,
    out: Annotated[str, typer.Option("--out", help="Output folder.")] = "xaicompress-demo",
    config: Annotated[str | None, typer.Option("--config", help="Config to run instead of "
                                               f"configs/{DEMO_CONFIG}.")] = None,
) -> None:
    """Compress LeNet-5 on the embedded MNIST digits (configs/lenet5-mnist.yaml): prune,
    share weights, export, and report. Fast the second time (stages are cached)."""
    run_compress(config or str(demo_config_path()), out, seed=seed, as_json=False)
