from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from xaicompress.checkpoint import check_data_fits
from xaicompress.cli_app import CkptDataOpt, JsonOpt, SeedOpt, TrustOpt, app, runtime_options
from xaicompress.data import DEFAULT_SPEC, load_dataset
from xaicompress.device import current_device
from xaicompress.export.packed import load_any
from xaicompress.metrics import evaluate


@app.command("evaluate")
@runtime_options(amp=False)
def evaluate_cmd(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint or packed model file.")],
    model: TrustOpt = None,
    data: CkptDataOpt = None,
    as_json: JsonOpt = False,
    seed: SeedOpt = 0,
    onnx: Annotated[bool, typer.Option("--onnx/--no-onnx", help=(
        "Also measure onnxruntime latency of the exported ONNX files (small ONNX, and the "
        "integer ONNX for a quantized model) next to PyTorch's."))] = True,
) -> None:
    """Accuracy, parameters, non-zeros, MACs, bytes and CPU latency of a checkpoint (PyTorch
    and onnxruntime)."""
    ckpt = load_any(checkpoint, model=model)
    ckpt.model.to(current_device())  # loaded on the CPU; accuracy runs on --device
    spec = data or ckpt.data or DEFAULT_SPEC
    bundle = load_dataset(spec, seed=seed, preprocess=ckpt.spec.preprocess)
    check_data_fits(ckpt, bundle.input_shape, bundle.num_classes, spec)
    m = evaluate(ckpt, bundle.test)
    if onnx:
        from xaicompress.export.calibration import calibration_samples
        from xaicompress.metrics import onnx_latency

        m.update(onnx_latency(ckpt, calibration_samples(bundle, seed=seed)))
    if as_json:
        print(json.dumps(m, indent=2))
        return
    t = Table(title=f"{checkpoint} on {spec}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in m.items():
        t.add_row(k, f"{v:.3f}" if isinstance(v, float) else "-" if v is None else str(v))
    Console().print(t)
