from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from xaicompress.atomic import check_writable
from xaicompress.checkpoint import check_data_fits, load_checkpoint, save_checkpoint
from xaicompress.cli_app import JsonOpt, SeedOpt, TrustOpt, app
from xaicompress.data import load_dataset
from xaicompress.metrics import evaluate
from xaicompress.quant.integer import quantize

_ROWS = ("accuracy", "params", "nonzero_params", "fp32_bytes", "size_bytes")


@app.command("quantize")
def quantize_cmd(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint file to quantize.")],
    model: TrustOpt = None,
    data: Annotated[str, typer.Option("--data", help="Dataset spec (default: the "
                                      "checkpoint's).")] = "",
    criterion: Annotated[str, typer.Option("--criterion", help="Relevance weighting the "
                                           "quantization error: deeplift, taylor, l1, none "
                                           "(unweighted), ...")] = "deeplift",
    avg_bits: Annotated[float | None, typer.Option("--avg-bits", help="Budget: mean bits per "
                                                   "stored weight.")] = None,
    size_kb: Annotated[float | None, typer.Option("--size-kb", help="Budget: packed model "
                                                  "size in KiB.")] = None,
    allocation: Annotated[str, typer.Option("--allocation", help="milp (relevance-weighted "
                                            "error, exact) or uniform (same bits "
                                            "everywhere).")] = "milp",
    qat_epochs: Annotated[float, typer.Option("--qat-epochs", min=0, help="Epochs of "
                                              "quantization-aware training.")] = 0,
    act_bits: Annotated[int | None, typer.Option("--act-bits", help="Quantize activations "
                                                 "to this many bits (8), calibrated.")] = None,
    samples: Annotated[int, typer.Option("--samples", help="Training samples for relevance "
                                         "and calibration.")] = 512,
    clip: Annotated[str, typer.Option("--clip", help="Per-channel scale: mse (MSE clipping "
                                      "search), wmse (relevance-weighted) or max.")] = "mse",
    as_json: JsonOpt = False,
    seed: SeedOpt = 0,
    out: Annotated[str, typer.Option("--out", help="Quantized checkpoint to write.")]
    = "quantized.safetensors",
) -> None:
    """Mixed-precision integer quantization: bits per layer from relevance under a budget."""
    check_writable(out)
    ckpt = load_checkpoint(checkpoint, model=model)
    spec = data or ckpt.data or "mnist5k"
    bundle = load_dataset(spec, seed=seed)
    check_data_fits(ckpt, bundle.input_shape, bundle.num_classes, spec)
    before = evaluate(ckpt, bundle.test, latency=False)
    q = quantize(ckpt, criterion, bundle, avg_bits=avg_bits, size_kb=size_kb,
                 allocation=allocation, qat_epochs=qat_epochs, act_bits=act_bits,
                 samples=samples, seed=seed, clip=clip)
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
