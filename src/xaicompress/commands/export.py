from __future__ import annotations

import os
from typing import Annotated, Any

import typer
from rich.console import Console

from xaicompress.atomic import check_writable
from xaicompress.cli_app import (
    CkptDataOpt,
    SeedOpt,
    TrustOpt,
    app,
    flag,
    model_options,
    validate_options,
)
from xaicompress.errors import XaiCompressError
from xaicompress.pipeline.config import CalibrationOptions

FORMATS = ("onnx", "onnx-small", "onnx-int8", "packed")


@app.command("export")
@model_options({None: CalibrationOptions}, panel="Integer ONNX (--format onnx-int8)")
def export_cmd(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint (or packed) file.")],
    options: dict[str, Any],
    model: TrustOpt = None,
    fmt: Annotated[str, typer.Option("--format", help=(
        "onnx (float kernels; Q/DQ weights for quantized layers), onnx-small (each weight "
        "stored as its encoding: int4/int8, codebook + packed indices, sparse; what "
        "`compress` writes as model.onnx), onnx-int8 (BatchNorm folded, 8-bit integer weights "
        "and calibrated uint8 activations: onnxruntime runs integer kernels) or packed (the "
        "packed model file)."))] = "onnx",
    data: CkptDataOpt = None,
    seed: SeedOpt = 0,
    out: Annotated[str, typer.Option("--out", help="File to write.")] = "model.onnx",
) -> None:
    """Export a checkpoint for a runtime: ONNX with a dynamic batch, or the packed file."""
    if fmt not in FORMATS:
        raise XaiCompressError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if options and fmt != "onnx-int8":
        raise XaiCompressError(f"{flag(next(iter(options)))}: applies to --format onnx-int8 "
                               "only")
    calib = validate_options(CalibrationOptions, options, command="export")
    check_writable(out)
    from xaicompress.export.packed import load_any

    ckpt = load_any(checkpoint, model=model)
    if fmt == "onnx":
        from xaicompress.export.onnx import export_onnx

        export_onnx(ckpt, out)
    elif fmt == "onnx-small":
        from xaicompress.export.onnx_small import export_small

        export_small(ckpt, out)
    elif fmt == "onnx-int8":
        _export_int8(ckpt, out, calib, data, seed)
    else:
        from xaicompress.export.packed import write_packed

        write_packed(ckpt, out)
    Console().print(f"{checkpoint} -> {out} ({fmt}, {os.path.getsize(out)} bytes)")


def _export_int8(ckpt: Any, out: str, calib: CalibrationOptions, data: str | None,
                 seed: int) -> None:
    from xaicompress.checkpoint import check_data_fits
    from xaicompress.data import DEFAULT_SPEC, load_dataset
    from xaicompress.export.calibration import calibration_samples
    from xaicompress.export.onnx_qdq import export_qdq

    spec = data or ckpt.data or DEFAULT_SPEC
    bundle = load_dataset(spec, seed=seed)
    check_data_fits(ckpt, bundle.input_shape, bundle.num_classes, spec)
    samples = calibration_samples(bundle, calib.calibration, seed=seed)
    export_qdq(ckpt, out, samples, method=calib.calibration_method,
               percentile=calib.percentile)
