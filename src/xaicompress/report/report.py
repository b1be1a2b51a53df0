"""report.json, report.md and the terminal summary of a `compress` run: pure functions of
the measured checkpoints (writing the files and exporting is `pipeline.outputs`').

report.json (all sizes in bytes, accuracy in %, latency in ms for a batch of 64 on CPU):
  baseline / final       accuracy, params, nonzero_params, macs, size_bytes, fp32_bytes,
                         latency_ms (final.size_bytes = bytes of the packed file on disk)
  stages                 per stage: the same plus name, type, criterion, seconds, fidelity
  compression_ratio      baseline fp32 bytes / packed file bytes on disk
  accuracy_drop          baseline accuracy - final accuracy, in points
  fidelity               final (cosine, top10_overlap, agreement) and per_stage
  layers                 per Conv2d/Linear: units [original, kept], sparsity, bits, clusters,
                         coded_bits_per_weight (the weight's bytes in the packed file, entropy
                         coding, positions, codebook and scales included, x 8 / its weights)
  deployables            per model file written: file, kind, bytes, ratio (baseline fp32
                         bytes / bytes), ratio_fp32_onnx, reads_it; ONNX files also their
                         accuracy and ort_latency_ms next to pytorch_latency_ms
  val_accuracy           (baseline, stages, final) accuracy on the validation split carved
                         from the training data, on which every choice is made
  target, search         the accuracy budget and, per searched stage, its probes (value,
                         validation accuracy, packed bytes, passed) and the value chosen
  files, config, title, version

What was not measured (the explanation cosine and top-10 overlap with `report: {fidelity:
false}` or a model DeepLIFT cannot explain) is NaN in memory and null in the file:
report.json is strict JSON (RFC 8259), which every parser reads (`report_json` /
`parse_report`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table
from torch import nn

from xaicompress.checkpoint import Checkpoint, layer_widths
from xaicompress.errors import XaiCompressError
from xaicompress.version import __version__

METRIC_KEYS = ("accuracy", "val_accuracy", "params", "nonzero_params", "macs", "size_bytes",
               "fp32_bytes", "latency_ms")
#: fields that are NaN when not measured: written as null, read back as NaN
UNMEASURED = ("cosine", "top10_overlap")
PLOT_NAMES = {"stages": "stages.png", "layers": "layers.png", "heatmaps": "heatmaps.png",
              "search": "search.png"}


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def report_json(obj: Any) -> str:
    """`obj` as strict JSON (no NaN / Infinity tokens: they are null), indented, one newline;
    report.json, compare.json and `--json` output."""
    return json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n"


def _unmeasured(d: dict[str, Any]) -> dict[str, Any]:
    for k in UNMEASURED:
        if k in d and d[k] is None:
            d[k] = math.nan
    return d


def parse_report(text: str) -> dict[str, Any]:
    """What `report_json` wrote, with the unmeasured fields (`UNMEASURED`) NaN again."""
    return json.loads(text, object_hook=_unmeasured)


def _metrics(ckpt: Checkpoint) -> dict[str, Any]:
    pipe = ckpt.metrics.get("pipeline")
    if not pipe:
        raise XaiCompressError("checkpoint: carries no pipeline measurements")
    return {k: pipe["eval"].get(k) for k in METRIC_KEYS}


def layer_summary(baseline: Checkpoint, final: Checkpoint,
                  tensor_bits: dict[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """Per prunable layer of the final model: output units kept, sparsity, bits per stored
    weight (from its encoding: 32 for plain float32), clusters (codebook size or None), and
    with `tensor_bits` (state_dict name -> bits in the packed file, `PackedSize`) the bits
    per weight after coding."""
    before = layer_widths(baseline.model)
    out: dict[str, dict[str, Any]] = {}
    for name, m in final.model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        lc = final.state.layers.get(name)
        w = m.weight.detach()
        if lc is not None and lc.mask is not None:
            sparsity = lc.mask.sparsity
        else:
            sparsity = float((w == 0).float().mean())
        clusters = lc.codebook.k if lc is not None and lc.codebook is not None else None
        bits = lc.value_bits if lc is not None else 32
        out[name] = {"units": [before.get(name, {}).get("out", w.shape[0]), int(w.shape[0])],
                     "weights": int(w.numel()), "sparsity": round(sparsity, 6),
                     "bits": int(bits), "clusters": clusters}
        if tensor_bits is not None and f"{name}.weight" in tensor_bits:
            out[name]["coded_bits_per_weight"] = round(
                tensor_bits[f"{name}.weight"] / max(1, w.numel()), 4)
    return out


def build_report(config: Any, baseline: Checkpoint, steps: list[Checkpoint],
                 packed_size: int, files: dict[str, Path],
                 tensor_bits: dict[str, int] | None = None,
                 deployables: list[dict[str, Any]] | None = None,
                 searches: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The report dict (see module docstring) from the measured checkpoints; tensor_bits:
    bits of every tensor in the final packed file (`PackedSize.tensor_bits`); deployables:
    the model files written (`pipeline.outputs.describe_files`); searches: the accuracy
    budget's search records (`pipeline.budget`)."""
    base = _metrics(baseline)
    base["seconds"] = baseline.metrics["pipeline"]["seconds"]
    stages = []
    for ck in steps:
        p = ck.metrics["pipeline"]
        stages.append({"name": p["name"], "type": p["type"], "criterion": p["criterion"],
                       "seconds": p["seconds"], **_metrics(ck), "fidelity": p["fidelity"]})
    last = steps[-1] if steps else baseline
    final = _metrics(last)
    final["size_bytes"] = int(packed_size)
    fid_final = (dict(last.metrics["pipeline"]["fidelity"]) if steps else
                 {"cosine": 1.0, "top10_overlap": 1.0, "agreement": 100.0})
    return {
        "title": config.title(),
        "version": __version__,
        "seed": config.seed,
        "data": config.data,
        "model": baseline.spec.name,
        "preprocess": (baseline.spec.preprocess.to_meta()
                       if baseline.spec.preprocess is not None else None),
        "baseline": base,
        "stages": stages,
        "final": final,
        "compression_ratio": round(base["fp32_bytes"] / max(1, packed_size), 4),
        "accuracy_drop": round(base["accuracy"] - final["accuracy"], 4),
        "fidelity": {
            "method": "input-space DeepLIFT maps of the original vs the compressed model on "
                      "test images, both explaining the original's predicted class; "
                      "agreement = % of test images with the same predicted class",
            "final": fid_final,
            "per_stage": [{"name": s["name"], **s["fidelity"]} for s in stages],
        },
        "layers": layer_summary(baseline, last, tensor_bits),
        "target": config.model_dump(mode="json").get("target"),
        "search": list(searches or []),
        "files": {k: v.name for k, v in files.items()},
        "deployables": list(deployables or []),
        "config": config.model_dump(mode="json"),
    }


# ------------------------------------------------------------------ formatting
def kb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1024:.1f}"


def _fmt_int(n: Any) -> str:
    return "-" if n is None else f"{int(n):,}"


def _rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Baseline, every stage, and the final packed model as uniform rows."""
    fp32 = report["baseline"]["fp32_bytes"]
    rows = [{"step": "baseline", "criterion": "-", **report["baseline"],
             "fidelity": {"cosine": 1.0, "top10_overlap": 1.0, "agreement": 100.0}}]
    rows += [{"step": s["name"], **s} for s in report["stages"]]
    rows.append({"step": "final (packed file)", "criterion": "-", **report["final"],
                 "seconds": None, "fidelity": report["fidelity"]["final"]})
    for r in rows:
        r["ratio"] = fp32 / max(1, r["size_bytes"])
    return rows


def _short(n: Any) -> str:
    """12345 -> '12.3k', 435850 -> '436k', 1.2e6 -> '1.20M' (compact table cells)."""
    if n is None:
        return "-"
    n = float(n)
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e4:
        return f"{n / 1e3:.0f}k"
    return f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"


def summary_table(report: dict[str, Any]) -> Table:
    """One rich table: accuracy, size, ratio, non-zeros, MACs and fidelity per step."""
    t = Table(title=f"{report['title']}: {report['compression_ratio']:.1f}x smaller, "
                    f"accuracy {report['final']['accuracy']:.2f}% "
                    f"({-report['accuracy_drop']:+.2f} pt)")
    cols = ("step", "criterion", "acc %", "KB", "x", "non-0", "MACs", "ms", "cos", "top10",
            "agree", "s")
    for c in cols:
        t.add_column(c, justify="left" if c in ("step", "criterion") else "right")
    for r in _rows(report):
        f = r["fidelity"]
        t.add_row(r["step"].replace(" (packed file)", ""), str(r.get("criterion") or "-"),
                  f"{r['accuracy']:.2f}", kb(r["size_bytes"]), f"{r['ratio']:.1f}",
                  _short(r["nonzero_params"]), _short(r["macs"]),
                  "-" if r.get("latency_ms") is None else f"{r['latency_ms']:.1f}",
                  f"{f['cosine']:.3f}", f"{f['top10_overlap']:.2f}", f"{f['agreement']:.1f}",
                  "-" if r.get("seconds") is None else f"{r['seconds']:.0f}")
    return t


def _preprocess_line(report: dict[str, Any]) -> list[str]:
    """The model and how its inputs are made (older reports have neither)."""
    pre = report.get("preprocess")
    if not pre or pre.get("mean") is None:
        return []
    line = (f"Model `{report.get('model', '-')}`; inputs: (pixel in [0, 1] - mean) / std with "
            f"mean {', '.join(f'{v:.4g}' for v in pre['mean'])}, std "
            f"{', '.join(f'{v:.4g}' for v in pre['std'])}, {pre['size']} x {pre['size']}")
    if pre.get("resize"):
        line += f" (shorter side resized to {pre['resize']}, centre crop)"
    return ["", line + "."]


def report_markdown(report: dict[str, Any]) -> str:
    """report.md: the headline, the per-step table, fidelity, the layers and the plots."""
    b, f = report["baseline"], report["final"]
    fid = report["fidelity"]["final"]
    lines = [f"# {report['title']}", "",
             f"**{report['compression_ratio']:.1f}x smaller**: {kb(b['fp32_bytes'])} KB of fp32 "
             f"weights -> {kb(f['size_bytes'])} KB in "
             f"`{report['files'].get('packed', 'model.xcpk')}` (the packed file: xaicompress or "
             "its standalone reader). "
             f"Accuracy {b['accuracy']:.2f}% -> {f['accuracy']:.2f}% "
             f"({-report['accuracy_drop']:+.2f} pt). MACs {_fmt_int(b['macs'])} -> "
             f"{_fmt_int(f['macs'])}. Explanations: cosine {fid['cosine']:.3f}, top-10% "
             f"overlap {fid['top10_overlap']:.3f}, same prediction on {fid['agreement']:.1f}% "
             "of the test images.", "",
             *_onnx_headline(report),
             f"Data `{report['data']}`, seed {report['seed']}, xaicompress {report['version']}.",
             *_preprocess_line(report),
             "", "## Steps", "",
             "| step | criterion | accuracy % | validation % | size KB | x smaller | params "
             "| non-zero | MACs | latency ms | cosine | top-10% | agree % | seconds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in _rows(report):
        fd = r["fidelity"]
        lat = "-" if r.get("latency_ms") is None else f"{r['latency_ms']:.2f}"
        sec = "-" if r.get("seconds") is None else f"{r['seconds']:.1f}"
        val = "-" if r.get("val_accuracy") is None else f"{r['val_accuracy']:.2f}"
        lines.append(f"| {r['step']} | {r.get('criterion') or '-'} | {r['accuracy']:.2f} | "
                     f"{val} | {kb(r['size_bytes'])} | {r['ratio']:.1f} | "
                     f"{_fmt_int(r['params'])} | "
                     f"{_fmt_int(r['nonzero_params'])} | {_fmt_int(r['macs'])} | {lat} | "
                     f"{fd['cosine']:.3f} | {fd['top10_overlap']:.3f} | {fd['agreement']:.1f} "
                     f"| {sec} |")
    lines += ["", "Size = bytes of the packed file as it would be written at that step; "
              "x smaller = baseline fp32 bytes / size. Latency: median of a batch of 64 on CPU.",
              "", "## Explanation fidelity", "", report["fidelity"]["method"] + ".", "",
              "## Layers of the final model", "",
              "| layer | units kept | weights | sparsity % | bits | clusters | "
              "bits/weight coded |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, lay in report["layers"].items():
        u0, u1 = lay["units"]
        coded = lay.get("coded_bits_per_weight")
        lines.append(f"| {name} | {u1}/{u0} | {lay['weights']:,} | {lay['sparsity'] * 100:.1f} "
                     f"| {lay['bits']} | {lay['clusters'] or '-'} | "
                     f"{'-' if coded is None else f'{coded:.3f}'} |")
    lines += _search_markdown(report)
    plots = [(k, v) for k, v in report["files"].items() if k.startswith("plot_")]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{k.removeprefix('plot_')}]({v})" for k, v in plots]
    lines += ["", "## Files", ""] + _files_table(report)
    return "\n".join(lines) + "\n"


def _onnx_headline(report: dict[str, Any]) -> list[str]:
    """One line on the ONNX files (what any ONNX runtime deploys), when there are any."""
    onnx = [d for d in report.get("deployables") or [] if d["kind"].startswith("onnx")]
    if not onnx:
        return []
    parts = [f"`{d['file']}` {kb(d['bytes'])} KB ({d['ratio_fp32_onnx']:.1f}x smaller than "
             f"the original's fp32 ONNX, {d['accuracy']:.2f}%, onnxruntime "
             f"{d['ort_latency_ms']:.2f} ms)" for d in onnx]
    return ["For any ONNX runtime: " + "; ".join(parts) + ".", ""]


def _files_table(report: dict[str, Any]) -> list[str]:
    deploy = report.get("deployables") or []
    if not deploy:
        return [f"- `{v}` ({k})" for k, v in report["files"].items() if not k.startswith("plot_")]
    lines = ["| file | KB | x smaller | x vs fp32 ONNX | accuracy % | onnxruntime ms | "
             "PyTorch ms | read by |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for d in deploy:
        acc = "-" if d.get("accuracy") is None else f"{d['accuracy']:.2f}"
        ort = "-" if d.get("ort_latency_ms") is None else f"{d['ort_latency_ms']:.2f}"
        pt = ("-" if d.get("ort_latency_ms") is None or d.get("pytorch_latency_ms") is None
              else f"{d['pytorch_latency_ms']:.2f}")
        ratio = "-" if d.get("ratio") is None else f"{d['ratio']:.1f}"
        lines.append(f"| `{d['file']}` | {kb(d['bytes'])} | {ratio} | "
                     f"{d['ratio_fp32_onnx']:.1f} | {acc} | {ort} | {pt} | {d['reads_it']} |")
    lines += ["", "Latency: median of a batch of 64 on CPU (onnxruntime: 1 thread, all graph "
              "optimizations; PyTorch: the final model in memory)."]
    others = [f"- `{v}` ({k})" for k, v in report["files"].items()
              if not k.startswith("plot_") and k not in {d["kind"] for d in deploy}]
    return lines + ([""] + others if others else [])


def _search_markdown(report: dict[str, Any]) -> list[str]:
    """The accuracy budget's search path (empty without a target)."""
    if not report.get("search"):
        return []
    base = report["baseline"].get("val_accuracy")
    margin = report["target"].get("margin", 0.0)
    lines = ["", "## Accuracy budget", "",
             f"At most {report['target']['max_drop']} pt below the baseline's validation "
             f"accuracy ({base:.2f}%), spent evenly over the searched stages; a probe passes "
             f"when it keeps its stage's floor and its drop plus {margin:g} standard errors "
             "(paired, on the same validation images) stays within the whole budget; each "
             "probe ran the whole stage (at most "
             f"{report['target'].get('probes', '-')} per stage). The chosen probe was picked "
             "among several on these images, so its validation drop is optimistic; the test "
             "split was not read while searching.", "",
             "| stage | option | value | validation % | drop ± SE pt | packed KB | passed |",
             "|---|---|---:|---:|---:|---:|---|"]
    for rec in report["search"]:
        for p in rec["probes"]:
            mark = "yes" if p["passed"] else "no"
            if p["value"] == rec["chosen"]:
                mark += " (chosen)"
            drop = f"{base - p['val_accuracy']:.2f} ± {p.get('drop_se', 0.0):.2f}"
            lines.append(f"| {rec['name']} (floor {rec['floor']:.2f}%) | {rec['field']} | "
                         f"{p['value']:g} | {p['val_accuracy']:.2f} | {drop} | "
                         f"{kb(p['size_bytes'])} | {mark} |")
        if rec.get("backed_off"):
            lines.append(f"| {rec['name']} | {rec['field']} | {rec['chosen']:g} | - | - | - | "
                         f"backed off {rec['backed_off']}x: a later stage kept the budget "
                         "at no setting |")
        if rec["chosen"] is None:
            lines.append(f"| {rec['name']} | - | - | - | - | - | left out |")
    return lines
