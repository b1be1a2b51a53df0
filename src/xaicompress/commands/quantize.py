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
from xaicompress.metrics import evaluate
from xaicompress.pipeline.config import QuantizeStage

_ROWS = ("accuracy", "params", "nonzero_params", "fp32_bytes", "size_bytes")


@app.command("quantize")
@runtime_options()
@model_options({None: QuantizeStage})
def quantize_cmd(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint (or packed file) to quantize.")],
    options: dict[str, Any],
    model: TrustOpt = None,
    data: CkptDataOpt = None,
    as_json: JsonOpt = False,
    seed: SeedOpt = 0,
    out: Annotated[str, typer.Option("--out", help="Quantized checkpoint to write.")]
    = "quantized.safetensors",
) -> None:
    """Mixed-precision integer quantization: bits per layer from relevance under a budget."""
    stage = validate_options(QuantizeStage, options, command="quantize",
                             fixed={"type": "quantize"})
    check_writable(out)
    ckpt, bundle, _ = load_inputs(checkpoint, model, data, seed)
    before = evaluate(ckpt, bundle.test, latency=False)
    q = run_step(ckpt, bundle, stage, seed)
    after = evaluate(q, bundle.test, latency=False)
    q.metrics = after
    save_checkpoint(q, out)
    step = q.history[-1]
    if as_json:
        print(json.dumps({"bits": step["bits"], "before": before, "after": after,
                          "achieved_avg_bits": step["achieved_avg_bits"], "out": out}, indent=2))
        return
    con = Console()
    params = {n: m.weight.numel() for n, m in q.model.named_modules() if n in step["bits"]}
    t = Table(title=f"bits per layer ({step['allocation']}, criterion {step['criterion']})")
    for col in ("layer", "weights", "bits", "act bits"):
        t.add_column(col, justify="left" if col == "layer" else "right")
    for name, b in step["bits"].items():
        act = q.state.layers[name].activation
        t.add_row(name, str(params[name]), str(b), "-" if act is None else str(act.bits))
    con.print(t)
    m = Table(title=f"{checkpoint} -> {out}")
    m.add_column("metric")
    m.add_column("before", justify="right")
    m.add_column("after", justify="right")
    for k in _ROWS:
        m.add_row(k, *(f"{d[k]:.2f}" if isinstance(d[k], float) else str(d[k])
                       for d in (before, after)))
    con.print(m)
    con.print(f"average bits per weight: {step['achieved_avg_bits']:.3f}")
