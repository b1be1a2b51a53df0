from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from xaicompress.atomic import check_writable
from xaicompress.cli_app import SeedOpt, TrustOpt, app
from xaicompress.errors import XaiCompressError

FORMATS = ("onnx", "packed")


@app.command("export")
def export_cmd(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint (or packed) file.")],
    model: TrustOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="onnx (Q/DQ for quantized layers) or "
                                     "packed (the small packed model file).")] = "onnx",
    seed: SeedOpt = 0,
    out: Annotated[str, typer.Option("--out", help="File to write.")] = "model.onnx",
) -> None:
    """Export a checkpoint for a runtime: ONNX with a dynamic batch, or the packed file."""
    if fmt not in FORMATS:
        raise XaiCompressError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    check_writable(out)
    from xaicompress.export.packed import load_any

    ckpt = load_any(checkpoint, model=model)
    if fmt == "onnx":
        from xaicompress.export.onnx import export_onnx

        export_onnx(ckpt, out)
    else:
        from xaicompress.export.packed import write_packed

        write_packed(ckpt, out)
    import os

    Console().print(f"{checkpoint} -> {out} ({fmt}, {os.path.getsize(out)} bytes)")
