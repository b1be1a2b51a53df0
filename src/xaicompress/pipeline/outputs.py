"""What a `compress` run writes into OUT: the final checkpoint, the packed file and ONNX,
report.json, report.md and the plots.

The report itself is built by `report.build_report` (pure); this module exports and
writes. Every file goes through the atomic writer, and the packed file, ONNX and checkpoint
writers verify what they wrote before renaming it into place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xaicompress.atomic import atomic_write_text
from xaicompress.checkpoint import Checkpoint, save_checkpoint
from xaicompress.data import DatasetBundle
from xaicompress.errors import XaiCompressError
from xaicompress.export.onnx import export_onnx
from xaicompress.export.packed import packed_report, write_packed
from xaicompress.report.report import PLOT_NAMES, build_report, report_markdown

PACKED_NAME = "model.xcpk"  # the packed format's magic is b"XCPK"
ONNX_NAME = "model.onnx"
CHECKPOINT_NAME = "model.safetensors"


def export_final(final: Checkpoint, out: Path, config: Any) -> dict[str, Path]:
    """Write the final checkpoint, the packed file and ONNX into `out`; returns their paths.

    The packed file and ONNX hold the model and its compression only; the checkpoint also
    carries the run's history and the final measurements."""
    files: dict[str, Path] = {}
    if config.export.packed:
        files["packed"] = write_packed(final, out / PACKED_NAME)
    if config.export.onnx:
        files["onnx"] = export_onnx(final, out / ONNX_NAME)
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
    files = export_final(final, out, config)
    packed_size = (files["packed"].stat().st_size if "packed" in files
                   else packed_report(final).file_bytes)
    if plots:
        # matplotlib takes ~1 s to import: only runs that draw plots pay for it
        from xaicompress.report import plots as draw

        files["plot_stages"] = out / PLOT_NAMES["stages"]
        files["plot_layers"] = out / PLOT_NAMES["layers"]
        if searches:
            files["plot_search"] = out / PLOT_NAMES["search"]
        report = build_report(config, baseline, steps, packed_size, files, searches)
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
    report = build_report(config, baseline, steps, packed_size, files, searches)
    atomic_write_text(files["report_json"], json.dumps(report, indent=2) + "\n")
    atomic_write_text(files["report_md"], report_markdown(report))
    return files


def load_report(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise XaiCompressError(f"{path}: cannot read report ({exc})") from None
