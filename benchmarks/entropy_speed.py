"""CPU time of the share stage, entropy-constrained (the shipped lenet5 config's) vs nearest
k-means with the MILP allocation (the previous config's, avg_bits 3.5), on the same pruned
LeNet-5 from the entropy benchmark's stage cache; one thread, process time (steadier than
wall time on a shared machine), median of 3 interleaved repeats; no fine-tuning (the same
for both). Appends a paragraph to docs/results/entropy.md's data in
benchmarks/results/entropy_speed.json.

    python benchmarks/entropy_speed.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, write_json  # noqa: E402


def _pruned_lenet5() -> Path:
    from xaicompress.checkpoint import load_checkpoint

    for p in sorted((RESULTS / "cache" / "entropy").glob("02-*.safetensors")):
        ck = load_checkpoint(p)
        if ck.spec.name == "lenet5" and ck.data == "mnist5k" and \
                ck.history[-1]["stage"] == "prune_unstructured":
            return p
    raise SystemExit("run benchmarks/entropy.py first (no pruned lenet5 in its cache)")


def main() -> None:
    import torch

    from xaicompress.checkpoint import load_checkpoint
    from xaicompress.data import load_dataset
    from xaicompress.quant.codebook import share_weights
    from xaicompress.relevance import compute_relevance, get_criterion

    torch.set_num_threads(1)
    ck = load_checkpoint(_pruned_lenet5())
    bundle = load_dataset("mnist5k")
    crit = get_criterion("deeplift")
    rel = compute_relevance(ck.model, crit, bundle, samples=512, seed=0)
    variants = {"entropy (avg_bits 0.9, weight_power 1)": dict(
        avg_bits=0.9, assignment="entropy", weight_power=1.0),
        "nearest + MILP (avg_bits 3.5)": dict(avg_bits=3.5)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(3):
        for name, kw in variants.items():
            t = time.process_time()
            share_weights(ck, crit, bundle, relevance=rel, **kw)
            times[name].append(time.process_time() - t)
    out = {k: sorted(v)[1] for k, v in times.items()}
    write_json("entropy_speed", {"cpu_seconds_median": out, "all": times})
    print(out)


if __name__ == "__main__":
    main()
