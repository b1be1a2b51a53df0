"""The validation split, the post-training mode and the accuracy budget of `compress`."""

from __future__ import annotations

import json
from itertools import pairwise

import numpy as np
import pytest
import yaml

from xaicompress.data import load_dataset
from xaicompress.data.holdout import calibration_bundle, carve_validation, dataset_labels
from xaicompress.errors import XaiCompressError
from xaicompress.pipeline import run_pipeline, validate_config
from xaicompress.pipeline.budget import (
    CLUSTER_GRID,
    MARGIN,
    Strength,
    bisect_strength,
    paired_drop,
    stage_floors,
    strength_of,
)


# ------------------------------------------------------------------ validation split
def test_validation_is_carved_stratified_disjoint_and_fixed():
    b = load_dataset("digits")
    c = carve_validation(b, 0.1)
    n = len(b.train)
    assert len(c.val) == round(0.1 * n) and len(c.train) + len(c.val) == n
    assert set(c.train.indices).isdisjoint(c.val.indices)
    full = np.bincount(dataset_labels(b.train)) / n
    val = np.bincount(dataset_labels(c.val), minlength=len(full)) / len(c.val)
    assert np.abs(full - val).max() < 0.02  # stratified
    assert carve_validation(b, 0.1).val.indices == c.val.indices  # same carve every run
    assert c.test is b.test and c.mean == b.mean
    with pytest.raises(XaiCompressError, match="val"):
        carve_validation(b, 1.0)


def test_calibration_bundle_reads_only_n_training_images():
    b = carve_validation(load_dataset("digits"))
    cb = calibration_bundle(b, 100, seed=3)
    assert len(cb.train) == 100 and cb.val is b.val and cb.test is b.test


# ------------------------------------------------------------------ bisection
def test_bisection_finds_the_strongest_passing_ratio():
    s = Strength("ratio", 0.0, 0.9)
    calls = []

    def probe(v):  # accuracy falls with the ratio, passing up to 0.62
        calls.append(v)
        return (99.0 if v <= 0.62 else 90.0), 0.0, int(1000 * (1 - v)), False

    r = bisect_strength(s, 0.5, 95.0, probe)
    assert calls[0] == 0.5 and r.chosen is not None
    assert 0.62 - 0.9 / 16 <= r.chosen <= 0.62
    assert len(calls) <= 6 and all(p.passed == (p.value <= 0.62) for p in r.probes)


def test_grid_search_chooses_the_smallest_passing_file():
    s = strength_of(validate_config({"model": "lenet5", "stages": [
        {"type": "share", "clusters": 16}]}).stages[0])
    assert s.field == "clusters" and s.grid == CLUSTER_GRID

    def probe(k):
        return (98.0 if k >= 8 else 80.0), 0.0, 100 * k, False

    r = bisect_strength(s, 16, 97.0, probe)
    assert r.chosen == 8


def test_nothing_passes_then_the_weakest_is_tried_and_the_stage_left_out():
    s = Strength("avg_bits", 8.0, 2.0)
    seen = []
    r = bisect_strength(s, 4, 99.0, lambda v: (seen.append(v) or 50.0, 0.0, 10, False))
    assert 8.0 in seen and r.chosen is None


def test_a_saturated_stage_is_not_bisected_through_identical_files():
    # entropy sharing at 2.5 bits and above gives one file (the codebooks need no more):
    # once two failing probes gave the same file, settings between them are not run
    s = Strength("avg_bits", 4.0, 0.5)
    seen = []

    def probe(v):
        seen.append(v)
        return (97.0 if v > 2.5 else 90.0), 0.0, (4639 if v > 2.5 else int(1000 * v)), False

    r = bisect_strength(s, 2.7, 98.0, probe)
    assert r.chosen is None and len(seen) == 3 and seen[-1] == 4.0  # start, one more, weakest
    assert len({p.size_bytes for p in r.probes if p.value > 2.5}) == 1


def test_a_size_budget_of_entropy_sharing_is_searched_as_coded_bits():
    from xaicompress.pipeline import load_config
    from xaicompress.pipeline.run import _with_value

    share = load_config("configs/lenet5-mnist.yaml").stages[2]
    assert share.size_kb is not None and strength_of(share).field == "avg_bits"
    probe = _with_value(share, 1.5)  # once failed validation: both budgets set
    assert probe.avg_bits == 1.5 and probe.size_kb is None


def test_paired_drop_counts_only_the_images_the_two_disagree_on():
    import torch

    base = torch.tensor([True] * 396 + [False] * 4)
    same = base.clone()
    assert paired_drop(base, same) == (0.0, 0.0)
    probe = base.clone()
    probe[:3] = False  # 3 images lost, 1 gained: drop 2 images of 400 = 0.5 pt
    probe[396] = True
    drop, se = paired_drop(base, probe)
    d = torch.zeros(400, dtype=torch.float64)
    d[:3], d[396] = 1.0, -1.0
    assert drop == pytest.approx(0.5) and se == pytest.approx(float(d.std()) / 20 * 100)
    assert se == pytest.approx(0.5, abs=1e-3)  # sqrt((4 - 400 * 0.005**2) / 399) / 20
    with pytest.raises(ValueError, match="equal"):
        paired_drop(base, probe[:10])


def test_the_margin_refuses_a_drop_within_budget_by_luck():
    """A probe 0.25 pt below the baseline keeps a 0.5 pt budget as measured, but its drop
    plus `MARGIN` standard errors (0.5 pt: it disagrees with the baseline on many images)
    does not: refused, and the weaker probe that is also sure enough is chosen."""
    s = Strength("ratio", 0.0, 0.9)
    base = 98.0

    def probe(v):  # ratio <= 0.3: 0.1 pt below, SE 0.1; stronger: 0.25 pt below, SE 0.5
        return (base - 0.1, 0.1, 1000 - int(1000 * v), False) if v <= 0.3 else \
            (base - 0.25, 0.5, 1000 - int(1000 * v), False)

    plain = bisect_strength(s, 0.6, base - 0.5, probe, margin=0.0, bound=base - 0.5)
    assert plain.chosen is not None and plain.chosen > 0.3  # the lucky probe is kept
    sure = bisect_strength(s, 0.6, base - 0.5, probe, bound=base - 0.5)
    assert sure.margin == MARGIN and 0.25 + MARGIN * 0.5 > 0.5  # refused by the margin only
    assert not [p for p in sure.probes if p.value > 0.3 and p.passed]
    assert sure.chosen is not None and sure.chosen <= 0.3
    rec = sure.as_dict()
    assert rec["bound"] == base - 0.5 and rec["probes"][0]["drop_se"] == 0.5


def test_margin_is_declared_once_and_a_budget_gets_a_larger_validation_split():
    import inspect

    from xaicompress.data.holdout import BUDGET_VAL_FRACTION, VAL_FRACTION
    from xaicompress.pipeline.config import RunOptions, TargetConfig

    assert TargetConfig(max_drop=0.5).margin == MARGIN
    assert inspect.signature(bisect_strength).parameters["margin"].default == MARGIN
    assert RunOptions.model_fields["margin"].description == \
        TargetConfig.model_fields["margin"].description
    assert validate_config({"model": "lenet5"}).val == VAL_FRACTION
    budget = validate_config({"model": "lenet5", "target": {"max_drop": 0.5}})
    assert budget.val == BUDGET_VAL_FRACTION and BUDGET_VAL_FRACTION > VAL_FRACTION
    assert validate_config({"model": "lenet5", "val": 0.3,
                            "target": {"max_drop": 0.5}}).val == 0.3
    cli = validate_config({"model": "lenet5"}).with_run_options(
        RunOptions(max_drop=0.5, margin=1.0))
    assert cli.target.margin == 1.0 and cli.val == BUDGET_VAL_FRACTION
    with pytest.raises(XaiCompressError, match="--margin: applies to an accuracy budget"):
        validate_config({"model": "lenet5"}).with_run_options(RunOptions(margin=1.0))
    with pytest.raises(XaiCompressError, match="margin"):
        validate_config({"model": "lenet5", "target": {"max_drop": 0.5, "margin": -1}})


def test_a_stage_that_keeps_the_budget_nowhere_backs_the_one_before_off():
    """The last searched stage's weaker passing probe is taken next (a larger file), once
    per call, and the report record says so; no weaker probe passed: halfway to the
    weakest setting, then the weakest; nothing weaker left: no back-off."""
    from xaicompress.pipeline.budget import Probe, SearchResult
    from xaicompress.pipeline.config import PruneUnstructuredStage
    from xaicompress.pipeline.run import _Searched

    stage = PruneUnstructuredStage(type="prune_unstructured", ratio=0.9)
    res = SearchResult("ratio", 97.0, [Probe(0.8, 97.5, 300, True), Probe(0.9, 97.1, 200, True),
                                       Probe(0.95, 96.0, 100, False), Probe(0.5, 98.0, 500, True)],
                       chosen=0.9)
    record = {"chosen": 0.9}
    prev = _Searched(1, stage, "key", None, res, record)
    assert prev.weaker() and res.chosen == 0.8 and record == {"chosen": 0.8, "backed_off": 1}
    assert prev.weaker() and res.chosen == 0.5 and record["backed_off"] == 2
    halves = []
    while prev.weaker():
        halves.append(res.chosen)
    assert halves[0] == pytest.approx(0.25, abs=0.01) and halves[-1] == 0.0
    assert all(a > b for a, b in pairwise(halves)) and len(halves) <= 8
    assert record["backed_off"] == 2 + len(halves) and res.chosen == 0.0


def test_floors_spend_the_budget_evenly_over_searched_stages():
    cfg = validate_config({"model": "lenet5", "stages": [
        {"type": "prune_structured"}, {"type": "finetune"}, {"type": "quantize",
                                                               "avg_bits": 4}]})
    assert stage_floors(98.0, 0.5, list(cfg.stages)) == [97.75, None, 97.5]


def test_a_target_needs_a_validation_split():
    with pytest.raises(XaiCompressError, match="val > 0"):
        validate_config({"model": "lenet5", "val": 0, "target": {"max_drop": 0.5}})
    with pytest.raises(XaiCompressError, match="max_drop"):
        validate_config({"model": "lenet5", "target": {"max_drop": 0}})


# ------------------------------------------------------------------ end to end
TINY = {
    "model": "lenet5", "data": "digits", "seed": 0, "train": {"epochs": 2},
    "stages": [{"type": "quantize", "criterion": "none", "avg_bits": 4, "samples": 64}],
    "export": {"onnx": False},
    "report": {"fidelity": False, "heatmaps": 0, "latency_repeats": 1},
}


@pytest.mark.slow
def test_post_training_stages_read_only_the_calibration_images(tmp_path, monkeypatch):
    from xaicompress.pipeline import run as run_mod

    seen = []
    real = run_mod.run_stage

    def spy(ckpt, bundle, st, seed):
        seen.append((st.type, len(bundle.train)))
        return real(ckpt, bundle, st, seed)

    monkeypatch.setattr(run_mod, "run_stage", spy)
    cfg = validate_config({**TINY, "calibration": 100, "stages": [
        *TINY["stages"], {"type": "finetune", "epochs": 0.1}]})
    res = run_pipeline(cfg, tmp_path / "out", plots=False)
    n_train = round(0.9 * 1437)
    assert seen == [("quantize", 100), ("finetune", n_train)]
    assert res.report["baseline"]["val_accuracy"] > 0
    assert all(s["val_accuracy"] is not None for s in res.report["stages"])


@pytest.mark.slow
def test_compress_max_drop_searches_keeps_the_budget_and_reuses_the_cache(tmp_path, run_cli):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    code, _, err = run_cli("compress", "--config", cfg, "--out", out, "--max-drop", "1")
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    (search,) = rep["search"]
    assert rep["target"]["max_drop"] == 1.0 and search["field"] == "avg_bits"
    assert search["probes"][0]["value"] == 4.0 and len(search["probes"]) >= 3
    chosen = search["chosen"]
    assert chosen is not None and rep["config"]["stages"][0]["avg_bits"] == 4
    # the final model is the chosen probe, within the floor on validation
    final_val = rep["final"]["val_accuracy"]
    assert final_val >= search["floor"] - 1e-3
    assert search["floor"] == pytest.approx(rep["baseline"]["val_accuracy"] - 1.0, abs=1e-3)
    assert (out / "search.png").is_file() and "## Accuracy budget" in (
        out / "report.md").read_text()
    passing = [p for p in search["probes"] if p["passed"]]
    assert rep["final"]["size_bytes"] == min(p["size_bytes"] for p in passing)
    # a rerun probes nothing again and gives the same model
    code, _, err = run_cli("compress", "--config", cfg, "--out", out, "--max-drop", "1",
                           "--json")
    assert code == 0, err
    again = json.loads((out / "report.json").read_text())
    assert all(p["cached"] for p in again["search"][0]["probes"])
    assert again["final"] == {**again["final"], "size_bytes": rep["final"]["size_bytes"],
                              "accuracy": rep["final"]["accuracy"]}


@pytest.mark.parametrize("args, match", [
    (["--max-drop", "0"], "--max-drop"),
    (["--calibration", "2000"], "--calibration"),
    (["--val", "0.9"], "--val"),
    (["--max-drop", "1", "--margin", "-1"], "--margin"),
    (["--margin", "1"], "--margin"),
])
def test_run_option_errors_name_the_flag(tmp_path, run_cli, args, match):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    code, _, err = run_cli("compress", "--config", cfg, "--out", tmp_path / "o", *args)
    assert code == 2 and match in err and "Traceback" not in err


def test_a_stage_left_out_by_the_margin_says_how_to_let_it_in():
    from xaicompress.pipeline.budget import Probe, SearchResult
    from xaicompress.pipeline.run import _margin_note

    # the weakest share loses 0.125 pt (floor 97.25 kept) but 0.45 pt of standard error
    # leaves no room in a 0.5 pt budget on 800 images
    held = SearchResult("avg_bits", 97.25, [Probe(2.25, 97.625, 9431, False, drop_se=0.45)],
                        bound=97.25, margin=1.0)
    note = _margin_note(held, 800)
    assert "avg_bits=2.25 it kept its floor" in note and "800 validation images" in note
    assert "(0.45 pt)" in note and "`val`" in note and "`margin`" in note
    short = SearchResult("avg_bits", 97.25, [Probe(2.25, 96.0, 9431, False, drop_se=0.45)],
                         bound=97.25, margin=1.0)
    assert _margin_note(short, 800) == ""  # the floor itself failed: nothing to suggest


@pytest.mark.slow
def test_a_stage_left_out_makes_an_earlier_stage_back_off(tmp_path, monkeypatch):
    """Quantization costs 0.45 pt at any setting and keeps a 0.6 pt budget only when
    structured pruning (0.4 pt per unit of ratio) stays at or below 0.375; unstructured
    pruning (free) backing off cannot make room, so structured pruning backs off (cached
    probes first) and the stages after it are searched again, until quantization fits.
    Stages are stand-ins (run_stage records its option; accuracy and size follow from
    them), the search is the real one."""
    from xaicompress.pipeline import run as run_mod

    def fake_stage(ckpt, bundle, st, seed):
        new = ckpt.copy()
        value = st.avg_bits if st.type == "quantize" else st.ratio
        new.history.append({"fake": st.type, "value": value})
        new.model._fake = list(new.history)
        return new

    def effect(history):
        drop, size = 0.0, 10_000.0
        for h in history:
            if h.get("fake") == "prune_structured":
                drop, size = drop + 0.4 * h["value"], size * (1 - h["value"])
            elif h.get("fake") == "prune_unstructured":
                size *= 1 - 0.9 * h["value"]
            elif h.get("fake") == "quantize":
                drop, size = drop + 0.45, size * h["value"] / 32
        return drop, int(size)

    def drop_of(self, model):
        return self.baseline.metrics["val_accuracy"] - effect(model._fake)[0], 0.0

    monkeypatch.setattr(run_mod, "run_stage", fake_stage)
    monkeypatch.setattr(run_mod._StageRun, "drop_of", drop_of)
    monkeypatch.setattr(run_mod, "packed_size", lambda ckpt: effect(ckpt.history)[1])
    cfg = validate_config({**TINY, "train": {"epochs": 1},
                           "target": {"max_drop": 0.6, "margin": 0}, "stages": [
        {"type": "prune_structured", "ratio": 0.6},
        {"type": "prune_unstructured", "ratio": 0.8},
        {"type": "quantize", "criterion": "none", "avg_bits": 4, "samples": 64}]})
    res = run_pipeline(cfg, tmp_path / "out", plots=False)
    search = res.report["search"]
    assert [s["stage"] for s in search] == [0, 1, 2]
    structured, _, quant = search
    assert quant["chosen"] is not None and structured["chosen"] <= 0.375
    assert structured["backed_off"] >= 1
    kinds = [h["fake"] for h in res.final.history if "fake" in h]
    assert kinds == ["prune_structured", "prune_unstructured", "quantize"]
    assert effect(res.final.history)[0] <= 0.6 + 1e-9
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"| {structured['chosen']:g} | - | - | - | backed off" in md
