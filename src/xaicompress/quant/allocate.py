"""Bit allocation: choose one option (bit width, cluster count, ...) per layer under a budget.

A multiple-choice knapsack solved exactly as a mixed-integer linear program with
`scipy.optimize.milp` (HiGHS), as HAWQ-V3 does with its Hessian-based ILP:

    minimise   sum_{l,b} errors[l][b] * x[l,b]
    subject to sum_b x[l,b] = 1                      for every layer l
               sum_{l,b} costs[l][b] * x[l,b] <= budget
               x[l,b] in {0, 1}

The solver knows nothing about quantization: the integer quantizer (bits) and weight sharing
(clusters) both feed it their own error and cost tables.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator, Mapping

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from xaicompress.errors import XaiCompressError

#: Relative slack on the budget: HiGHS accepts solutions that break a constraint by its
#: feasibility tolerance, so a result is re-checked against the exact budget.
_BUDGET_RTOL = 1e-9


def allocate_bits(errors: Mapping[str, Mapping[int, float]],
                  costs: Mapping[str, Mapping[int, float]],
                  budget: float) -> dict[str, int]:
    """Pick one choice per layer minimising the summed error with summed cost <= budget.

    errors: layer -> {choice (e.g. bits) -> error of the layer quantized that way}.
    costs:  layer -> {choice -> cost (e.g. bits of storage)}; same layers and choices.
    budget: the most the summed cost may be (same unit as the costs).
    Returns layer -> chosen choice, in the order of `errors`. The optimum is exact (zero MIP
    gap); ties are broken deterministically by HiGHS.
    Raises XaiCompressError when the tables are malformed or the budget is below the
    smallest feasible total cost (the message names both).
    """
    layers, choices, err, cost = _flatten(errors, costs)
    if not layers:
        return {}
    if not math.isfinite(budget):
        raise XaiCompressError(f"budget {budget!r}: expected a finite number")
    smallest = sum(min(costs[name][c] for c in choices[i]) for i, name in enumerate(layers))
    if budget < smallest * (1 - _BUDGET_RTOL) - 1e-12:
        raise XaiCompressError(f"budget {budget:.6g} is infeasible: the smallest feasible "
                               f"size is {smallest:.6g} (every layer at its cheapest choice)")

    # Why normalise: HiGHS stops at an absolute MIP gap of 1e-6, which on raw squared errors
    # (often ~1e-6 themselves) would stop at the first incumbent. Subtracting each layer's
    # smallest error does not change the argmin (exactly one choice per layer).
    offsets = np.repeat([min(errors[n][c] for c in choices[i]) for i, n in enumerate(layers)],
                        [len(c) for c in choices])
    obj = err - offsets
    span = float(obj.max()) if obj.size else 0.0
    obj = obj / span if span > 0 else obj
    cost_scale = max(abs(budget), float(np.abs(cost).max()), 1e-30)

    n_vars = len(err)
    owner = np.repeat(np.arange(len(layers)), [len(c) for c in choices])
    one_each = np.zeros((len(layers), n_vars))
    one_each[owner, np.arange(n_vars)] = 1.0
    limit = budget
    for _attempt in range(4):
        with _quiet_native_output():
            res = milp(
                c=obj,
                integrality=np.ones(n_vars),
                bounds=Bounds(0, 1),
                constraints=[LinearConstraint(one_each, 1, 1),
                             LinearConstraint((cost / cost_scale)[None, :], -np.inf,
                                              limit / cost_scale)],
                options={"mip_rel_gap": 0.0, "presolve": True, "disp": False},
            )
        if res.x is None:
            # Only reachable when the tolerance-tightened limit drops below the cheapest choice.
            break
        picks = np.round(res.x).astype(bool)
        chosen = {}
        total = 0.0
        for i, name in enumerate(layers):
            idx = np.flatnonzero(picks[owner == i])
            if len(idx) != 1:
                raise RuntimeError(f"MILP returned {len(idx)} choices for layer {name!r}")
            c = choices[i][int(idx[0])]
            chosen[name] = c
            total += costs[name][c]
        if total <= budget * (1 + _BUDGET_RTOL) + 1e-12:
            return chosen
        # HiGHS broke the budget within its feasibility tolerance: tighten and solve again.
        limit -= (total - budget) + 1e-7 * cost_scale
    # Fall back to the cheapest choices, which are feasible by the check above.
    return {name: min(choices[i], key=lambda c, n=name: (costs[n][c], errors[n][c]))
            for i, name in enumerate(layers)}


@contextlib.contextmanager
def _quiet_native_output() -> Iterator[None]:
    """Silence what the solver's C++ code prints itself (HiGHS writes debug lines such as
    `HighsMipSolverData::...` straight to file descriptors 1 and 2, past `disp=False`), so
    they never land in the middle of a command's output."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no real descriptors (an embedding host): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _flatten(errors: Mapping[str, Mapping[int, float]],
             costs: Mapping[str, Mapping[int, float]]
             ) -> tuple[list[str], list[list[int]], np.ndarray, np.ndarray]:
    if set(errors) != set(costs):
        missing = sorted(set(errors) ^ set(costs))
        raise XaiCompressError(f"bit allocation: errors and costs name different layers "
                               f"({missing[:3]})")
    layers = list(errors)
    choices: list[list[int]] = []
    err: list[float] = []
    cost: list[float] = []
    for name in layers:
        opts = sorted(errors[name])
        if not opts:
            raise XaiCompressError(f"bit allocation: layer {name!r} has no choices")
        if set(opts) != set(costs[name]):
            raise XaiCompressError(f"bit allocation: layer {name!r} has errors for {opts} but "
                                   f"costs for {sorted(costs[name])}")
        for c in opts:
            e, k = float(errors[name][c]), float(costs[name][c])
            if not (math.isfinite(e) and math.isfinite(k)) or k < 0:
                raise XaiCompressError(f"bit allocation: layer {name!r} choice {c}: error {e} "
                                       f"and cost {k} must be finite, cost >= 0")
            err.append(e)
            cost.append(k)
        choices.append(opts)
    return layers, choices, np.asarray(err, dtype=np.float64), np.asarray(cost, dtype=np.float64)


def budget_from_avg_bits(params_per_layer: Mapping[str, int], avg_bits: float) -> float:
    """The budget in bits for an average of `avg_bits` bits per weight over these layers."""
    if not math.isfinite(avg_bits) or avg_bits <= 0:
        raise XaiCompressError(f"--avg-bits {avg_bits}: expected a positive number of bits")
    return float(avg_bits) * float(sum(int(n) for n in params_per_layer.values()))


def budget_from_size_kb(size_kb: float, fixed_bytes: float = 0.0) -> float:
    """The budget in bits left for the quantized weights of a model of `size_kb` KiB.

    fixed_bytes: what the file needs regardless of the allocation (biases, norms, scales,
    headers). 1 KB = 1024 bytes.
    """
    if not math.isfinite(size_kb) or size_kb <= 0:
        raise XaiCompressError(f"--size-kb {size_kb}: expected a positive size in KiB")
    left = float(size_kb) * 1024.0 - float(fixed_bytes)
    if left <= 0:
        raise XaiCompressError(f"--size-kb {size_kb}: too small, the parts of the model that "
                               f"are not quantized already take {fixed_bytes / 1024:.2f} KiB")
    return left * 8.0
