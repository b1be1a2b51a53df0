"""The MILP bit-allocation solver against brute force, and its budget helpers."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xaicompress.errors import XaiCompressError
from xaicompress.quant.allocate import allocate_bits, budget_from_avg_bits, budget_from_size_kb


def _brute(errors, costs, budget):
    names = list(errors)
    best = None
    for combo in itertools.product(*[sorted(errors[n]) for n in names]):
        c = sum(costs[n][b] for n, b in zip(names, combo, strict=True))
        if c > budget:
            continue
        e = sum(errors[n][b] for n, b in zip(names, combo, strict=True))
        if best is None or e < best:
            best = e
    return best


@st.composite
def _instances(draw):
    n_layers = draw(st.integers(1, 4))
    errors, costs = {}, {}
    for i in range(n_layers):
        bits = draw(st.lists(st.integers(2, 8), min_size=1, max_size=4, unique=True))
        params = draw(st.integers(1, 500))
        errors[f"l{i}"] = {b: draw(st.floats(0, 100, allow_nan=False)) for b in bits}
        costs[f"l{i}"] = {b: float(params * b) for b in bits}
    lo = sum(min(c.values()) for c in costs.values())
    hi = sum(max(c.values()) for c in costs.values())
    budget = draw(st.floats(lo, hi + 10))
    return errors, costs, budget


@settings(max_examples=150, deadline=None)
@given(_instances())
def test_milp_matches_brute_force(inst):
    errors, costs, budget = inst
    chosen = allocate_bits(errors, costs, budget)
    assert set(chosen) == set(errors)
    assert sum(costs[n][b] for n, b in chosen.items()) <= budget + 1e-9
    got = sum(errors[n][b] for n, b in chosen.items())
    # HiGHS proves optimality to its absolute gap of 1e-6 on the normalised objective.
    assert got <= _brute(errors, costs, budget) + 1e-5 * (1 + max(
        max(e.values()) for e in errors.values()))


def test_tiny_errors_still_solved_exactly():
    # Squared quantization errors are often ~1e-9; HiGHS' absolute gap must not swallow them.
    errors = {"a": {2: 4e-9, 4: 1e-9, 8: 0.0}, "b": {2: 9e-9, 4: 2e-9, 8: 0.0}}
    costs = {"a": {2: 200.0, 4: 400.0, 8: 800.0}, "b": {2: 100.0, 4: 200.0, 8: 400.0}}
    # a4+b4 (3e-9) beats a2+b8 (4e-9) at the same cost; a gap of 1e-6 would not see it.
    assert allocate_bits(errors, costs, 700.0) == {"a": 4, "b": 4}


def test_more_budget_goes_where_the_error_is():
    errors = {"big": {2: 1.0, 8: 0.9}, "small": {2: 50.0, 8: 0.0}}
    costs = {"big": {2: 2000.0, 8: 8000.0}, "small": {2: 20.0, 8: 80.0}}
    assert allocate_bits(errors, costs, 2100.0) == {"big": 2, "small": 8}
    assert allocate_bits(errors, costs, 1e9) == {"big": 8, "small": 8}


def test_infeasible_budget_names_budget_and_smallest_size():
    errors = {"a": {2: 1.0, 4: 0.5}}
    costs = {"a": {2: 20.0, 4: 40.0}}
    with pytest.raises(XaiCompressError, match=r"budget 10 .*smallest feasible size is 20"):
        allocate_bits(errors, costs, 10.0)
    assert allocate_bits(errors, costs, 20.0) == {"a": 2}


def test_malformed_tables_are_user_errors():
    with pytest.raises(XaiCompressError, match="different layers"):
        allocate_bits({"a": {2: 1.0}}, {"b": {2: 1.0}}, 10)
    with pytest.raises(XaiCompressError, match="costs for"):
        allocate_bits({"a": {2: 1.0}}, {"a": {4: 1.0}}, 10)
    with pytest.raises(XaiCompressError, match="finite"):
        allocate_bits({"a": {2: float("nan")}}, {"a": {2: 1.0}}, 10)
    assert allocate_bits({}, {}, 0.0) == {}


def test_budget_helpers():
    assert budget_from_avg_bits({"a": 100, "b": 300}, 4) == 1600.0
    assert budget_from_size_kb(2, fixed_bytes=48) == (2048 - 48) * 8
    with pytest.raises(XaiCompressError, match="--avg-bits"):
        budget_from_avg_bits({"a": 1}, 0)
    with pytest.raises(XaiCompressError, match="--size-kb .*too small"):
        budget_from_size_kb(1, fixed_bytes=4096)
