"""What the least-squares refit of unstructured pruning costs on a real-size network.

`prune_unstructured` refits the kept weights of every masked layer by default when it does
not fine-tune (`calibration.refit_masked_layers`). On a user's torchvision resnet18 at
224 x 224 that is 21 layers, three of them with 4,608 inputs per output unit. This script
masks --ratio of every Conv2d / Linear weight by magnitude (an untrained network and random
images: the cost does not depend on training), refits them from --samples images, and
prints each layer's seconds, the time in the solves (exact Cholesky or conjugate
gradients) against the rest (forward passes to the layer, its rows and Gram matrix), and
the whole refit in units of one forward pass of the same images, timed in the same run.

    python benchmarks/refit_cost.py [--res 224] [--samples 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import add_seeds
from torch.utils.data import TensorDataset

from xaicompress import calibration
from xaicompress.checkpoint import Checkpoint
from xaicompress.models.vision_import import import_torchvision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet18", help="a torchvision classifier name")
    ap.add_argument("--res", type=int, default=224, help="input height and width")
    ap.add_argument("--samples", type=int, default=calibration.RECONSTRUCT_SAMPLES)
    ap.add_argument("--ratio", type=float, default=0.7, help="weights masked per layer")
    ap.add_argument("--threads", type=int, default=2)
    add_seeds(ap, default="0", flag="--seed")
    args = ap.parse_args()
    seed = args.seed[0]
    torch.set_num_threads(args.threads)
    torch.manual_seed(seed)
    model = import_torchvision().models.get_model(args.model, weights=None,
                                                  num_classes=10).eval()
    x = torch.randn(args.samples, 3, args.res, args.res)
    data = TensorDataset(x, torch.randint(0, 10, (args.samples,)))
    reference = Checkpoint(model, None, None).copy().model
    masks = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                k = max(1, int(args.ratio * m.weight.numel()))
                masks[name] = m.weight.abs() > m.weight.abs().flatten().kthvalue(k).values
                m.weight.mul_(masks[name])

    t = time.perf_counter()
    with torch.no_grad():
        for i in range(0, args.samples, 128):
            reference(x[i:i + 128])
    forward = time.perf_counter() - t

    # timing wrappers around the module's own functions (looked up by name at call time)
    per_layer: dict[int, float] = {}
    solves = {"s": 0.0}
    refit, solve = calibration._refit, calibration._solve_masked_into

    def timed_refit(m, layer, *a, **kw):
        t0 = time.perf_counter()
        refit(m, layer, *a, **kw)
        per_layer[id(layer)] = time.perf_counter() - t0

    def timed_solve(*a, **kw):
        t0 = time.perf_counter()
        solve(*a, **kw)
        solves["s"] += time.perf_counter() - t0

    calibration._refit, calibration._solve_masked_into = timed_refit, timed_solve
    try:
        t = time.perf_counter()
        done = calibration.refit_masked_layers(model, reference, data, masks,
                                               samples=args.samples, seed=seed)
        total = time.perf_counter() - t
    finally:
        calibration._refit, calibration._solve_masked_into = refit, solve
    modules = dict(model.named_modules())
    print(f"{args.model} at {args.res}x{args.res}, {args.samples} images, ratio {args.ratio}, "
          f"{args.threads} threads")
    for name in done:
        m = modules[name]
        solver = ("cg" if float((masks[name].reshape(len(m.weight), -1).sum(1).double() ** 3)
                                .sum()) / 3 > calibration.EXACT_FLOPS
                  and getattr(m, "groups", 1) == 1 else "exact")
        print(f"  {name:24s} inputs {m.weight[0].numel():5d}  {solver:5s} "
              f"{per_layer[id(m)]:6.1f} s")
    print(f"refit of {len(done)} layers: {total:.1f} s = {total / forward:.1f} forward passes "
          f"of the {args.samples} images ({forward:.1f} s); solves {solves['s']:.1f} s, the "
          f"rest (forward passes to each layer, rows, Gram) {total - solves['s']:.1f} s")


if __name__ == "__main__":
    main()
