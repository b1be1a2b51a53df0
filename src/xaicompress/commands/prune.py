from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from xaicompress.atomic import check_writable
from xaicompress.checkpoint import save_checkpoint
from xaicompress.cli_app import (
    CkptDataOpt,
    JsonOpt,
    SeedOpt,
    TrustOpt,
    app,
    model_options,
    runtime_options,
    validate_options,
)
from xaicompress.commands._step import load_inputs, run_step
from xaicompress.errors import XaiCompressError
from xaicompress.metrics import evaluate
from xaicompress.pipeline.config import PruneStructuredStage, PruneUnstructuredStage
from xaicompress.prune import sparse_bytes

_ROWS = ("accuracy", "params", "nonzero_params", "macs", "fp32_bytes", "size_bytes",
         "sparse_bytes", "latency_ms")
MODES = {"--structured": PruneStructuredStage, "--unstructured": PruneUnstructuredStage}


@app.command("prune")
@runtime_options()
@model_options(MODES)
def prune_cmd(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint (or packed file) to prune.")],
    options: dict[str, Any],
    model: TrustOpt = None,
    data: CkptDataOpt = None,
    structured: Annotated[bool, typer.Option("--structured", help="Remove whole filters / "
                                             "neurons.")] = False,
    unstructured: Annotated[bool, typer.Option("--unstructured", help="Zero single weights "
                                               "under masks.")] = False,
    as_json: JsonOpt = False,
    seed: SeedOpt = 0,
    out: Annotated[str, typer.Option("--out", help="Pruned checkpoint to write.")]
    = "pruned.safetensors",
) -> None:
    """Prune a checkpoint by a criterion and print its metrics before and after."""
    if structured == unstructured:
        raise XaiCompressError("prune: give exactly one of --structured or --unstructured")
    mode = "--structured" if structured else "--unstructured"
    model_cls = MODES[mode]
    stage = validate_options(model_cls, options, command=f"prune {mode}",
                             fixed={"type": model_cls.stage_type()})
    check_writable(out)
    ckpt, bundle, _ = load_inputs(checkpoint, model, data, seed)
    before = {**evaluate(ckpt, bundle.test), "sparse_bytes": sparse_bytes(ckpt)}
    pruned = run_step(ckpt, bundle, stage, seed)
    after = {**evaluate(pruned, bundle.test), "sparse_bytes": sparse_bytes(pruned)}
    pruned.metrics = dict(after)
    save_checkpoint(pruned, out)
    if as_json:
        print(json.dumps({"before": before, "after": after, "out": out}, indent=2))
        return
    t = Table(title=f"{checkpoint} {mode} {stage.criterion} -> {out}")
    for col, just in (("metric", "left"), ("before", "right"), ("after", "right"),
                      ("after/before", "right")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for k in _ROWS:
        b, a = before[k], after[k]
        ratio_txt = f"{a / b:.3f}" if isinstance(a, (int, float)) and b else "-"
        fmt = (lambda v: f"{v:.3f}") if isinstance(a, float) else str
        t.add_row(k, fmt(b), fmt(a), ratio_txt)
    Console().print(t)
