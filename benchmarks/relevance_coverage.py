"""Which CNNs the DeepLIFT engine attributes exactly, next to Captum's DeepLift (issue 15).

For torchvision's whole classification zoo (`list_models(module=torchvision.models)`,
transformers included and marked) and the smallest variant of 40+ timm CNN families:
random weights (seed 0) made trained-like (`calibrate`), 10 classes, eval mode, a batch
of 2 random inputs 3x64x64 (a
few models need more pixels), float64 (float32 above 60M parameters), the all-zero input
as reference, targets [1, 2]. Reported per model:

  ours    relative convergence delta |Σ input contributions − Δf| / mean |Δf| of our
          engine (goal ≤ 1e-4), or the one-line refusal it raised;
  f32     ours with the model in float32;
  const   for models with LayerNorm / GroupNorm: the same delta with
          `layernorm=constant` (Ali et al.'s constant statistics, the documented
          alternative; the default `decompose` rule is exact);
  captum  Captum 0.9 `DeepLift(model)` on the same model, inputs and reference:
          max |delta| / mean |Δf| from `return_convergence_delta`, or its exception.

    python benchmarks/relevance_coverage.py [--quick] [--only NAME,NAME] [--timm-only]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_json  # noqa: E402
from relevance_speed import write_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRANSFORMERS = ("vit_", "swin_", "maxvit_")
#: the smallest variant of each timm CNN family measured (family -> model name)
TIMM = {
    "resnet": "resnet10t", "resnetv2 (pre-act)": "resnetv2_18", "resnext": "resnext26ts",
    "seresnet": "seresnet18", "skresnet": "skresnet18", "resnest": "resnest14d",
    "res2net": "res2net50_14w_8s", "dla": "dla46_c", "dpn": "dpn48b",
    "densenet": "densenet121", "vgg": "vgg11", "cspresnet": "cspresnet50",
    "darknet": "darknet17", "cs3darknet": "cs3darknet_s", "hrnet": "hrnet_w18_small",
    "selecsls": "selecsls42", "regnetx": "regnetx_002", "regnety": "regnety_002",
    "regnetz": "regnetz_005", "rexnet": "rexnet_100", "ghostnet": "ghostnet_050",
    "ghostnetv2": "ghostnetv2_100", "mobilenetv1": "mobilenetv1_100",
    "mobilenetv2": "mobilenetv2_035", "mobilenetv3": "mobilenetv3_small_050",
    "mobilenetv4": "mobilenetv4_conv_small_035", "mnasnet": "mnasnet_small",
    "semnasnet": "semnasnet_050", "spnasnet": "spnasnet_100", "fbnetc": "fbnetc_100",
    "fbnetv3": "fbnetv3_b", "lcnet": "lcnet_035", "tinynet": "tinynet_e",
    "hardcorenas": "hardcorenas_a", "efficientnet": "efficientnet_b0",
    "efficientnetv2": "efficientnetv2_rw_t", "tf_efficientnet (same padding)":
    "tf_efficientnet_lite0", "mixnet": "mixnet_s", "gernet": "gernet_s",
    "repvgg": "repvgg_a0", "mobileone": "mobileone_s0", "repghostnet": "repghostnet_050",
    "vovnet": "ese_vovnet19b_slim_dw", "inception": "inception_v3",
    "inception_next": "inception_next_atto", "convnext": "convnext_atto",
    "convnextv2 (GRN)": "convnextv2_atto", "rdnet": "rdnet_tiny",
    "poolformer (GroupNorm)": "poolformer_s12", "starnet": "starnet_s050",
    "mambaout": "mambaout_femto", "fasternet": "fasternet_t0", "hgnetv2": "hgnetv2_b0",
    "ecaresnet": "ecaresnet26t", "gcresnet": "gcresnet33ts", "nfnet": "nf_regnet_b0",
    "repvit": "repvit_m0_9", "efficientvit (ReLU attention)": "efficientvit_b0",
    "xception": "xception41", "tresnet": "tresnet_m",
}
SIZE = {"inception_v3": 96, "googlenet": 64}


class Timeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Timeout("time limit")


def build(source: str, name: str) -> torch.nn.Module:
    from xaicompress.models.vision_import import import_timm, import_torchvision

    torch.manual_seed(0)
    if source == "torchvision":
        tv = import_torchvision()
        kw: dict[str, Any] = {"num_classes": 10}
        if name in ("googlenet", "inception_v3"):
            kw.update(aux_logits=False, init_weights=True)
        return tv.models.get_model(name, weights=None, **kw).eval()
    return import_timm().create_model(name, pretrained=False, num_classes=10).eval()


def calibrate(model: torch.nn.Module, size: int, seed: int = 0) -> torch.nn.Module:
    """Make a randomly initialised network behave like a trained one: BatchNorm running
    statistics estimated on 8 random inputs (so every layer sees unit-variance, input-
    dependent activations, not a signal that dies out with depth), and every normalisation
    layer's affine parameters drawn at random (no zero biases: reference activations are
    not all 0)."""
    g = torch.Generator().manual_seed(seed)
    norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration batch
        if isinstance(m, norms) and getattr(m, "weight", None) is not None:
            m.weight.data.uniform_(0.5, 1.5, generator=g)
        if isinstance(m, norms) and getattr(m, "bias", None) is not None:
            m.bias.data.uniform_(-0.5, 0.5, generator=g)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, size, size, generator=g))
    return model.eval()


def has_norm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) for m in model.modules())


def first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:400]


def ours(model: torch.nn.Module, x: torch.Tensor, ref: torch.Tensor, target: torch.Tensor,
         layernorm: str = "decompose") -> dict[str, Any]:
    from xaicompress.relevance.engine import DeepLiftEngine

    t = time.perf_counter()
    try:
        engine = DeepLiftEngine(model, layernorm=layernorm)
        engine.set_reference(ref)
        res = engine.attribute(x, target)
    except Exception as exc:  # noqa: BLE001  (the refusal is the result)
        return {"ok": False, "error": first_line(exc), "seconds": time.perf_counter() - t}
    mean_df = float(res.delta_f.abs().mean())
    return {"ok": True, "delta_rel": float(res.delta.abs().max()) / max(mean_df, 1e-300),
            "mean_abs_delta_f": mean_df, "mean_abs_f": float(res.logits.abs().mean()),
            "seconds": time.perf_counter() - t,
            "layers": len(set(engine.names.values()))}


def captum(model: torch.nn.Module, x: torch.Tensor, ref: torch.Tensor,
           target: torch.Tensor) -> dict[str, Any]:
    from captum.attr import DeepLift

    t = time.perf_counter()
    try:
        with torch.no_grad():
            df = (model(x) - model(ref)).gather(1, target.view(-1, 1)).squeeze(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, delta = DeepLift(model).attribute(x, ref.expand_as(x), target=target,
                                                 return_convergence_delta=True)
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "error": first_line(exc), "seconds": time.perf_counter() - t}
    mean_df = float(df.abs().mean())
    return {"ok": True, "delta_rel": float(delta.abs().max()) / max(mean_df, 1e-300),
            "seconds": time.perf_counter() - t}


def measure(source: str, name: str, limit: int) -> dict[str, Any]:
    row: dict[str, Any] = {"source": source, "model": name,
                           "transformer": source == "torchvision" and name.startswith(
                               TRANSFORMERS)}
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit)
    try:
        size = SIZE.get(name, 64)
        model = calibrate(build(source, name), size)
        params = sum(p.numel() for p in model.parameters())
        dtype = torch.float64 if params <= 60e6 else torch.float32
        model = model.to(dtype)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 3, size, size, generator=g, dtype=dtype)
        ref = torch.zeros(1, 3, size, size, dtype=dtype)
        target = torch.tensor([1, 2])
        row.update(params=params, dtype=str(dtype).replace("torch.", ""), input=size)
        row["ours"] = ours(model, x, ref, target)
        if row["ours"]["ok"] and has_norm(model):
            row["const"] = ours(model, x, ref, target, "constant")
        row["captum"] = captum(model, x, ref, target)
        if row["ours"]["ok"] and dtype == torch.float64:  # what a float32 user gets
            row["ours_f32"] = ours(model.float(), x.float(), ref.float(), target)
    except Timeout:
        row["error"] = f"time limit of {limit} s"
    except Exception as exc:  # noqa: BLE001  (a model that does not build is reported)
        row["error"] = first_line(exc)
        traceback.print_exc()
    finally:
        signal.alarm(0)
    return row


def fmt_side(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    if r["ok"]:
        return f"{r['delta_rel']:.1e}"
    return "fails: " + r["error"].replace("|", "/")[:160]


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def ok(r: dict[str, Any]) -> bool:
        return bool(r.get("ours", {}).get("ok"))

    cnn = [r for r in rows if not r.get("transformer")]
    scored = [r for r in cnn if ok(r)]
    exact = [r for r in scored if r["ours"]["delta_rel"] <= 1e-4]
    refused = [r for r in cnn if not ok(r)]
    f32 = [r for r in scored if r.get("ours_f32", {}).get("ok")]
    cap_ok = [r for r in cnn if r.get("captum", {}).get("ok")]
    cap_exact = [r for r in cap_ok if r["captum"]["delta_rel"] <= 1e-4]
    return {"cnn_models": len(cnn), "scored": len(scored), "scored_within_1e-4": len(exact),
            "refused": len(refused), "float32_measured": len(f32),
            "float32_within_1e-4": sum(r["ours_f32"]["delta_rel"] <= 1e-4 for r in f32),
            "captum_ran": len(cap_ok),
            "captum_within_1e-4": len(cap_exact),
            "transformers": len(rows) - len(cnn),
            "transformers_scored": sum(ok(r) for r in rows if r.get("transformer"))}


def markdown(data: dict[str, Any]) -> str:
    s = data["summary"]
    refused = [r for r in data["rows"] if not r.get("transformer")
               and not r.get("ours", {}).get("ok")]
    lines = [
        "### Coverage: torchvision and timm CNNs (`benchmarks/relevance_coverage.py`)",
        "",
        "Random weights (seed 0) made trained-like: BatchNorm statistics estimated on 8 "
        "random inputs and every normalisation layer's affine parameters drawn at random "
        "(plain initialisation lets the input's influence die out with depth, e.g. "
        "torchvision efficientnet_b0's output varies by 1e-12 of its size between inputs, "
        "which makes any relative delta noise). 10 classes, eval mode, 2 random inputs "
        "3x64x64 (inception_v3 96x96), float64 (float32 above 60M parameters), the all-zero "
        "input as reference, targets [1, 2]. Cells: relative convergence delta "
        "|Σ contributions − Δf| / mean |Δf| (goal ≤ 1e-4), or the one-line reason a method "
        "refused or failed. `f32`: ours with the model in float32 (what most users run). "
        "`const LN`: `layernorm=constant` (statistics held fixed, Ali et al. 2022) on models "
        "with LayerNorm/GroupNorm; our default `decompose` rule is exact. Measured side by "
        f"side in one run, {data['seconds'] / 60:.0f} min on a shared 2-core machine "
        "(1 thread).",
        "",
        f"**Summary**: of {s['cnn_models']} CNNs, ours scored {s['scored']} "
        f"({s['scored_within_1e-4']} within 1e-4; in float32 {s['float32_within_1e-4']} of "
        f"{s['float32_measured']}) and refused {s['refused']}; Captum ran on "
        f"{s['captum_ran']} ({s['captum_within_1e-4']} within 1e-4). Transformers "
        f"(torchvision vit/swin/maxvit, out of scope: softmax attention): "
        f"{s['transformers_scored']} of {s['transformers']} scored.",
        "",
        "Refused: " + ("; ".join(f"{r['model']} ({_reason(r)})" for r in refused) or "none")
        + ".",
        "",
        f"<details><summary>Per-model table ({len(data['rows'])} models)</summary>",
        "",
        "| source | model | params | ours | f32 | const LN | Captum DeepLift |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        label = r["model"] + (" (transformer)" if r.get("transformer") else "")
        if "error" in r:
            lines.append(f"| {r['source']} | {label} | - | not measured: "
                         f"{r['error'][:160]} | - | - | - |")
            continue
        lines.append(f"| {r['source']} | {label} | {r['params'] / 1e6:.1f}M | "
                     f"{fmt_side(r.get('ours'))} | {fmt_side(r.get('ours_f32'))} | "
                     f"{fmt_side(r.get('const'))} | {fmt_side(r.get('captum'))} |")
    lines += ["", "</details>", ""]
    return "\n".join(lines)


def _reason(row: dict[str, Any]) -> str:
    """The gist of a refusal: what has no rule, or what cannot be traced."""
    err = row.get("error") or row.get("ours", {}).get("error", "")
    err = err.split(": ", 1)[-1]
    for sep in ("; register", "; wrap"):
        err = err.split(sep)[0]
    return err.replace("|", "/")[:140]


def model_list(args: argparse.Namespace) -> list[tuple[str, str]]:
    from xaicompress.models.vision_import import import_torchvision

    items: list[tuple[str, str]] = []
    if not args.timm_only:
        tv = import_torchvision()
        items += [("torchvision", n) for n in tv.models.list_models(module=tv.models)]
    items += [("timm", n) for n in TIMM.values()]
    if args.only:
        keep = set(args.only.split(","))
        items = [it for it in items if it[1] in keep]
    if args.quick:
        items = [it for it in items if it[1] in ("resnet18", "mobilenet_v3_small",
                                                 "convnext_atto", "vit_b_32")]
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="four models only")
    ap.add_argument("--only", default="", help="comma-separated model names")
    ap.add_argument("--timm-only", action="store_true")
    ap.add_argument("--limit", type=int, default=240, help="seconds per model")
    ap.add_argument("--seeds", default="0", help="accepted for reproduce.py; unused")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("XC_THREADS", "1")))
    os.environ.setdefault("XAICOMPRESS_NO_PROGRESS", "1")
    t0 = time.perf_counter()
    rows = []
    for source, name in model_list(args):
        row = measure(source, name, args.limit)
        rows.append(row)
        print(f"{source} {name}: ours {fmt_side(row.get('ours'))} | const "
              f"{fmt_side(row.get('const'))} | captum {fmt_side(row.get('captum'))} "
              f"{row.get('error', '')}", flush=True)
    data = {"rows": rows, "summary": summary(rows), "seconds": time.perf_counter() - t0}
    print(data["summary"], f"{data['seconds']:.0f} s")
    if args.only:
        return  # a partial run does not overwrite the results
    suffix = "_quick" if args.quick else ""
    write_json(f"relevance_coverage{suffix}", data)
    if not args.quick:
        write_block(ROOT / "docs" / "results" / "relevance.md", "coverage", markdown(data))
    print(f"wrote {RESULTS / f'relevance_coverage{suffix}.json'}")


if __name__ == "__main__":
    main()
