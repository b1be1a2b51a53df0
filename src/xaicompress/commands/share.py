from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from xaicompress.atomic import check_writable
from xaicompress.checkpoint import check_data_fits, save_checkpoint
from xaicompress.cli_app import DataOpt, SeedOpt, TrustOpt, app
from xaicompress.data import load_dataset
from xaicompress.errors import XaiCompressError
from xaicompress.relevance import get_criterion


@app.command("share")
def share_cmd(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint (or packed file) to share.")],
    model: TrustOpt = None,
    data: DataOpt = "mnist5k",
    criterion: Annotated[str, typer.Option("--criterion", help="Weights the k-means: deeplift, "
                                           "taylor, l1, ...; none = plain k-means.")] = "none",
    clusters: Annotated[int | None, typer.Option("--clusters", help="k shared values in every "
                                                 "layer (2..256).")] = None,
    avg_bits: Annotated[float | None, typer.Option("--avg-bits", help="Average index bits; "
                                                   "clusters per layer from the bit-allocation "
                                                   "solver.")] = None,
    finetune_epochs: Annotated[float, typer.Option("--finetune-epochs", min=0,
                                                   help="Epochs of centroid training.")] = 0,
    lr: Annotated[float | None, typer.Option("--lr", min=0, help="Centroid fine-tuning "
                                             "learning rate.")] = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Samples scoring the "
                                         "relevance.")] = 512,
    codebook: Annotated[str, typer.Option("--codebook", help="Codebook dtype: fp16 or "
                                          "fp32.")] = "fp16",
    seed: SeedOpt = 0,
    out: Annotated[str, typer.Option("--out", help="Shared checkpoint to write.")] = (
        "shared.safetensors"),
    packed: Annotated[str | None, typer.Option("--packed", help="Also write the packed model "
                                               "file here.")] = None,
) -> None:
    """Share weights: relevance-weighted k-means per layer, optional centroid fine-tuning."""
    from xaicompress.export.packed import load_any, packed_report, write_packed
    from xaicompress.quant.codebook import share_weights
    from xaicompress.train import accuracy

    if (clusters is None) == (avg_bits is None):
        raise XaiCompressError("share: give exactly one of --clusters K and --avg-bits B")
    check_writable(out)
    if packed:
        check_writable(packed)
    crit = get_criterion(criterion)
    ckpt = load_any(checkpoint, model=model)
    bundle = load_dataset(data, seed=seed)
    check_data_fits(ckpt, bundle.input_shape, bundle.num_classes, data)

    shared = share_weights(ckpt, crit, bundle, clusters=clusters, avg_bits=avg_bits,
                           finetune_epochs=finetune_epochs, finetune_lr=lr, samples=samples,
                           codebook_dtype=codebook, seed=seed)
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
    t = Table(title=f"weight sharing ({crit!r}, "
              + (f"k={clusters})" if clusters else f"avg {avg_bits} bits)"))
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
