from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

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
from xaicompress.pipeline.config import ShareStage

#: earlier spellings kept working
FLAGS = {"codebook_dtype": ("--codebook-dtype", "--codebook"),
         "finetune_lr": ("--finetune-lr", "--lr")}


@app.command("share")
@runtime_options()
@model_options({None: ShareStage}, flags=FLAGS)
def share_cmd(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint (or packed file) to share.")],
    options: dict[str, Any],
    model: TrustOpt = None,
    data: CkptDataOpt = None,
    seed: SeedOpt = 0,
    out: Annotated[str, typer.Option("--out", help="Shared checkpoint to write.")] = (
        "shared.safetensors"),
    packed: Annotated[str | None, typer.Option("--packed", help="Also write the packed model "
                                               "file here.")] = None,
) -> None:
    """Share weights: relevance-weighted k-means per layer, optional centroid fine-tuning."""
    from xaicompress.export.packed import packed_report, write_packed
    from xaicompress.train import accuracy

    stage = validate_options(ShareStage, options, command="share", flags=FLAGS,
                             fixed={"type": "share"})
    check_writable(out)
    if packed:
        check_writable(packed)
    ckpt, bundle, _ = load_inputs(checkpoint, model, data, seed)
    shared = run_step(ckpt, bundle, stage, seed, FLAGS)
    acc_before, acc_after = accuracy(ckpt.model, bundle.test), accuracy(shared.model,
                                                                        bundle.test)
    size_before, size_after = packed_report(ckpt), packed_report(shared)
    shared.metrics = {**shared.metrics, "accuracy": acc_after,
                      "size_bytes": size_after.file_bytes}
    save_checkpoint(shared, out)
    if packed:
        write_packed(shared, packed)

    info = next(h for h in reversed(shared.history) if h.get("stage") == "share")
    con = Console()
    budget = f"k={stage.clusters}" if stage.clusters else f"avg {stage.avg_bits} bits"
    t = Table(title=f"weight sharing ({stage.criterion}, {budget})")
    for col in ("layer", "weights", "k", "bits"):
        t.add_column(col, justify="left" if col == "layer" else "right")
    for name, row in info["layers"].items():
        t.add_row(name, str(row["weights"]), str(row["k"]), str(row["bits"]))
    con.print(t)
    s = Table(title="before / after")
    for col in ("", "accuracy %", "packed bytes"):
        s.add_column(col, justify="right")
    s.add_row("before", f"{acc_before:.2f}", str(size_before.file_bytes))
    s.add_row("after", f"{acc_after:.2f}", str(size_after.file_bytes))
    con.print(s)
    con.print(f"compression x{size_before.file_bytes / max(1, size_after.file_bytes):.1f}; "
              f"header {size_after.header_bytes} B; payload {size_after.payload_bytes} B vs "
              f"theoretical {size_after.theoretical_bytes:.0f} B -> {out}"
              + (f", {packed}" if packed else ""))
