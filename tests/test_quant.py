"""Integer quantization: the quantizer, bit allocation under a budget, activations, QAT, CLI."""

from __future__ import annotations

import pytest
import torch

from xaicompress.checkpoint import Checkpoint, ModelSpec, load_checkpoint, save_checkpoint
from xaicompress.data import load_dataset, subset
from xaicompress.encoding import Codebook, Mask, qmax
from xaicompress.encoding.activation import act_range
from xaicompress.errors import XaiCompressError
from xaicompress.quant.integer import channel_scales, fake_quant_weight, quantize
from xaicompress.train import accuracy, predict, seed_everything, train


@pytest.fixture(scope="module")
def bundle():
    b = load_dataset("mnist5k", seed=0)
    # Small splits keep the file fast; accuracy differences are still measurable.
    b.train = subset(b.train, 1500, seed=0)
    b.test = subset(b.test, 500, seed=0)
    return b


@pytest.fixture(scope="module")
def base(bundle):
    seed_everything(0)
    spec = ModelSpec("lenet5", tuple(bundle.input_shape), bundle.num_classes)
    model = train(spec.build(), bundle.train, epochs=4, lr=3e-3, seed=0)
    return Checkpoint(model, spec, "mnist5k",
                      metrics={"accuracy": accuracy(model, bundle.test)})


@pytest.fixture(scope="module")
def untrained(bundle):
    """lenet5 as built: enough for the option checks, which never look at accuracy."""
    seed_everything(0)
    spec = ModelSpec("lenet5", tuple(bundle.input_shape), bundle.num_classes)
    return Checkpoint(spec.build().eval(), spec, "mnist5k")


def _on_grid(w: torch.Tensor, scale: torch.Tensor, bits: int) -> bool:
    q = w / scale.reshape(-1, *([1] * (w.dim() - 1)))
    return (bool(torch.allclose(q, q.round(), atol=1e-4))
            and float(q.abs().max()) <= qmax(bits) + 1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("clip", ["max", "mse"])
def test_per_channel_grid(bits, clip):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 3, 5, 5, generator=g) * torch.linspace(0.1, 2, 6)[:, None, None, None]
    s = channel_scales(w, bits, clip=clip)
    wq = fake_quant_weight(w, s, bits)
    assert s.shape == (6,)
    assert _on_grid(wq, s, bits)
    for c in range(6):
        assert len(torch.unique(wq[c])) <= 2 * qmax(bits) + 1
    if clip == "max":
        assert torch.allclose(s, w.reshape(6, -1).abs().amax(1) / qmax(bits))
    # the MSE search includes the max scale, so it can only lower the error
    err = ((w - wq) ** 2).sum()
    err_max = ((w - fake_quant_weight(w, channel_scales(w, bits, clip="max"), bits)) ** 2).sum()
    assert err <= err_max + 1e-6


def test_zero_channel_does_not_divide_by_zero():
    w = torch.randn(3, 4)
    w[1] = 0
    s = channel_scales(w, 4)
    wq = fake_quant_weight(w, s, 4)
    assert torch.isfinite(wq).all() and (wq[1] == 0).all()


@pytest.mark.slow
def test_quantize_stores_bits_and_keeps_accuracy(base, bundle, tmp_path):
    q = quantize(base, "l1", bundle, avg_bits=4, seed=0, samples=128)
    step = q.history[-1]
    assert step["stage"] == "quantize" and set(step["bits"]) == {"conv1", "conv2", "fc1", "fc2",
                                                                 "fc3"}
    assert step["achieved_avg_bits"] <= 4 + 1e-9
    mods = dict(q.model.named_modules())
    for name, b in step["bits"].items():
        grid = q.state.layers[name].grid
        assert grid.bits == b and grid.scale.shape == (mods[name].weight.shape[0],)
        assert _on_grid(mods[name].weight.detach(), grid.scale, b)
    # the input is untouched (pure step)
    assert "conv1" not in base.state
    assert abs(accuracy(q.model, bundle.test) - base.metrics["accuracy"]) <= 1.0
    path = tmp_path / "q.safetensors"
    save_checkpoint(q, path)
    back = load_checkpoint(path)
    assert back.state.layers["fc1"].grid.bits == step["bits"]["fc1"]
    assert torch.equal(predict(back.model, bundle.test)[0], predict(q.model, bundle.test)[0])


@pytest.mark.slow
def test_milp_never_worse_than_uniform_in_its_objective(base, bundle):
    for avg in (2.5, 3.5):
        m = quantize(base, "l1", bundle, avg_bits=avg, seed=0).history[-1]
        u = quantize(base, "l1", bundle, avg_bits=avg, allocation="uniform", seed=0).history[-1]
        assert u["bits"] == {n: int(avg) for n in u["bits"]}
        assert m["weighted_error"] <= u["weighted_error"] + 1e-12
        assert m["used_bits"] <= m["budget_bits"]
    # 2.5 bits leave room that uniform 2 bits wastes: MILP spends it and lowers the error
    assert m["used_bits"] > u["used_bits"]


@pytest.mark.slow
def test_two_bits_is_a_real_loss_and_mse_clipping_helps(base, bundle):
    # the clipping alone: bias correction (tested in test_calibration.py) off
    acc = {clip: accuracy(quantize(base, "none", bundle, avg_bits=2, clip=clip,
                                   bias_correction=False).model,
                          bundle.test) for clip in ("max", "mse")}
    assert acc["mse"] >= acc["max"]
    assert acc["max"] < base.metrics["accuracy"] - 1


@pytest.mark.slow
def test_pruned_weights_stay_zero_and_qat_keeps_the_grid(base, bundle):
    pruned = base.copy()
    w = pruned.model.fc1.weight
    mask = w.detach().abs() > w.detach().abs().median()
    pruned.state.get("fc1").mask = Mask(mask)
    pruned.state.apply(pruned.model)
    q = quantize(pruned, "none", bundle, avg_bits=2, qat_epochs=0.3, seed=0)
    wq = q.model.fc1.weight.detach()
    assert (wq[~mask] == 0).all()
    grid = q.state.layers["fc1"].grid
    assert _on_grid(wq, grid.scale, grid.bits)
    assert q.history[-1]["bits"]["fc1"] == 2
    # budget counts the stored (kept) weights only
    assert q.history[-1]["achieved_avg_bits"] <= 2 + 1e-9
    ptq = quantize(pruned, "none", bundle, avg_bits=2, seed=0)
    assert accuracy(q.model, bundle.test) >= accuracy(ptq.model, bundle.test) - 0.5
    # the state re-derives exactly the weights the model holds
    before = {k: v.clone() for k, v in q.model.state_dict().items()}
    q.state.apply(q.model)
    assert all(torch.equal(before[k], v) for k, v in q.model.state_dict().items())


@pytest.mark.slow
def test_activation_quantization_is_real_and_survives_save_load(base, bundle, tmp_path):
    q = quantize(base, "l1", bundle, avg_bits=4, act_bits=4, seed=0, samples=128)
    act = q.state.layers["fc2"].activation
    assert act.bits == 4 and act.scale.numel() == 1
    seen = {}
    def grab(_m, args, _out):
        seen.setdefault("x", args[0].detach())

    q.model.fc2.register_forward_hook(grab)
    logits = predict(q.model, bundle.test)[0]
    x = seen["x"] / act.scale
    lo, hi = act_range(4)
    assert torch.allclose(x, x.round(), atol=1e-3)
    assert x.min() >= lo - 1e-3 and x.max() <= hi + 1e-3  # s * q / s: float rounding
    plain = q.copy()
    for lc2 in plain.state.layers.values():
        lc2.activation = None
    plain.state.install_hooks(plain.model)
    assert not torch.equal(predict(plain.model, bundle.test)[0], logits)
    path = tmp_path / "qa.safetensors"
    save_checkpoint(q, path)
    back = load_checkpoint(path)
    assert torch.equal(predict(back.model, bundle.test)[0], logits)
    assert torch.equal(predict(q.copy().model, bundle.test)[0], logits)


@pytest.mark.slow
def test_size_kb_budget_fits_the_packed_file(base, bundle):
    from xaicompress.export.packed import packed_bytes

    # lenet5: 61,470 weights, ~2 KiB of biases + scales + header
    for kb, low, high in ((20, 2, 2.6), (34, 3.6, 4.3)):
        q = quantize(base, "l1", bundle, size_kb=kb, seed=0)
        assert len(packed_bytes(q)) <= kb * 1024
        assert low <= q.history[-1]["achieved_avg_bits"] <= high
    with pytest.raises(XaiCompressError, match="--size-kb"):
        quantize(base, "l1", bundle, size_kb=3, seed=0)  # 2 bits need ~17 KiB


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one budget"),
    ({"avg_bits": 3, "size_kb": 10}, "exactly one budget"),
    ({"avg_bits": 1.5},
     r"--avg-bits 1.5: budget infeasible.*smallest feasible size is [0-9.]+ coded bits"),
    ({"avg_bits": 3, "act_bits": 9}, "--act-bits 9"),
    ({"avg_bits": 3, "allocation": "greedy"}, "--allocation"),
    ({"avg_bits": -1}, "--avg-bits"),
])
def test_bad_options_are_user_errors(untrained, bundle, kwargs, match):
    with pytest.raises(XaiCompressError, match=match):
        quantize(untrained, "none", bundle, **kwargs)


def test_weight_shared_layers_are_refused(untrained, bundle):
    shared = untrained.copy()
    shared.state.get("fc3").weights = Codebook(
        torch.tensor([-0.1, 0.0, 0.1]), torch.ones_like(shared.model.fc3.weight, dtype=torch.int64))
    with pytest.raises(XaiCompressError, match="weight-shared"):
        quantize(shared, "none", bundle, avg_bits=4)


@pytest.mark.slow
def test_cli_quantize(base, tmp_path, run_cli):
    src = tmp_path / "base.safetensors"
    save_checkpoint(base, src)
    out = tmp_path / "q.safetensors"
    code, stdout, err = run_cli("quantize", src, "--data", "mnist5k", "--criterion", "l1",
                                "--avg-bits", "3", "--samples", "64", "--seed", "0",
                                "--out", out)
    assert code == 0, err
    assert "fc1" in stdout and "bits per layer" in stdout and "accuracy" in stdout
    q = load_checkpoint(out)
    # 3 entropy-coded bits per weight: the values streams fit, at widths of 3 bits or more
    from xaicompress.export.packed import packed_report

    n = sum(q.model.get_submodule(k).weight.numel() for k in ("conv1", "conv2", "fc1", "fc2",
                                                               "fc3"))
    assert packed_report(q).parts_bits["values"] <= 3 * n
    assert all(q.state.layers[k].grid.bits >= 3 for k in ("conv1", "fc1", "fc3"))
    code, _, err = run_cli("quantize", src, "--criterion", "l1", "--out", tmp_path / "x.st")
    assert code == 2 and "--avg-bits" in err and "Traceback" not in err
    code, _, err = run_cli("quantize", src, "--criterion", "nosuch", "--avg-bits", "3",
                           "--out", tmp_path / "x.st")
    assert code == 2 and "--criterion" in err
