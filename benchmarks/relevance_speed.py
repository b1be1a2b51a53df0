"""Speed and memory of all-layer DeepLIFT relevance (issue 3).

For lenet5, vgg11 and resnet20, over the same N samples (default 512, batches of 128):
  plain   one forward + backward pass of the target logit with parameter gradients (the
          cost of one training step's worth of compute, no optimiser);
  ours    `deeplift` criterion: unit AND weight relevance of every Conv2d/Linear;
  captum  Captum 0.9 `LayerDeepLift` looped over the same layers (unit contributions only).
Ratios ours/plain (goal <= 1.5) and captum/ours (goal >= 5) are measured side by side in
one process. Peak memory: the resident-set high-water mark of a fresh subprocess scoring
512 and 4096 samples (goal: within 20%); the data are synthesised per batch so only the
engine's memory can grow.

Speed does not depend on training, so untrained models and random inputs are used.
vgg11 runs at --vgg-width (default 0.25) to keep the Captum loop affordable on 2 cores.

    python benchmarks/relevance_speed.py [--quick] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"lenet5": ((1, 28, 28), {}), "vgg11": ((3, 32, 32), {"width": 0.25}),
          "resnet20": ((3, 32, 32), {})}


class Synthetic(Dataset):
    """Deterministic random images generated per item (no stored data)."""

    def __init__(self, n: int, shape: tuple[int, ...], seed: int) -> None:
        self.n, self.shape, self.seed = n, shape, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):  # noqa: ANN204
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.randn(self.shape, generator=g), torch.randint(0, 10, (), generator=g)


def build(name: str, seed: int, vgg_width: float):  # noqa: ANN201
    from xaicompress.models import create_model

    shape, kw = MODELS[name]
    if name == "vgg11":
        kw = {"width": vgg_width}
    torch.manual_seed(seed)
    return create_model(name, shape, 10, **kw).eval(), shape


def batches(shape: tuple[int, ...], n: int, seed: int, batch: int) -> list:
    return list(DataLoader(Synthetic(n, shape, seed), batch_size=batch))


def time_plain(model, data) -> float:  # noqa: ANN001
    t = time.perf_counter()
    for x, y in data:
        model.zero_grad(set_to_none=True)
        x = x.detach().requires_grad_(True)
        model(x).gather(1, y.view(-1, 1)).sum().backward()
    return time.perf_counter() - t


def time_ours(model, data, spec: str = "deeplift") -> float:  # noqa: ANN001
    from xaicompress.relevance import get_criterion

    crit = get_criterion(spec, pixel_mean=(0.5,), pixel_std=(0.25,))
    t = time.perf_counter()
    crit.score(model, data)
    return time.perf_counter() - t


def time_captum(model, data) -> float:  # noqa: ANN001
    from captum.attr import LayerDeepLift

    from xaicompress.relevance import prunable_layers

    layers = prunable_layers(model)
    ref = None
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for layer in layers.values():
            algo = LayerDeepLift(model, layer)
            for x, y in data:
                if ref is None:
                    ref = torch.full_like(x[:1], -2.0)
                algo.attribute(x, baselines=ref.expand_as(x), target=y)
    return time.perf_counter() - t


def peak_rss_mb(name: str, n: int, seed: int, vgg_width: float) -> float:
    """Resident-set high-water mark of a fresh process scoring n samples, in MiB."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r});"
            "import relevance_speed as b, resource, torch; torch.set_num_threads(1);"
            f"m, s = b.build({name!r}, {seed}, {vgg_width});"
            f"loader = DataLoader = b.DataLoader(b.Synthetic({n}, s, {seed}), batch_size=128);"
            "from xaicompress.relevance import get_criterion;"
            "get_criterion('deeplift', pixel_mean=(0.5,), pixel_std=(0.25,)).score(m, loader);"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    env = {**os.environ, "XAICOMPRESS_NO_PROGRESS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def write_block(path: Path, name: str, text: str) -> None:
    """Replace the block `name` of a markdown file shared by several scripts (kept between
    `<!-- begin name -->` and `<!-- end name -->`), or append it."""
    from xaicompress.atomic import atomic_write_text

    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    old = path.read_text() if path.is_file() else "## Relevance engine\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, new.rstrip() + "\n")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    ap.add_argument("--quick", action="store_true", help="smoke run: 64 samples, one seed")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--memory-samples", default="512,4096")
    ap.add_argument("--vgg-width", type=float, default=0.25)
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("XAICOMPRESS_NO_PROGRESS", "1")
    seeds = [int(s) for s in args.seeds.split(",")]
    n = args.samples
    mem_n = [int(v) for v in args.memory_samples.split(",")]
    if args.quick:
        seeds, n, mem_n = seeds[:1], 64, [64, 256]
    models = args.models.split(",")
    results: dict = {"samples": n, "batch": 128, "seeds": seeds, "vgg_width": args.vgg_width,
                     "threads": 1, "models": {}}
    for name in models:
        runs = {"plain_s": [], "ours_s": [], "batch_s": [], "captum_s": [],
                "ours_over_plain": [], "batch_over_plain": [], "captum_over_ours": []}
        for seed in seeds:
            model, shape = build(name, seed, args.vgg_width)
            data = batches(shape, n, seed, 128)
            time_plain(model, data[:1])  # warm-up (allocator, kernels)
            # interleaved repeats, best of 3: the machine is shared, minima are stable
            plain, ours, fast = float("inf"), float("inf"), float("inf")
            for _ in range(3):
                plain = min(plain, time_plain(model, data))
                ours = min(ours, time_ours(model, data))
                fast = min(fast, time_ours(model, data, "deeplift:weights=batch"))
            captum = time_captum(model, data)
            for k, v in (("plain_s", plain), ("ours_s", ours), ("batch_s", fast),
                         ("captum_s", captum), ("ours_over_plain", ours / plain),
                         ("batch_over_plain", fast / plain), ("captum_over_ours", captum / ours)):
                runs[k].append(v)
            print(f"{name} seed {seed}: plain {plain:.2f}s  ours {ours:.2f}s  weights=batch "
                  f"{fast:.2f}s  captum {captum:.2f}s  ours/plain {ours / plain:.2f}  "
                  f"batch/plain {fast / plain:.2f}  captum/ours {captum / ours:.1f}", flush=True)
        mem = {str(k): peak_rss_mb(name, k, seeds[0], args.vgg_width) for k in mem_n}
        growth = mem[str(mem_n[-1])] / mem[str(mem_n[0])] - 1
        print(f"{name}: peak RSS {mem} MiB, growth {growth * 100:+.1f}%", flush=True)
        results["models"][name] = {**{k: mean_std(v) for k, v in runs.items()},
                                   "raw": runs, "peak_rss_mb": mem, "memory_growth": growth}
    out = ROOT / "benchmarks" / "results" / "relevance_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    from xaicompress.atomic import atomic_write_text

    atomic_write_text(out, json.dumps(results, indent=2))
    plot(results, ROOT / "docs" / "img" / "relevance_speed.png")
    write_markdown(results, ROOT / "docs" / "results" / "relevance.md", args.quick)
    print(f"wrote {out}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xaicompress.atomic import atomic_save_figure

    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(results["models"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, goal, label in ((axes[0], "ours_over_plain", 1.5, "time / plain fwd+bwd"),
                                 (axes[1], "captum_over_ours", 5.0, "Captum loop / ours")):
        means = [results["models"][m][key][0] for m in names]
        stds = [results["models"][m][key][1] for m in names]
        ax.bar(names, means, yerr=stds, color="tab:blue", capsize=4)
        ax.axhline(goal, color="tab:red", ls="--", label=f"goal {goal:g}")
        ax.set_title(label)
        ax.legend()
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)


def write_markdown(results: dict, path: Path, quick: bool) -> None:
    from xaicompress.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    mem_keys = list(next(iter(results["models"].values()))["peak_rss_mb"])
    lines = [
        "## Relevance engine speed (issue 3)",
        "",
        f"`python benchmarks/relevance_speed.py{' --quick' if quick else ''}`: "
        f"{results['samples']} samples in batches of {results['batch']}, 1 CPU thread, "
        f"seeds {results['seeds']} (mean ± std). Untrained models and random inputs (speed "
        f"does not depend on training); vgg11 at width {results['vgg_width']}. `ours` = "
        "deeplift unit AND weight relevance of all Conv2d/Linear layers; `plain` = one "
        "forward + backward with parameter gradients; `Captum` = `LayerDeepLift` looped over "
        "the same layers (unit contributions only).",
        "",
        "| model | ours / plain (goal ≤ 1.5) | `weights=batch` / plain | Captum loop / ours "
        f"(goal ≥ 5) | peak RSS {mem_keys[0]} → {mem_keys[-1]} samples (goal: within 20%) |",
        "|---|---|---|---|---|",
    ]
    for name, r in results["models"].items():
        op, co, bp = r["ours_over_plain"], r["captum_over_ours"], r["batch_over_plain"]
        mem = r["peak_rss_mb"]
        lines.append(
            f"| {name} | {op[0]:.2f} ± {op[1]:.2f} {'met' if op[0] <= 1.5 else 'MISSED'} | "
            f"{bp[0]:.2f} ± {bp[1]:.2f} | "
            f"{co[0]:.1f} ± {co[1]:.1f} {'met' if co[0] >= 5 else 'MISSED'} | "
            f"{mem[mem_keys[0]]:.0f} → {mem[mem_keys[-1]]:.0f} MiB "
            f"({r['memory_growth'] * 100:+.1f}%, "
            f"{'met' if abs(r['memory_growth']) <= 0.2 else 'MISSED'}) |")
    lines += [
        "",
        "Notes. The default weight relevance is the issue's definition, the mean over "
        "samples of |per-sample contribution|: it needs a per-sample product of every "
        "layer's multipliers and inputs (B × #weights values per batch), which dominates on "
        "layers with small feature maps (vgg11's late layers); it is the main reason the "
        "1.5× goal is missed there. `deeplift:weights=batch` (|mean contribution|, one "
        "weight-gradient GEMM per layer) is the cheaper variant measured in the third "
        "column. Our engine also skips parameter gradients, which the plain pass "
        "computes. Captum's loop computes unit contributions only, one full pass per layer; "
        "its cost relative to ours grows with depth (resnet20: 22 layers). Timings are "
        "minima of 3 interleaved repeats on a shared 2-core machine; ratios are measured "
        "side by side but still carry noise. Peak RSS is the whole process's high-water "
        "mark, including Python, torch and the model.",
        "",
        "![relevance speed](../img/relevance_speed.png)", ""]
    atomic_write_text(path, "\n".join(lines))


if __name__ == "__main__":
    main()
