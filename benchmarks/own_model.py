"""Start from the user's own trained model (issue 14): torchvision and timm classifiers
trained with plain PyTorch outside xaicompress, imported, compressed, reloaded.

    python benchmarks/own_model.py                 # every model of MODELS
    python benchmarks/own_model.py --models torchvision:resnet18,timm:resnet18 --epochs 1

For each model, on a folder of RGB PNGs written from mnist5k (gray digits saved as RGB,
class sub-folders, the mnist5k train/test split, `--train` / `--test` images of each):

1. the user's side, no xaicompress: torchvision transforms (Resize 32 x 32, ToTensor,
   ImageNet Normalize), the architecture from torchvision / timm (random init), `--epochs`
   of Adam, their own test accuracy, `torch.save(model.state_dict(), "mine.pth")`;
2. `xaicompress import` (`import_weights`, the command's code) with `--normalise imagenet
   --size 32`: its accuracy must equal the user's to 0.01 pt;
3. the stages `compress` runs (`run_stage`, seeded): structured pruning (Taylor, ratio 0.25,
   0.5 epoch fine-tuning), unstructured pruning (Taylor, 50 % of all layers), weight sharing
   (16 clusters) and, from the unstructured checkpoint, 8-bit quantization; every stage's
   checkpoint and packed file written and reloaded: max |Δ logit| on 64 test images must be
   <= 1e-5; the quantized model as ONNX run by onnxruntime (its tolerance is the writer's);
4. compression ratio (fp32 bytes / packed file bytes) and accuracy drop of the quantized
   model, and the wall time of each part. DeepLIFT is tried on the imported model: models
   it has no rule for are listed with the module it names (gradient criteria are used for
   the stages, so every model goes through).

One thread (`torch.set_num_threads(1)`), seed 0. Results: benchmarks/results/own_model.json
and docs/results/own_model.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_json, write_section  # noqa: E402

MODELS = ["torchvision:resnet18", "torchvision:mobilenet_v2", "torchvision:mobilenet_v3_small",
          "torchvision:efficientnet_b0", "torchvision:shufflenet_v2_x0_5",
          "torchvision:squeezenet1_1", "torchvision:regnet_y_400mf", "timm:resnet18",
          "timm:mobilenetv3_small_050", "timm:efficientnet_b0"]
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SIZE = 32
PROBE = 64


def write_pngs(root: Path, n_train: int, n_test: int) -> None:
    """mnist5k digits as RGB PNGs in DIR/train/<class>/ and DIR/test/<class>/."""
    from PIL import Image

    from xaicompress.data import load_dataset

    raw = load_dataset("mnist5k", preprocess=None)
    for split, ds, n in (("train", raw.train, n_train), ("test", raw.test, n_test)):
        for i in range(min(n, len(ds))):
            x, y = ds[i]
            px = raw.input_to_pixel(x)[0].clamp(0, 1).mul(255).round().byte().numpy()
            d = root / split / str(int(y))
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.stack([px] * 3, -1), "RGB").save(d / f"{i:05d}.png")


# -------------------------------------------------------------- the user's side
def user_training(spec: str, root: Path, epochs: float, seed: int) -> tuple[Any, float, Path]:
    """Plain PyTorch: torchvision's ImageFolder and transforms, no xaicompress code."""
    from xaicompress.models.vision_import import import_timm, import_torchvision

    tv = import_torchvision()
    tf = tv.transforms.Compose([tv.transforms.Resize((SIZE, SIZE)), tv.transforms.ToTensor(),
                                tv.transforms.Normalize(*IMAGENET)])
    train = tv.datasets.ImageFolder(str(root / "train"), transform=tf)
    test = tv.datasets.ImageFolder(str(root / "test"), transform=tf)
    family, name = spec.split(":")
    torch.manual_seed(seed)
    if family == "timm":
        model = import_timm().create_model(name, pretrained=False, num_classes=10)
    else:
        model = tv.models.get_model(name, weights=None, num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, generator=g)
    steps = math.ceil(epochs * len(loader))
    model.train()
    done = 0
    while done < steps:
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(test, batch_size=256):
            correct += int((model(x).argmax(1) == y).sum())
    path = root.parent / f"{name}.pth"
    torch.save(model.state_dict(), path)
    return model, 100.0 * correct / len(test), path


# ------------------------------------------------------------- xaicompress's side
def _probe(bundle: Any) -> torch.Tensor:
    return torch.stack([bundle.test[i][0] for i in range(min(PROBE, len(bundle.test)))])


def _reload_delta(ckpt: Any, spec: str, folder: Path, label: str, x: torch.Tensor
                  ) -> dict[str, float]:
    from xaicompress.checkpoint import load_checkpoint, save_checkpoint
    from xaicompress.export.packed import load_packed, write_packed

    out = {}
    with torch.no_grad():
        want = ckpt.model.eval()(x)
        save_checkpoint(ckpt, folder / f"{label}.safetensors")
        back = load_checkpoint(folder / f"{label}.safetensors", model=spec)
        out["checkpoint"] = float((back.model(x) - want).abs().max())
        write_packed(ckpt, folder / f"{label}.xcpk")
        back = load_packed(folder / f"{label}.xcpk", model=spec)
        out["packed"] = float((back.model(x) - want).abs().max())
    return out


def _deeplift_support(ckpt: Any, bundle: Any) -> str:
    from xaicompress.errors import XaiCompressError
    from xaicompress.relevance import compute_relevance, get_criterion

    try:
        compute_relevance(ckpt.model, get_criterion("deeplift"), bundle, samples=8)
        return "yes"
    except XaiCompressError as exc:
        return f"no: {str(exc)[:140]}"


def xaicompress_side(spec: str, weights: Path, data: str, folder: Path, seed: int
                     ) -> dict[str, Any]:
    from xaicompress.data import load_dataset
    from xaicompress.data.preprocess import Preprocess
    from xaicompress.export.onnx import export_onnx, onnx_predict
    from xaicompress.export.packed import packed_report
    from xaicompress.importing import import_weights
    from xaicompress.metrics import evaluate
    from xaicompress.pipeline.config import validate_config
    from xaicompress.pipeline.stages import run_stage

    t0 = time.perf_counter()
    bundle = load_dataset(data, preprocess=Preprocess(*IMAGENET, size=SIZE))
    ckpt, _ = import_weights(weights, spec, data, bundle=bundle)
    res: dict[str, Any] = {"import_accuracy": ckpt.metrics["accuracy"],
                           "import_seconds": round(time.perf_counter() - t0, 2),
                           "deeplift": _deeplift_support(ckpt, bundle)}
    x = _probe(bundle)
    stages = validate_config({"checkpoint": "x", "stages": [
        {"type": "prune_structured", "criterion": "taylor", "ratio": 0.25,
         "finetune_epochs": 0.5, "samples": 128},
        {"type": "prune_unstructured", "criterion": "taylor", "ratio": 0.5, "layers": "all",
         "samples": 128},
        {"type": "share", "criterion": "l1", "clusters": 16},
        {"type": "quantize", "criterion": "l1", "avg_bits": 8, "samples": 128}]}).stages
    deltas, timing, accuracy = {}, {}, {}
    current = ckpt
    unstructured = None
    for i, st in enumerate(stages):
        t = time.perf_counter()
        src = unstructured if st.type == "quantize" else current
        current = run_stage(src, bundle, st, seed * 1000 + i + 1)
        timing[st.type] = round(time.perf_counter() - t, 2)
        if st.type == "prune_unstructured":
            unstructured = current
        deltas[st.type] = _reload_delta(current, spec, folder, st.type, x)
        accuracy[st.type] = evaluate(current, bundle.test, latency=False)["accuracy"]
    export_onnx(current, folder / "model.onnx")
    with torch.no_grad():
        onnx_delta = float((onnx_predict(folder / "model.onnx", x) - current.model(x))
                           .abs().max())
    fp32 = evaluate(ckpt, None, latency=False)["fp32_bytes"]
    res.update(stage_seconds=timing, reload_delta=deltas, stage_accuracy=accuracy,
               onnx_delta=onnx_delta, fp32_bytes=fp32,
               packed_bytes=packed_report(current).file_bytes,
               ratio=round(fp32 / packed_report(current).file_bytes, 2),
               drop=round(ckpt.metrics["accuracy"] - accuracy["quantize"], 2),
               total_seconds=round(time.perf_counter() - t0, 1))
    return res


def _markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = ["## Your own trained model (issue 14)", "",
             f"`python benchmarks/own_model.py --epochs {args.epochs} --train {args.train} "
             f"--test {args.test}`: {args.train} train / {args.test} test RGB PNGs written "
             "from mnist5k, 32 x 32, ImageNet normalisation, one thread, seed 0. User: "
             "torchvision transforms + plain PyTorch training; xaicompress: `import`, then "
             "structured pruning (Taylor, 25 %, 0.5 epoch fine-tuning), unstructured (Taylor, "
             "50 % of all layers), sharing (16 clusters); 8-bit quantization from the "
             "unstructured model; ratio = fp32 bytes / packed file of the quantized model.",
             "", "| model | user acc % | import acc % | Δ pt | max Δ logit reload (all "
             "files) | ONNX Δ | ratio | drop pt | DeepLIFT | train s | xaicompress s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error'][:120]} |" + " |" * 9)
            continue
        worst = max(v for d in r["reload_delta"].values() for v in d.values())
        lines.append(
            f"| {r['model']} | {r['user_accuracy']:.2f} | {r['import_accuracy']:.2f} | "
            f"{abs(r['user_accuracy'] - r['import_accuracy']):.3f} | {worst:.1e} | "
            f"{r['onnx_delta']:.1e} | {r['ratio']:.1f}x | {r['drop']:.2f} | "
            f"{r['deeplift'][:60]} | {r['train_seconds']:.0f} | {r['total_seconds']:.0f} |")
    ok = [r for r in rows if "error" not in r]
    eq = sum(abs(r["user_accuracy"] - r["import_accuracy"]) <= 0.01 for r in ok)
    exact = sum(max(v for d in r["reload_delta"].values() for v in d.values()) <= 1e-5
                for r in ok)
    total = sum(r.get("train_seconds", 0) + r.get("total_seconds", 0) for r in rows)
    steps = math.ceil(args.epochs * math.ceil(args.train / 64))
    lines += ["", f"Goals: import accuracy = user's to 0.01 pt: {eq}/{len(rows)} models; "
              f"max |Δ logit| <= 1e-5 after reloading every stage's checkpoint and packed "
              f"file: {exact}/{len(rows)} models (ONNX is compared within the writer's "
              "tolerance, not bit-exactly). Wall time of the whole run: "
              f"{total / 60:.0f} min (one thread, on a machine other jobs shared).", "",
              f"The user's training here is {steps} Adam steps per model (what fit the time "
              "this run had), so most models are near chance (10 %) and the ratio / drop "
              "columns only show that every model goes through; they say nothing about "
              "accuracy after compression of a trained model (see the pruning, sharing and "
              "mixed-precision sections for that)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import xaicompress.models.vision  # noqa: F401 (the torchvision: / timm: families)

    rows = []
    with tempfile.TemporaryDirectory(prefix="own-model-") as tmp:
        root = Path(tmp) / "pngs"
        write_pngs(root, args.train, args.test)
        for spec in args.models.split(","):
            t = time.perf_counter()
            row: dict[str, Any] = {"model": spec}
            try:
                _, own, weights = user_training(spec, root, args.epochs, args.seed)
                row.update(user_accuracy=own, train_seconds=round(time.perf_counter() - t, 1))
                folder = Path(tmp) / spec.replace(":", "-")
                folder.mkdir()
                row.update(xaicompress_side(spec, weights, f"folder:{root}", folder,
                                            args.seed))
            except Exception as exc:  # a model that fails is a result, not a crash
                row["error"] = f"{type(exc).__name__}: {exc}"
            print(row, flush=True)
            rows.append(row)
            # written after every model: a run cut short still leaves what it measured
            write_json("own_model", {"args": vars(args), "rows": rows})
            write_section("own_model", _markdown(rows, args))


if __name__ == "__main__":
    main()
