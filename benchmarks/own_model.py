"""Start from the user's own trained model (issue 14), measured as a user works: plain
PyTorch training outside xaicompress, then the `xaicompress` command line.

    python benchmarks/own_model.py                      # every model of MODELS
    python benchmarks/own_model.py --models mynet:build,torchvision:resnet18 --epochs 3

For each model, on a folder of RGB PNGs written from mnist5k (gray digits saved as RGB,
class sub-folders, the mnist5k train / test split, the first `--train` / `--test` images):

1. the user's side, no xaicompress code: torchvision's ImageFolder + transforms (Resize
   32 x 32, ToTensor, ImageNet Normalize), the architecture from torchvision / timm (random
   init) or the user's own module (`mynet.py`: F.relu, one nn.ReLU used three times,
   BatchNorm, a residual add), `--epochs` of Adam (lr 2e-3, cosine decay, batch 64, no
   augmentation), their own test accuracy, `torch.save(model.state_dict(), "mine.pth")`;
2. `xaicompress import mine.pth --model SPEC --data folder:DIR --normalise imagenet --size
   32 --json` (a subprocess, as typed): its accuracy must equal the user's to 0.01 pt;
3. `xaicompress compress --config own.yaml --out runs/NAME` (a subprocess): the config is
   configs/user-model.yaml as shipped, with `model:` / `train:` replaced by
   `checkpoint: imported.safetensors` (and `model: mynet:build` for the user's own factory,
   which must be named to be trusted); the report's baseline must be the import's accuracy;
4. every file the run wrote, reloaded: each stage's checkpoint in OUT/cache (saved again
   and reloaded, and written as a packed file and reloaded), OUT/model.safetensors and
   OUT/model.xcpk against the final stage; max |Δ logit| on 64 test images must be
   <= 1e-5, and each reloaded stage's test accuracy must be the one the report recorded
   (measured in memory before the file was written). model.onnx (onnxruntime) is compared
   within the writer's tolerance.

Ratio = fp32 bytes / packed file (the report's `compression_ratio`); drop = baseline
accuracy - final accuracy (test split). One thread per process (OMP_NUM_THREADS=1), seed 0.
Results: benchmarks/results/own_model.json and docs/results/own_model.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, write_json, write_section  # noqa: E402

OWN = "mynet:build"  # the hand-written CNN, the user's own module
MODELS = [OWN, "torchvision:resnet18", "torchvision:mobilenet_v2",
          "timm:mobilenetv3_small_050", "timm:resnet18", "torchvision:mobilenet_v3_small",
          "torchvision:shufflenet_v2_x0_5", "torchvision:squeezenet1_1",
          "torchvision:regnet_y_400mf", "torchvision:efficientnet_b0", "timm:efficientnet_b0"]
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SIZE = 32
PROBE = 64
EXACT = 1e-5
#: what a user changes in configs/user-model.yaml for a model it does not fit as shipped:
#: squeezenet's classifier is a 1 x 1 convolution, so `layers: fc` is refused ("--layers fc:
#: the model has no such layers") and the unstructured stage prunes the convolutions
CONFIG_CHANGES = {"torchvision:squeezenet1_1": {"prune_unstructured": {"layers": "conv"}}}

#: the user's own network, as a file of their project (the factory xaicompress is told)
MYNET = '''
import torch
import torch.nn.functional as F
from torch import nn


class MyNet(nn.Module):
    """A hand-written CNN: F.relu, one nn.ReLU reused, BatchNorm, a residual add."""

    def __init__(self, num_classes=10, width=32):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.relu = nn.ReLU()  # used three times
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(2 * width * 4 * 4, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.pool(self.relu(self.bn0(self.stem(x))))          # 16 x 16
        y = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(x + self.bn2(self.conv2(y)))                 # residual add
        x = self.pool(F.relu(self.down(x)))                        # 4 x 4
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def build(num_classes=10, width=32):
    return MyNet(num_classes, width)
'''


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
def _architecture(spec: str, project: Path) -> torch.nn.Module:
    from xaicompress.models.vision_import import import_timm, import_torchvision

    if spec == OWN:
        sys.path.insert(0, str(project))
        import mynet  # the user's file

        return mynet.build(num_classes=10)
    family, name = spec.split(":")
    if family == "timm":
        return import_timm().create_model(name, pretrained=False, num_classes=10)
    return import_torchvision().models.get_model(name, weights=None, num_classes=10)


def user_training(spec: str, root: Path, project: Path, epochs: float, seed: int
                  ) -> tuple[float, Path, int]:
    """Plain PyTorch: torchvision's ImageFolder and transforms, no xaicompress code.
    Returns the user's test accuracy, the saved state dict and the number of steps."""
    from xaicompress.models.vision_import import import_torchvision

    tv = import_torchvision()
    tf = tv.transforms.Compose([tv.transforms.Resize((SIZE, SIZE)), tv.transforms.ToTensor(),
                                tv.transforms.Normalize(*IMAGENET)])
    train = tv.datasets.ImageFolder(str(root / "train"), transform=tf)
    test = tv.datasets.ImageFolder(str(root / "test"), transform=tf)
    # the decoded images once in memory (a user's cached dataset), so epochs cost compute only
    xs = torch.stack([train[i][0] for i in range(len(train))])
    ys = torch.tensor(train.targets)
    torch.manual_seed(seed)
    model = _architecture(spec, project)
    steps = math.ceil(epochs * math.ceil(len(xs) / 64))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    done = 0
    while done < steps:
        order = torch.randperm(len(xs), generator=g)
        for i in range(0, len(xs), 64):
            idx = order[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()
            opt.step()
            sched.step()
            done += 1
            if done >= steps:
                break
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(test, batch_size=256):
            correct += int((model(x).argmax(1) == y).sum())
    path = project / f"{spec.replace(':', '-')}.pth"
    torch.save(model.state_dict(), path)
    return 100.0 * correct / len(test), path, steps


# ------------------------------------------------------- xaicompress's command line
def _cli(args: list[str], project: Path) -> tuple[str, float]:
    """Run `xaicompress ARGS` as a user types it (from the project folder); stdout, seconds."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(project)]))
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "xaicompress", *args], cwd=project, env=env,
                       capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"xaicompress {args[0]} exit {p.returncode}: "
                           f"{(p.stderr or p.stdout).strip()[-400:]}")
    return p.stdout + p.stderr, time.perf_counter() - t


def user_config(spec: str, data: str, checkpoint: Path) -> dict[str, Any]:
    """configs/user-model.yaml as shipped, starting from the imported checkpoint."""
    cfg = yaml.safe_load((ROOT / "configs" / "user-model.yaml").read_text())
    cfg.pop("train")
    cfg["model"] = spec if spec == OWN else None  # own code must be named to be trusted
    if cfg["model"] is None:
        cfg.pop("model")
    cfg.update(name=f"{spec} (imported)", checkpoint=str(checkpoint), data=data)
    for st in cfg["stages"]:
        st.update(CONFIG_CHANGES.get(spec, {}).get(st["type"], {}))
    return cfg


def _probe(bundle: Any) -> torch.Tensor:
    return torch.stack([bundle.test[i][0] for i in range(min(PROBE, len(bundle.test)))])


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def reload_checks(out: Path, report: dict[str, Any], data: str, trusted: str | None,
                  scratch: Path) -> dict[str, Any]:
    """Every file of the run reloaded and compared (see module docstring, 4.)."""
    from xaicompress.checkpoint import load_checkpoint, save_checkpoint
    from xaicompress.data import load_dataset
    from xaicompress.export.onnx import onnx_predict
    from xaicompress.export.packed import load_packed, write_packed
    from xaicompress.train import accuracy

    files = sorted((out / "cache").glob("*.safetensors"))
    first = load_checkpoint(files[0], model=trusted)
    bundle = load_dataset(data, preprocess=first.spec.preprocess)
    x = _probe(bundle)
    recorded = [report["baseline"]["accuracy"]] + [s["accuracy"] for s in report["stages"]]
    deltas: dict[str, float] = {}
    acc_gap = 0.0
    final = None
    for f, want_acc in zip(files, recorded, strict=True):
        ck = load_checkpoint(f, model=trusted)
        want = _logits(ck.model, x)
        acc_gap = max(acc_gap, abs(accuracy(ck.model, bundle.test) - want_acc))
        save_checkpoint(ck, scratch / "again.safetensors")
        deltas[f"{f.stem}.safetensors"] = float(
            (_logits(load_checkpoint(scratch / "again.safetensors", model=trusted).model, x)
             - want).abs().max())
        write_packed(ck, scratch / "again.xcpk")
        deltas[f"{f.stem}.xcpk"] = float(
            (_logits(load_packed(scratch / "again.xcpk", model=trusted).model, x) - want)
            .abs().max())
        final = (ck, want)
    assert final is not None
    want = final[1]
    for name in ("model.safetensors", "model.xcpk"):
        loader = load_checkpoint if name.endswith("safetensors") else load_packed
        deltas[f"OUT/{name}"] = float((_logits(loader(out / name, model=trusted).model, x)
                                       - want).abs().max())
    onnx_delta = float((torch.as_tensor(onnx_predict(out / "model.onnx", x)) - want)
                       .abs().max())
    return {"reload_delta": deltas, "reload_max": max(deltas.values()),
            "stage_accuracy_gap": acc_gap, "onnx_delta": onnx_delta, "files": len(deltas)}


def xaicompress_side(spec: str, weights: Path, root: Path, project: Path) -> dict[str, Any]:
    data = f"folder:{root}"
    trusted = spec if spec == OWN else None
    stem = spec.replace(":", "-")
    imported = project / f"{stem}.safetensors"
    text, import_s = _cli(["import", str(weights), "--model", spec, "--data", data,
                           "--normalise", "imagenet", "--size", str(SIZE), "--json",
                           "--out", str(imported)], project)
    imp = json.loads(text[text.index("{"):text.rindex("}") + 1])
    cfg_path = project / f"{stem}.yaml"
    cfg_path.write_text(yaml.safe_dump(user_config(spec, data, imported), sort_keys=False))
    out = project / "runs" / stem  # runs/ does not exist before the first model
    log, compress_s = _cli(["compress", "--config", str(cfg_path), "--out", str(out)],
                           project)
    report = json.loads((out / "report.json").read_text())
    sizes = {d["file"]: d["bytes"] for d in report.get("deployables", [])
             if "file" in d and "bytes" in d}
    res: dict[str, Any] = {
        "import_accuracy": imp["accuracy"], "import_seconds": round(import_s, 1),
        "baseline_accuracy": report["baseline"]["accuracy"],
        "final_accuracy": report["final"]["accuracy"],
        "drop": round(report["accuracy_drop"], 2),
        "ratio": round(report["compression_ratio"], 2),
        "fp32_bytes": report["baseline"]["fp32_bytes"],
        "packed_bytes": (out / "model.xcpk").stat().st_size,
        "onnx_bytes": (out / "model.onnx").stat().st_size,
        "onnx_int8_bytes": ((out / "model.int8.onnx").stat().st_size
                            if (out / "model.int8.onnx").exists() else None),
        "deployables": sizes,
        "stages": [{"name": s["name"], "accuracy": s["accuracy"], "seconds": s["seconds"]}
                   for s in report["stages"]],
        "fidelity_skipped": report["fidelity"].get("skipped"),
        "fidelity_final": report["fidelity"].get("final"),
        "solver_line_in_output": "Highs" in log,
        "compress_seconds": round(compress_s, 1)}
    scratch = project / "scratch"
    scratch.mkdir(exist_ok=True)
    res.update(reload_checks(out, report, data, trusted, scratch))
    return res


def _row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"| {r['model']} | " + (f"{r['user_accuracy']:.2f} | " if "user_accuracy" in r
                                       else "") + f"failed: {r['error'][:160]} |"
    return (f"| {r['model']} | {r.get('epochs', '')} ({r['steps']}) | {r['user_accuracy']:.2f} | "
            f"{r['import_accuracy']:.2f} | {r['baseline_accuracy']:.2f} | "
            f"{r['final_accuracy']:.2f} | {r['drop']:.2f} | {r['ratio']:.1f}x | "
            f"{r['fp32_bytes'] / 1e6:.2f} MB | {r['packed_bytes'] / 1e3:.0f} kB | "
            f"{r['onnx_bytes'] / 1e3:.0f} kB | {r['reload_max']:.1e} ({r['files']}) | "
            f"{r['onnx_delta']:.1e} | {r['train_seconds']:.0f} | {r['import_seconds']:.0f} | "
            f"{r['compress_seconds']:.0f} |")


def _markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "## Your own trained model (issue 14)", "",
        f"`python benchmarks/own_model.py --epochs {args.epochs} --train {args.train} "
        f"--test {args.test}` (seed {args.seed}): {args.train} train / {args.test} test RGB "
        "PNGs written from mnist5k (the gray digits saved as RGB). **User** (plain PyTorch, "
        "no xaicompress code): torchvision ImageFolder + Resize 32 x 32 + ToTensor + "
        f"ImageNet Normalize, random init, {args.epochs} epochs (per model in the table) of "
        "Adam (lr 2e-3, cosine decay to 0, batch 64, no augmentation), own test accuracy, "
        "`torch.save(model.state_dict())`. `mynet:build` is the hand-written CNN (F.relu, "
        "one nn.ReLU used three times, BatchNorm, a residual add) in the user's `mynet.py`. "
        "**xaicompress**, as typed: `xaicompress import mine.pth --model SPEC --data "
        "folder:DIR --normalise imagenet --size 32`, then `xaicompress compress --config "
        "own.yaml --out runs/NAME` where own.yaml is configs/user-model.yaml as shipped "
        "(DeepLIFT everywhere: structured 50 % in 2 steps + 1 epoch fine-tuning each, "
        "unstructured 90 % of the fc layers + 2 epochs, 4-bit mixed-precision quantization + "
        "1 epoch QAT, 1 epoch fine-tuning; 10 % of the training folder held out for "
        "validation) with `checkpoint:` the imported file; squeezenet1_1 (no Linear layer: "
        "`layers: fc` is refused) prunes `layers: conv`. One thread per process.", "",
        "| model | user epochs (steps) | user acc % | import acc % | compress baseline % | "
        "final % | drop pt | ratio | fp32 | packed | model.onnx | max Δ logit reload (files) "
        "| ONNX Δ | train s | import s | compress s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(r) for r in rows]
    ok = [r for r in rows if "error" not in r]
    eq = sum(abs(r["user_accuracy"] - r["import_accuracy"]) <= 0.01 for r in ok)
    base = sum(abs(r["baseline_accuracy"] - r["import_accuracy"]) <= 0.01 for r in ok)
    exact = sum(r["reload_max"] <= EXACT for r in ok)
    gap = max((r["stage_accuracy_gap"] for r in ok), default=float("nan"))
    above = sum(r.get("user_accuracy", 0) >= 90 for r in rows)
    solver = sum(r["solver_line_in_output"] for r in ok)
    total = sum(r.get("train_seconds", 0) + r.get("import_seconds", 0)
                + r.get("compress_seconds", 0) for r in rows)
    lines += [
        "", f"Goals: import accuracy = user's to 0.01 pt: {eq}/{len(rows)} models "
        f"(and compress's baseline = import's: {base}/{len(rows)}); max |Δ logit| <= 1e-5 "
        f"after reloading every file of the run (each stage's checkpoint saved again and "
        f"packed, OUT/model.safetensors, OUT/model.xcpk): {exact}/{len(rows)} models; each "
        f"reloaded stage's test accuracy vs the report's: max gap {gap:.3f} pt. "
        f"User accuracy >= 90 %: {above}/{len(rows)}. Solver debug line in compress output: "
        f"{solver}/{len(ok)} runs. ONNX (onnxruntime) is compared within the writer's "
        f"tolerance, not bit-exactly. Wall time of the whole run: {total / 60:.0f} min (one "
        "thread per process, on 2 cores other jobs shared)."]
    return "\n".join(lines)


def run_model(spec: str, root: Path, project: Path, args: argparse.Namespace
              ) -> dict[str, Any]:
    row: dict[str, Any] = {"model": spec}
    t = time.perf_counter()
    try:
        own, weights, steps = user_training(spec, root, project, args.epochs, args.seed)
        row.update(user_accuracy=own, epochs=args.epochs, steps=steps,
                   train_seconds=round(time.perf_counter() - t, 1))
        row.update(xaicompress_side(spec, weights, root, project))
    except Exception as exc:  # a model that fails is a result, not a crash
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def merge(args: argparse.Namespace) -> None:
    from _common import RESULTS

    rows: dict[str, dict[str, Any]] = {}
    runs = []
    for name in args.merge.split(","):
        data = json.loads((RESULTS / f"{name}.json").read_text())
        # a merged file lists its runs' arguments; its rows carry their epochs
        given = data["args"] if isinstance(data["args"], list) else [data["args"]]
        runs += given
        for r in data["rows"]:
            rows[r["model"]] = {"epochs": given[0]["epochs"], **r}
    order = [m for m in MODELS if m in rows] + [m for m in rows if m not in MODELS]
    merged = [rows[m] for m in order]
    args.epochs = " / ".join(sorted({f"{r['epochs']:g}" for r in merged}))
    args.train, args.test, args.seed = (runs[0][k] for k in ("train", "test", "seed"))
    write_json(args.name, {"args": runs, "rows": merged})
    write_section(args.name, _markdown(merged, args))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="own_model", help="results file name")
    ap.add_argument("--merge", help="comma-separated results names: write --name from their "
                    "rows (a later file's row replaces an earlier one's for the same model, "
                    "e.g. a model retrained for more epochs); runs nothing")
    args = ap.parse_args()
    if args.merge:
        merge(args)
        return
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="own-model-") as tmp:
        project = Path(tmp)  # the user's project folder: their code, weights, runs/
        (project / "mynet.py").write_text(MYNET)
        root = project / "pngs"
        write_pngs(root, args.train, args.test)
        for spec in args.models.split(","):
            row = run_model(spec, root, project, args)
            print(json.dumps(row), flush=True)
            rows.append(row)
            # written after every model: a run cut short still leaves what it measured
            write_json(args.name, {"args": vars(args), "rows": rows})
            write_section(args.name, _markdown(rows, args))


if __name__ == "__main__":
    main()
