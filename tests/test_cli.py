import json

import pytest

from xaicompress.checkpoint import load_checkpoint


@pytest.mark.slow
def test_train_evaluate_roundtrip(tmp_path, run_cli):
    out = tmp_path / "m.safetensors"
    code, stdout, err = run_cli("train", "--model", "lenet5", "--data", "digits", "--epochs", "10",
                                "--seed", "1", "--out", out)
    assert code == 0, err
    ck = load_checkpoint(out)
    assert ck.data == "digits" and ck.history[0]["seed"] == 1
    assert ck.metrics["accuracy"] > 80  # 10 epochs on 8x8 digits: far above chance (10%)
    code, stdout, err = run_cli("evaluate", out, "--json")
    assert code == 0, err
    m = json.loads(stdout)
    assert m["params"] == m["nonzero_params"] > 0
    assert abs(m["accuracy"] - ck.metrics["accuracy"]) < 1e-6
    assert m["macs"] > 0 and m["latency_ms"] > 0 and m["size_bytes"] > 0
    # onnxruntime latency of the deployed file next to PyTorch's (no integer layers here)
    assert m["onnx_latency_ms"] > 0 and m["onnx_int8_latency_ms"] is None


def test_same_seed_same_model(tmp_path, run_cli):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for p in (a, b):
        assert run_cli("train", "--data", "digits", "--epochs", "1", "--seed", "3",
                       "--out", p)[0] == 0
    ma, mb = load_checkpoint(a).model.state_dict(), load_checkpoint(b).model.state_dict()
    assert all(ma[k].equal(mb[k]) for k in ma)


def test_user_errors_exit_2_one_line(tmp_path, run_cli):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    cases = [
        (("evaluate", bad), "bad.safetensors"),
        (("evaluate", tmp_path / "missing.safetensors"), "missing.safetensors"),
        (("train", "--model", "nosuchnet", "--out", tmp_path / "x.safetensors"), "nosuchnet"),
        (("train", "--data", "idx:/no/such/dir", "--out", tmp_path / "x.safetensors"), "idx"),
        (("train", "--out", tmp_path / "nodir" / "x.safetensors"), "does not exist"),
        (("train", "--epochs", "-1"), "--epochs"),
        (("train", "--bogus-option"), "bogus"),
    ]
    for args, needle in cases:
        code, out, err = run_cli(*args)
        assert code == 2, (args, err)
        assert "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
        assert needle in err, (needle, err)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
def test_step_commands_use_the_config_models(tmp_path, run_cli):
    """prune / share / finetune / quantize: the generated options reach the step (defaults
    of the config models, aliases kept) and the steps run through the pipeline's runner."""
    base = tmp_path / "m.safetensors"
    assert run_cli("train", "--data", "digits", "--epochs", "2", "--out", base)[0] == 0
    pruned = tmp_path / "p.safetensors"
    code, out, err = run_cli("prune", base, "--structured", "--criterion", "l1", "--json",
                             "--out", pruned)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["after"]["params"] < rep["before"]["params"]  # default ratio 0.5 applied
    ck = load_checkpoint(pruned)
    assert ck.data == "digits"  # the checkpoint's data, no --data needed
    step = next(h for h in ck.history if h.get("stage") == "prune_structured")
    assert step["ratio"] == 0.5
    shared = tmp_path / "s.safetensors"
    code, _, err = run_cli("share", pruned, "--clusters", "4", "--criterion", "none",
                           "--finetune-epochs", "0.2", "--lr", "0.001", "--codebook", "fp32",
                           "--out", shared)
    assert code == 0, err
    tuned = tmp_path / "f.safetensors"
    code, stdout, err = run_cli("finetune", shared, "--epochs", "0.2", "--out", tuned)
    assert code == 0 and "test accuracy" in stdout, err
    sh = load_checkpoint(tuned)
    assert all(lc.codebook.k <= 4 for lc in sh.state.layers.values()
               if lc.codebook is not None)
    code, out, err = run_cli("quantize", base, "--avg-bits", "4", "--criterion", "l1",
                             "--json", "--out", tmp_path / "q.safetensors")
    assert code == 0, err
    assert set(json.loads(out)["bits"].values()) <= set(range(2, 9))


@pytest.mark.parametrize("command", ["train", "evaluate", "explain", "prune", "share",
                                     "quantize", "finetune", "export", "compress", "compare",
                                     "demo"])
def test_every_help_renders_with_ranges(command, run_cli):
    code, out, err = run_cli(command, "--help")
    assert code == 0, err
    assert "--seed" in out and "Usage" in out
