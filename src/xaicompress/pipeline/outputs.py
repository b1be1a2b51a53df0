"""What a `compress` run writes into OUT: the final checkpoint, the packed file and ONNX,
report.json, report.md and the plots.

The report itself is built by `report.build_report` (pure); this module exports and
writes. Every file goes through the atomic writer, and the packed file, ONNX and checkpoint
writers verify what they wrote before renaming it into place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xaicompress.atomic import atomic_write_text
from xaicompress.checkpoint import Checkpoint, save_checkpoint
from xaicompress.data import DatasetBundle
from xaicompress.errors import XaiCompressError
from xaicompress.export.packed import packed_report, write_packed
from xaicompress.report.report import (
    PLOT_NAMES,
    build_report,
    parse_report,
    report_json,
    report_markdown,
)

PACKED_NAME = "model.xcpk"  # the packed format's magic is b"XCPK"
ONNX_NAME = "model.onnx"
ONNX_INT8_NAME = "model.int8.onnx"
CHECKPOINT_NAME = "model.safetensors"
#: what reads each deployable file (the report's file list)
READERS = {
    "packed": "xaicompress, or the standalone numpy reader xaicompress/export/xcpk_reader.py",
    "onnx": "any ONNX runtime (float kernels; weights stored as their encoding)",
    "onnx_int8": "any ONNX runtime (QDQ); onnxruntime runs it on integer kernels",
    "checkpoint": "xaicompress (safetensors + JSON metadata; also the run's history)",
}


def export_final(final: Checkpoint, out: Path, config: Any,
                 bundle: DatasetBundle | None = None) -> dict[str, Path]:
    """Write the final checkpoint, the packed file and the ONNX files into `out`; returns
    their paths.

    model.onnx is the small ONNX (export/onnx_small.py); model.int8.onnx the integer one
    (export/onnx_qdq.py, activations calibrated on `config.export.calibration` training
    images of `bundle`), written when the model has integer-quantized layers. The packed
    file and ONNX hold the model and its compression only; the checkpoint also carries the
    run's history and the final measurements."""
    from xaicompress.export.onnx_small import export_small

    files: dict[str, Path] = {}
    if config.export.packed:
        files["packed"] = write_packed(final, out / PACKED_NAME)
    if config.export.onnx:
        files["onnx"] = export_small(final, out / ONNX_NAME)
    if (config.export.onnx_int8 and bundle is not None
            and any(lc.grid is not None for _, lc in final.state.items())):
        from xaicompress.export.calibration import calibration_samples
        from xaicompress.export.onnx_qdq import export_qdq

        ex = config.export
        samples = calibration_samples(bundle, ex.calibration, seed=config.seed)
        files["onnx_int8"] = export_qdq(final, out / ONNX_INT8_NAME, samples,
                                        method=ex.calibration_method,
                                        percentile=ex.percentile)
    full = final.copy()
    pipe = full.metrics.get("pipeline", {})
    full.metrics = dict(pipe.get("eval", {}))
    files["checkpoint"] = save_checkpoint(full, out / CHECKPOINT_NAME)
    return files


def write_outputs(config: Any, out: Path, baseline: Checkpoint, steps: list[Checkpoint],
                  bundle: DatasetBundle, *, plots: bool = True,
                  searches: list[dict[str, Any]] | None = None) -> dict[str, Path]:
    """Export the final model, then write report.json, report.md and the plots into `out`.
    searches: the accuracy budget's search per stage (`pipeline.budget`), if any."""
    final = steps[-1] if steps else baseline
    files = export_final(final, out, config, bundle)
    deployables = describe_files(files, baseline, final, bundle, config)
    sizes = packed_report(final)
    packed_size = files["packed"].stat().st_size if "packed" in files else sizes.file_bytes
    bits = sizes.tensor_bits
    if plots:
        # matplotlib takes ~1 s to import: only runs that draw plots pay for it
        from xaicompress.report import plots as draw

        files["plot_stages"] = out / PLOT_NAMES["stages"]
        files["plot_layers"] = out / PLOT_NAMES["layers"]
        if searches:
            files["plot_search"] = out / PLOT_NAMES["search"]
        report = build_report(config, baseline, steps, packed_size, files, bits, deployables,
                              searches)
        draw.plot_stages(report, files["plot_stages"])
        draw.plot_layers(report["layers"], files["plot_layers"])
        if searches:
            draw.plot_search(searches, report["baseline"]["val_accuracy"],
                             files["plot_search"])
        if config.report.heatmaps > 0:
            files["plot_heatmaps"] = out / PLOT_NAMES["heatmaps"]
            draw.plot_heatmaps(baseline.model, final.model, bundle, config.report.heatmaps,
                                files["plot_heatmaps"], seed=config.seed)
    files["report_json"] = out / "report.json"
    files["report_md"] = out / "report.md"
    report = build_report(config, baseline, steps, packed_size, files, bits, deployables,
                          searches)
    atomic_write_text(files["report_json"], report_json(report))
    atomic_write_text(files["report_md"], report_markdown(report))
    return files


def describe_files(files: dict[str, Path], baseline: Checkpoint, final: Checkpoint,
                   bundle: DatasetBundle, config: Any) -> list[dict[str, Any]]:
    """Every model file written: its size, x smaller than the baseline's fp32 weights and
    than its fp32 ONNX, what reads it, and for ONNX its accuracy and latency in
    onnxruntime (CPU, 1 thread, batch 64, all optimizations) next to PyTorch's."""
    from xaicompress.data import dataset_tensors
    from xaicompress.export.onnx_graph import float_onnx
    from xaicompress.export.runtime import ort_latency_ms, ort_predict

    final_eval = final.metrics.get("pipeline", {}).get("eval", {})
    base_fp32 = baseline.metrics.get("pipeline", {}).get("eval", {}).get("fp32_bytes")
    fp32_onnx = len(float_onnx(baseline)[0].SerializeToString())
    x, y = dataset_tensors(bundle.test)
    out = []
    for kind in ("packed", "onnx", "onnx_int8", "checkpoint"):
        if kind not in files:
            continue
        size = files[kind].stat().st_size
        entry: dict[str, Any] = {
            "file": files[kind].name, "kind": kind, "bytes": size,
            "ratio": round(base_fp32 / max(1, size), 4) if base_fp32 else None,
            "ratio_fp32_onnx": round(fp32_onnx / max(1, size), 4), "reads_it": READERS[kind]}
        if kind.startswith("onnx"):
            pred = ort_predict(files[kind], x).argmax(1)
            entry["accuracy"] = round(float((pred == y).float().mean() * 100), 4)
            entry["ort_latency_ms"] = ort_latency_ms(files[kind], final.spec.input_shape,
                                                     repeats=config.report.latency_repeats)
            entry["pytorch_latency_ms"] = final_eval.get("latency_ms")
        out.append(entry)
    return out


def load_report(path: str | Path) -> dict[str, Any]:
    try:
        return parse_report(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise XaiCompressError(f"{path}: cannot read report ({exc})") from None
