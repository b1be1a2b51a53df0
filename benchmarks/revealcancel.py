"""Does DeepLIFT's RevealCancel rule change a compression result? (issue 15, item 1)

Post-training (no fine-tuning, BatchNorm re-estimated, the library's defaults otherwise):
LeNet-5 trained on mnist5k, then structured pruning (layer scope, 0.5 and 0.7) and
unstructured pruning of the fully connected layers (0.9 and 0.95), each scored by
`deeplift` (Rescale) and `deeplift:rule=revealcancel` on the same model and samples. Writes
benchmarks/results/revealcancel.json and docs/results/revealcancel.md.

    python benchmarks/revealcancel.py [--seeds 0,1,2] [--epochs 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XAICOMPRESS_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import add_seeds, base_model, fmt, write_json, write_section  # noqa: E402

from xaicompress.data import load_dataset  # noqa: E402
from xaicompress.prune import prune_structured, prune_unstructured  # noqa: E402
from xaicompress.train import accuracy  # noqa: E402

RULES = {"rescale": "deeplift", "revealcancel": "deeplift:rule=revealcancel"}
SETTINGS = [("structured", 0.5), ("structured", 0.7), ("unstructured", 0.9),
            ("unstructured", 0.95)]


def cut(kind: str, ratio: float, base, crit: str, bundle):  # noqa: ANN001, ANN201
    if kind == "structured":
        return prune_structured(base, crit, bundle, ratio=ratio, scope="layer",
                                reconstruct=False)
    return prune_unstructured(base, crit, bundle, ratio=ratio, layers="fc", reconstruct=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_seeds(ap)
    ap.add_argument("--epochs", type=float, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    bundle = load_dataset("mnist5k")
    rows: dict[str, dict[str, list[float]]] = {}
    for seed in args.seeds:
        base, _ = base_model("lenet5", seed=seed, epochs=args.epochs, lr=3e-3)
        for kind, ratio in SETTINGS:
            cell = rows.setdefault(f"{kind} {ratio}", {r: [] for r in RULES})
            for rule, crit in RULES.items():
                acc = accuracy(cut(kind, ratio, base, crit, bundle).model, bundle.test)
                cell[rule].append(acc)
                print(f"seed {seed} {kind} {ratio} {rule}: {acc:.2f}%", flush=True)
    lines = ["## RevealCancel vs Rescale (`benchmarks/revealcancel.py`)", "",
             f"LeNet-5 on mnist5k ({args.epochs:g} training epochs), post-training (no "
             "fine-tuning, BatchNorm re-estimated), test accuracy %, mean ± std over seeds "
             f"{', '.join(map(str, args.seeds))}; the same base model and samples for both "
             "rules. Difference = RevealCancel − Rescale, paired by seed.", "",
             "| setting | Rescale | RevealCancel | difference (pt) |", "|---|---|---|---|"]
    for name, cell in rows.items():
        diff = [b - a for a, b in zip(cell["rescale"], cell["revealcancel"], strict=True)]
        lines.append(f"| {name} | {fmt(cell['rescale'])} | {fmt(cell['revealcancel'])} | "
                     f"{fmt(diff)} |")
    lines += ["", f"Run time {time.perf_counter() - t0:.0f} s."]
    write_json("revealcancel", {"seeds": args.seeds, "epochs": args.epochs, "rows": rows})
    write_section("revealcancel", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
