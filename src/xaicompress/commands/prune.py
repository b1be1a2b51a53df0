from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from xaicompress.atomic import check_writable
from xaicompress.checkpoint import check_data_fits, load_checkpoint, save_checkpoint
from xaicompress.cli_app import DataOpt, JsonOpt, SeedOpt, TrustOpt, app
from xaicompress.data import load_dataset
from xaicompress.errors import XaiCompressError
from xaicompress.metrics import evaluate
from xaicompress.prune import prune_structured, prune_unstructured, sparse_bytes
from xaicompress.prune.schedule import check_ratio
from xaicompress.prune.structured import NORMS as STRUCTURED_NORMS
from xaicompress.prune.unstructured import NORMS as UNSTRUCTURED_NORMS

_ROWS = ("accuracy", "params", "nonzero_params", "macs", "fp32_bytes", "size_bytes",
         "sparse_bytes", "latency_ms")


@app.command("prune")
def prune_cmd(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint file to prune.")],
    model: TrustOpt = None,
    data: DataOpt = "",
    criterion: Annotated[str, typer.Option("--criterion", help="Criterion spec, e.g. deeplift, "
                                           "l1, deeplift:reference=mean; for --structured also "
                                           "tp:magnitude / tp:taylor.")] = "deeplift",
    structured: Annotated[bool, typer.Option("--structured", help="Remove whole filters / "
                                             "neurons.")] = False,
    unstructured: Annotated[bool, typer.Option("--unstructured", help="Zero single weights "
                                               "under masks.")] = False,
    ratio: Annotated[float | None, typer.Option("--ratio", help="Fraction of channels "
                                                "(structured) or weights to remove, in [0, 1).")]
    = None,
    scope: Annotated[str | None, typer.Option("--scope", help="layer or global (default "
                                              "global).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Iterative pruning steps "
                                              "(structured).")] = None,
    finetune_epochs: Annotated[float, typer.Option("--finetune-epochs", help="Fine-tuning "
                                                   "epochs after each step.")] = 0,
    samples: Annotated[int, typer.Option("--samples", help="Training samples for relevance.")]
    = 512,
    macs_ratio: Annotated[float | None, typer.Option("--macs-ratio", help="Structured: prune "
                                                     "until MACs fall by this fraction.")] = None,
    layers: Annotated[str | None, typer.Option("--layers", help="Unstructured: fc, conv or "
                                               "all (default fc).")] = None,
    min_channels: Annotated[int | None, typer.Option("--min-channels", help="Structured: "
                                                     "channels every layer keeps.")] = None,
    max_layer_ratio: Annotated[float | None, typer.Option(
        "--max-layer-ratio", help="Structured, global scope: most of any layer's channels "
        "removed (default: halfway between the ratio and 1; 1 = no cap).")] = None,
    norm: Annotated[str | None, typer.Option(
        "--norm", help="Global scope: how scores are compared across layers; structured "
        "l1|mean|max (default l1), unstructured none|l1|mean (default none).")] = None,
    finetune_lr: Annotated[float | None, typer.Option(
        "--finetune-lr", help="Adam learning rate of the fine-tuning (default 2e-3).")] = None,
    as_json: JsonOpt = False,
    seed: SeedOpt = 0,
    out: Annotated[str, typer.Option("--out", help="Pruned checkpoint to write.")]
    = "pruned.safetensors",
) -> None:
    """Prune a checkpoint by a criterion and print its metrics before and after."""
    if structured == unstructured:
        raise XaiCompressError("prune: give exactly one of --structured or --unstructured")
    mode = "--structured" if structured else "--unstructured"
    wrong = ([("--layers", layers)] if structured else
             [("--steps", steps), ("--macs-ratio", macs_ratio), ("--min-channels", min_channels),
              ("--max-layer-ratio", max_layer_ratio)])
    for opt, val in wrong:
        if val is not None:
            raise XaiCompressError(f"{opt}: does not apply to {mode}")
    if ratio is None and macs_ratio is None:
        raise XaiCompressError(f"--ratio: required with {mode} (or --macs-ratio with "
                               "--structured)")
    if ratio is not None and macs_ratio is not None:
        raise XaiCompressError("--macs-ratio: give either --ratio or --macs-ratio, not both")
    if ratio is not None:
        check_ratio(ratio, "--ratio")
    norms = STRUCTURED_NORMS if structured else UNSTRUCTURED_NORMS
    if norm is not None and norm not in norms:
        raise XaiCompressError(f"--norm {norm!r}: expected one of {', '.join(norms)} with {mode}")
    check_writable(out)
    ckpt = load_checkpoint(checkpoint, model=model)
    spec = data or ckpt.data or "mnist5k"
    bundle = load_dataset(spec, seed=seed)
    check_data_fits(ckpt, bundle.input_shape, bundle.num_classes, spec)
    before = {**evaluate(ckpt, bundle.test), "sparse_bytes": sparse_bytes(ckpt)}
    if structured:
        pruned = prune_structured(ckpt, criterion, bundle, ratio=ratio or 0.0,
                                  scope=scope or "global", steps=steps or 1,
                                  finetune_epochs=finetune_epochs, finetune_lr=finetune_lr,
                                  samples=samples, macs_ratio=macs_ratio,
                                  min_channels=min_channels or 1,
                                  norm=norm or "l1", max_layer_ratio=max_layer_ratio, seed=seed)
    else:
        pruned = prune_unstructured(ckpt, criterion, bundle, ratio=float(ratio or 0.0),
                                    layers=layers or "fc", scope=scope or "global",
                                    finetune_epochs=finetune_epochs, finetune_lr=finetune_lr,
                                    samples=samples, norm=norm or "none", seed=seed)
    after = {**evaluate(pruned, bundle.test), "sparse_bytes": sparse_bytes(pruned)}
    pruned.metrics = dict(after)
    save_checkpoint(pruned, out)
    if as_json:
        print(json.dumps({"before": before, "after": after, "out": out}, indent=2))
        return
    t = Table(title=f"{checkpoint} {mode} {criterion} -> {out}")
    for col, just in (("metric", "left"), ("before", "right"), ("after", "right"),
                      ("after/before", "right")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for k in _ROWS:
        b, a = before[k], after[k]
        ratio_txt = f"{a / b:.3f}" if isinstance(a, (int, float)) and b else "-"
        fmt = (lambda v: f"{v:.3f}") if isinstance(a, float) else str
        t.add_row(k, fmt(b), fmt(a), ratio_txt)
    Console().print(t)
