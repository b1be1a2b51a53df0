"""`compare`: the same tiny pipeline per criterion and seed, baseline trained once."""

import json

import pytest
import yaml

TINY = {
    "model": "lenet5", "data": "mnist5k", "seed": 0,
    "train": {"epochs": 0.5},
    "stages": [
        {"type": "prune_structured", "criterion": "deeplift", "ratio": 0.5, "scope": "layer",
         "finetune_epochs": 0.2, "samples": 64},
        {"type": "share", "criterion": "deeplift", "clusters": 8, "finetune_epochs": 0,
         "samples": 64},
    ],
    "export": {"onnx": False},
    "report": {"fidelity_samples": 32, "heatmaps": 0, "latency_repeats": 1},
}


@pytest.mark.slow
def test_compare_two_criteria_one_seed(tmp_path, run_cli):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "cmp"
    code, stdout, err = run_cli("compare", "--config", cfg, "--criteria", "deeplift,l1",
                                "--seeds", "0", "--out", out)
    assert code == 0, err
    assert "deeplift" in stdout and "l1" in stdout and "±" in stdout
    for name in ("compare.json", "compare.md", "compare.png"):
        assert (out / name).is_file(), name
    res = json.loads((out / "compare.json").read_text())
    assert res["criteria"] == ["deeplift", "l1"] and res["seeds"] == [0]
    runs = {r["criterion"]: r for r in res["runs"]}
    # one baseline for the seed: trained for the first criterion, cached for the second
    assert runs["deeplift"]["cached"][0] is False and runs["l1"]["cached"][0] is True
    assert runs["deeplift"]["baseline"] == runs["l1"]["baseline"]
    # the criterion really changed what was pruned / shared
    assert (out / runs["l1"]["folder"] / "report.json").is_file()
    rep = json.loads((out / runs["l1"]["folder"] / "report.json").read_text())
    assert {s["criterion"] for s in rep["stages"]} == {"l1"}
    for crit in ("deeplift", "l1"):
        s = res["summary"][crit]
        assert s["accuracy"]["n"] == 1 and s["accuracy"]["std"] == 0
        assert s["compression_ratio"]["mean"] > 5
        assert len(res["curves"][crit]) == 3  # baseline + 2 stages
    md = (out / "compare.md").read_text()
    assert "| deeplift |" in md and "| l1 |" in md and "±" in md
    # rerun: everything from the cache
    code, _, err = run_cli("compare", "--config", cfg, "--criteria", "deeplift,l1",
                           "--seeds", "0", "--out", out)
    assert code == 0, err
    res2 = json.loads((out / "compare.json").read_text())
    assert all(all(r["cached"]) for r in res2["runs"])
    assert res2["summary"] == res["summary"]


def test_compare_bad_options(tmp_path, run_cli):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    for args, needle in ((("--criteria", "deeplift,nonsense"), "nonsense"),
                         (("--seeds", "0,x"), "--seeds"),
                         (("--seeds", "1,1"), "twice"),
                         (("--criteria", ""), "--criteria")):
        code, _, err = run_cli("compare", "--config", cfg, "--out", tmp_path / "o", *args)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
