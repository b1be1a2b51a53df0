"""End to end: a tiny `compress` on mnist5k writes every file, the packed file and ONNX
reproduce the final model, a rerun comes from the cache with identical numbers, and an
interrupted run resumes to the same result."""

import json
import math
import shutil
import time

import pytest
import torch
import yaml

from xaicompress.checkpoint import load_checkpoint
from xaicompress.data import dataset_tensors, load_dataset
from xaicompress.errors import XaiCompressError
from xaicompress.pipeline import STAGES, run_pipeline, validate_config
from xaicompress.pipeline.stages import StageDef

TINY = {
    "model": "lenet5", "data": "mnist5k", "seed": 0,
    "train": {"epochs": 1},
    "stages": [
        {"type": "prune_structured", "criterion": "deeplift", "ratio": 0.5, "scope": "layer",
         "finetune_epochs": 0.25, "samples": 64},
        {"type": "prune_unstructured", "criterion": "deeplift", "ratio": 0.8,
         "finetune_epochs": 0.25, "samples": 64},
        {"type": "share", "criterion": "deeplift", "clusters": 16, "finetune_epochs": 0.25,
         "samples": 64},
        {"type": "finetune", "epochs": 0.25},
    ],
    "report": {"fidelity_samples": 48, "heatmaps": 2, "latency_repeats": 2},
}
METRICS = ("accuracy", "params", "nonzero_params", "macs", "size_bytes", "latency_ms")
NUMBERS = ("accuracy", "params", "nonzero_params", "macs", "size_bytes", "fp32_bytes")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One CLI `compress` run (module-scoped: the tests below inspect its outputs)."""
    from xaicompress.cli import main

    root = tmp_path_factory.mktemp("pipe")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = root / "out"
    assert main(["compress", "--config", str(cfg), "--out", str(out)]) == 0
    return cfg, out


def test_every_output_file_exists(first_run):
    _, out = first_run
    for name in ("model.xcpk", "model.onnx", "model.safetensors", "report.json", "report.md",
                 "stages.png", "layers.png", "heatmaps.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert len(list((out / "cache").glob("*.safetensors"))) == 1 + len(TINY["stages"])
    assert not list(out.glob(".*.tmp"))  # no temp file left behind by the atomic writer
    md = (out / "report.md").read_text()
    assert "x smaller" in md and "![heatmaps](heatmaps.png)" in md


def test_report_fields_and_real_compression(first_run):
    _, out = first_run
    rep = json.loads((out / "report.json").read_text())
    for part in ("baseline", "final"):
        for k in METRICS:
            assert math.isfinite(rep[part][k]) and rep[part][k] > 0, (part, k)
        assert 50 < rep[part]["accuracy"] <= 100  # percent, far above chance (10) on mnist5k
    assert [s["name"] for s in rep["stages"]] == [s["type"] for s in TINY["stages"]]
    for s in rep["stages"]:
        assert {"name", "criterion", "seconds", *METRICS} <= set(s)
        assert set(s["fidelity"]) >= {"cosine", "top10_overlap", "agreement"}
        # the compressed model still explains its decisions like the original
        assert s["fidelity"]["cosine"] > 0.5 and 0 < s["fidelity"]["top10_overlap"] <= 1
    assert rep["stages"][0]["criterion"] == "deeplift" and rep["stages"][3]["criterion"] is None
    b, f = rep["baseline"], rep["final"]
    packed = (out / "model.xcpk").stat().st_size
    assert f["size_bytes"] == packed
    assert rep["compression_ratio"] == pytest.approx(b["fp32_bytes"] / packed, rel=1e-3)
    assert rep["compression_ratio"] > 10  # half the units, 80% sparse fc, 4-bit indices
    assert f["params"] < b["params"] and f["macs"] < b["macs"]
    assert f["nonzero_params"] < 0.3 * b["params"]
    assert f["accuracy"] > 30  # 1 epoch of training: far from perfect, far above chance
    assert set(rep["fidelity"]["final"]) >= {"cosine", "top10_overlap", "agreement"}
    assert len(rep["fidelity"]["per_stage"]) == len(TINY["stages"])
    assert rep["layers"]["fc1"]["units"] == [120, 60] and rep["layers"]["fc1"]["clusters"] == 16


def test_packed_file_and_checkpoint_reload_identically(first_run):
    from xaicompress.export.packed import load_packed

    _, out = first_run
    x, _ = dataset_tensors(load_dataset("mnist5k").test, 128)
    ck = load_checkpoint(out / "model.safetensors")
    pk = load_packed(out / "model.xcpk")
    with torch.no_grad():
        a, b = ck.model.eval()(x), pk.model.eval()(x)
    assert torch.equal(a, b)
    rep = json.loads((out / "report.json").read_text())
    assert ck.metrics["accuracy"] == pytest.approx(rep["final"]["accuracy"])


def test_onnx_runs_in_onnxruntime(first_run):
    import onnxruntime as ort

    _, out = first_run
    x, _ = dataset_tensors(load_dataset("mnist5k").test, 64)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = load_checkpoint(out / "model.safetensors").model.eval()(x).numpy()
    assert got.shape == (64, 10)
    assert abs(got - want).max() < 1e-4


def test_rerun_is_cached_fast_and_identical(first_run):
    cfg_path, out = first_run
    before = json.loads((out / "report.json").read_text())
    t0 = time.perf_counter()
    res = run_pipeline(validate_config(yaml.safe_load(cfg_path.read_text())), out)
    assert time.perf_counter() - t0 < 30
    assert res.cached == [True] * (1 + len(TINY["stages"]))

    def untimed(rep):  # the written files' onnxruntime latency is measured on every run
        return {**rep, "deployables": [{k: v for k, v in d.items() if k != "ort_latency_ms"}
                                       for d in rep["deployables"]]}

    assert untimed(res.report) == untimed(before)


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_numbers(first_run, tmp_path, monkeypatch):
    _, out_a = first_run
    full = json.loads((out_a / "report.json").read_text())
    cfg = validate_config(TINY)
    out_b = tmp_path / "b"
    (out_b / "cache").mkdir(parents=True)
    for f in (out_a / "cache").glob("00-baseline-*"):  # skip retraining: same key, same file
        shutil.copy(f, out_b / "cache" / f.name)

    real_share = STAGES["share"]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(STAGES, "share", StageDef(real_share.model, killed))
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, out_b)
    assert not (out_b / "report.json").exists()
    monkeypatch.setitem(STAGES, "share", real_share)
    res = run_pipeline(cfg, out_b)
    assert res.cached == [True, True, True, False, False]
    got = res.report
    for part in ("baseline", "final"):
        for k in NUMBERS:
            assert got[part][k] == full[part][k], (part, k)
    for s_got, s_full in zip(got["stages"], full["stages"], strict=True):
        assert s_got["fidelity"] == s_full["fidelity"]
        assert all(s_got[k] == s_full[k] for k in NUMBERS)
    assert got["compression_ratio"] == full["compression_ratio"]
    assert (out_b / "model.xcpk").read_bytes() == (out_a / "model.xcpk").read_bytes()


@pytest.mark.slow
def test_changed_stage_recomputes_only_from_there(first_run, tmp_path):
    _, out_a = first_run
    out_b = tmp_path / "c"
    shutil.copytree(out_a / "cache", out_b / "cache")
    data = json.loads(json.dumps(TINY))
    data["stages"][2]["clusters"] = 4
    data["stages"] = data["stages"][:3]
    res = run_pipeline(validate_config(data), out_b, plots=False)
    assert res.cached == [True, True, True, False]
    assert res.report["layers"]["fc1"]["clusters"] == 4


@pytest.mark.slow
def test_start_from_a_user_checkpoint(first_run, tmp_path):
    _, out_a = first_run
    base = next((out_a / "cache").glob("00-baseline-*"))
    cfg = validate_config({"checkpoint": str(base), "data": "mnist5k",
                           "stages": [TINY["stages"][1]], "export": {"onnx": False},
                           "report": {"fidelity_samples": 16, "heatmaps": 0,
                                      "latency_repeats": 1}})
    res = run_pipeline(cfg, tmp_path / "u", plots=False)
    assert res.report["final"]["nonzero_params"] < res.report["baseline"]["nonzero_params"]
    assert not (tmp_path / "u" / "model.onnx").exists()
    # the checkpoint's preprocessing brings any data to its 28 x 28 inputs; a spec asking
    # for another size is refused before anything is written
    bad = validate_config({"checkpoint": str(base), "data": "digits?size=16", "stages": []})
    with pytest.raises(XaiCompressError, match="model takes 28 x 28"):
        run_pipeline(bad, tmp_path / "v")
    assert not (tmp_path / "v").exists()
    # an xaicompress checkpoint stores its kwargs and preprocessing: none may be given
    for extra in ({"model": {"name": "lenet5", "kwargs": {"width": 2}}},
                  {"preprocess": {"normalise": "0.5/0.25"}}):
        bad = validate_config({"checkpoint": str(base), "stages": [], **extra})
        with pytest.raises(XaiCompressError, match="does not apply"):
            run_pipeline(bad, tmp_path / "v")
    assert not (tmp_path / "v").exists()


def test_out_folder_errors(tmp_path, run_cli):
    cfg = tmp_path / "t.yaml"
    cfg.write_text(yaml.safe_dump({"model": "lenet5", "train": {"epochs": 0},
                                   "export": {"onnx": False},
                                   "report": {"heatmaps": 0, "latency_repeats": 1}}))
    # the parents of --out are created (runs/x without runs/)
    code, _, err = run_cli("compress", "--config", cfg, "--out", tmp_path / "runs" / "x")
    assert code == 0, err
    assert (tmp_path / "runs" / "x" / "report.json").is_file()
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli("compress", "--config", cfg, "--out", tmp_path / "afile")
    assert code == 2 and "not a folder" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("compress", "--config", cfg, "--out", tmp_path / "afile" / "sub")
    assert code == 2 and "afile" in err and len(err.strip().splitlines()) == 1
    # OUT/cache taken by a file: a clean error, the file kept
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "cache").write_text("mine")
    code, _, err = run_cli("compress", "--config", cfg, "--out", tmp_path / "o")
    assert code == 2 and "cache" in err and "not a folder" in err
    assert (tmp_path / "o" / "cache").read_text() == "mine"


def test_demo_runs_a_config_and_finds_the_shipped_one(first_run, run_cli):
    from xaicompress.commands.demo import demo_config_path
    from xaicompress.pipeline import load_config

    assert demo_config_path().name == "lenet5-mnist.yaml"
    assert load_config(demo_config_path()).model.name == "lenet5"
    cfg, out = first_run  # all cached: the demo command only exports and prints the table
    code, stdout, err = run_cli("demo", "--config", cfg, "--out", out)
    assert code == 0, err
    assert "x smaller" in stdout and "prune_structured" in stdout and "final" in stdout


def test_report_lists_every_deployable_file(first_run):
    _, out = first_run
    rep = json.loads((out / "report.json").read_text())
    files = {d["file"]: d for d in rep["deployables"]}
    assert set(files) == {"model.xcpk", "model.onnx", "model.safetensors"}
    for d in files.values():
        assert d["bytes"] == (out / d["file"]).stat().st_size and d["reads_it"]
    onnx_file = files["model.onnx"]
    # codebook + uint4 indices: far smaller than the original's fp32 ONNX, same accuracy
    assert onnx_file["ratio_fp32_onnx"] > 8
    assert onnx_file["accuracy"] == pytest.approx(rep["final"]["accuracy"], abs=0.11)
    assert onnx_file["ort_latency_ms"] > 0
    md = (out / "report.md").read_text()
    assert "For any ONNX runtime: `model.onnx`" in md and "standalone" in md
