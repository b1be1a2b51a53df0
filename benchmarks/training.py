"""Foundation figures: default training accuracy of the zoo on mnist5k over seeds, and time.

    python benchmarks/training.py [--seeds 0,1,2] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_seeds, fmt, write_json, write_section  # noqa: E402

MODELS = {"lenet5": {}, "lenet300": {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_seeds(ap)
    ap.add_argument("--quick", action="store_true", help="1 seed, 1 epoch: smoke run")
    args = ap.parse_args()
    import torch

    from xaicompress.train import train_checkpoint

    seeds = [0] if args.quick else args.seeds
    rows, data = [], {}
    for model in MODELS:
        accs, secs, cpu = [], [], []
        for seed in seeds:
            t0, c0 = time.perf_counter(), time.process_time()
            ck = train_checkpoint(model, "mnist5k", seed=seed, epochs=1 if args.quick else 15)
            secs.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            accs.append(ck.metrics["accuracy"])
            print(f"{model} seed {seed}: {accs[-1]:.2f}% in {secs[-1]:.1f} s "
                  f"({cpu[-1]:.1f} s CPU)", flush=True)
        data[model] = {"seeds": seeds, "accuracy": accs, "seconds": secs, "cpu_seconds": cpu}
        rows.append(f"| {model} | {len(seeds)} | {fmt(accs)} | {fmt(secs, 1)} | "
                    f"{fmt(cpu, 1)} |")
    write_json("training", {"torch_threads": torch.get_num_threads(), "models": data})
    md = ["## Training (foundation)", "",
          "Default training (`xaicompress train`: Adam 3e-3, cosine schedule, 15 epochs, "
          "batch 64, random shifts of up to 2 px) on mnist5k (4,000 train / 1,000 test), "
          f"measured by `benchmarks/training.py` with {torch.get_num_threads()} CPU threads.",
          "", "| model | seeds | test accuracy % | wall time s | CPU time s |",
          "|---|---|---|---|---|", *rows, "",
          "Wall time depends on what else the machine runs; CPU time (both threads) is the "
          "steadier figure of the work done."]
    write_section("training", "\n".join(md))


if __name__ == "__main__":
    main()
