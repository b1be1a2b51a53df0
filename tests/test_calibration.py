"""Post-training calibration: BatchNorm re-estimation and bias correction, alone and as the
steps run them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xaicompress import calibration
from xaicompress.calibration import (
    batchnorm_layers,
    correct_bias,
    reestimate_batchnorm,
    refit_masked_layers,
)
from xaicompress.checkpoint import Checkpoint, ModelSpec
from xaicompress.data import load_dataset, subset
from xaicompress.prune import prune_structured, prune_unstructured
from xaicompress.quant.codebook import share_weights
from xaicompress.quant.integer import quantize
from xaicompress.train import accuracy, seed_everything, train


def _fake(shape, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, *shape, generator=g),
                                          torch.randint(0, 10, (n,), generator=g))


def _resnet(seed=0):
    torch.manual_seed(seed)
    spec = ModelSpec("resnet20", (3, 16, 16), 10, {"width": 0.5})
    return Checkpoint(spec.build().eval(), spec, None)


def _bn_inputs(model, data):
    """Per-channel mean / variance of every BatchNorm's input over all of `data` at once,
    the model in eval mode (the statistics the re-estimated network should hold, up to
    the train-mode pass normalising by the biased batch variance: ~0.5% at depth 20)."""
    seen = {}
    hooks = [m.register_forward_pre_hook(
        lambda _m, args, n=n: seen.__setitem__(n, args[0].detach()))
        for n, m in batchnorm_layers(model).items()]
    model.eval()
    with torch.no_grad():
        model(data.tensors[0])
    for h in hooks:
        h.remove()
    return {n: (x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)) for n, x in seen.items()}


def test_reestimated_statistics_are_those_of_the_calibration_samples():
    ck = _resnet()
    data = _fake((3, 16, 16), n=64)  # one batch: the cumulative average is its statistics
    for m in batchnorm_layers(ck.model).values():  # stale statistics, as after a cut
        m.running_mean.fill_(3.0)
        m.running_var.fill_(0.01)
    momenta = {n: m.momentum for n, m in batchnorm_layers(ck.model).items()}
    assert reestimate_batchnorm(ck.model, data) == len(momenta) > 10
    want = _bn_inputs(ck.model, data)
    for n, m in batchnorm_layers(ck.model).items():
        assert torch.allclose(m.running_mean, want[n][0], rtol=1e-2, atol=1e-2), n
        assert torch.allclose(m.running_var, want[n][1], rtol=1e-2, atol=1e-2), n
        assert m.momentum == momenta[n] and not m.training


def test_a_model_without_batchnorm_is_untouched():
    torch.manual_seed(0)
    spec = ModelSpec("lenet5", (1, 28, 28), 10)
    model = spec.build().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert reestimate_batchnorm(model, _fake((1, 28, 28))) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("on", [True, False])
def test_structured_pruning_reestimates_unless_switched_off(on):
    ck = _resnet()
    data = _fake((3, 16, 16), n=64)
    out = prune_structured(ck, "l1", data, ratio=0.5, bn_recalibration=on)
    want = _bn_inputs(out.model, data)
    close = [torch.allclose(m.running_mean, want[n][0], rtol=1e-2, atol=1e-2)
             for n, m in batchnorm_layers(out.model).items()]
    assert all(close) if on else not all(close)
    assert out.history[-1]["bn_recalibration"] is on
    assert all(s["bn_reestimated"] == (len(close) if on else 0)
               for s in out.history[-1]["schedule"])


def test_unstructured_pruning_reestimates():
    ck = _resnet()
    data = _fake((3, 16, 16), n=64)
    out = prune_unstructured(ck, "l1", data, ratio=0.8, layers="conv")
    want = _bn_inputs(out.model, data)
    for n, m in batchnorm_layers(out.model).items():
        assert torch.allclose(m.running_mean, want[n][0], rtol=1e-2, atol=1e-2), n


@pytest.fixture(scope="module")
def lenet():
    b = load_dataset("mnist5k", seed=0)
    b.train = subset(b.train, 1200, seed=0)
    b.test = subset(b.test, 500, seed=0)
    seed_everything(0)
    spec = ModelSpec("lenet5", tuple(b.input_shape), b.num_classes)
    model = train(spec.build(), b.train, epochs=3, lr=3e-3, seed=0)
    return b, Checkpoint(model, spec, "mnist5k")


def _layer_means(model, layer, x):
    out = {}
    h = dict(model.named_modules())[layer].register_forward_hook(
        lambda _m, _a, y: out.__setitem__("y", y.detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    y = out["y"]
    return y.mean([0, *range(2, y.dim())])


def test_bias_correction_restores_the_first_layers_output_mean(lenet):
    bundle, ck = lenet
    q = quantize(ck, "none", bundle, avg_bits=2, allocation="uniform", bias_correction=False)
    calib = subset(bundle.train, 256, seed=1)
    x = torch.stack([calib[i][0] for i in range(len(calib))])
    before = _layer_means(q.model, "conv1", x) - _layer_means(ck.model, "conv1", x)
    shifts = correct_bias(q.model, ck.model, calib, ["conv1", "fc1"], samples=256,
                          check=False)
    after = _layer_means(q.model, "conv1", x) - _layer_means(ck.model, "conv1", x)
    assert set(shifts) == {"conv1", "fc1"} and before.abs().max() > 1e-3
    assert after.abs().max() < 1e-5  # its inputs are the data: the shift is exact there


def test_a_bias_correction_that_makes_the_model_disagree_more_is_undone(lenet):
    # 1-bit sharing: the errors are not small and mean-like, and the correction moved
    # lenet5 further from the float model (74% -> 51% test); with the check it is undone
    from xaicompress.calibration import _agreement

    bundle, ck = lenet
    plain = share_weights(ck, "none", bundle, clusters=2, bias_correction=False)
    calib = subset(bundle.train, 512, seed=0)
    blind = plain.copy()
    correct_bias(blind.model, ck.model, calib, list(blind.state.layers), samples=512,
                 check=False)
    agree = [_agreement(m.model, ck.model, calib, 512, 0) for m in (plain, blind)]
    assert agree[1] < agree[0]  # the case the check is for
    checked = plain.copy()
    assert correct_bias(checked.model, ck.model, calib, list(checked.state.layers),
                        samples=512) == {}
    for (n, a), b in zip(checked.model.state_dict().items(),
                         plain.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_quantize_with_bias_correction_is_recorded_and_not_worse(lenet):
    bundle, ck = lenet
    plain = quantize(ck, "none", bundle, avg_bits=3, allocation="uniform",
                     bias_correction=False)
    fixed = quantize(ck, "none", bundle, avg_bits=3, allocation="uniform")
    entry = fixed.history[-1]
    assert entry["bias_correction"] and set(entry["bias_shift"]) == {
        "conv1", "conv2", "fc1", "fc2", "fc3"}
    # same integer weights, only the fp32 biases moved
    for name in entry["bias_shift"]:
        assert torch.equal(fixed.state.get(name).grid.scale, plain.state.get(name).grid.scale)
    assert accuracy(fixed.model, bundle.test) >= accuracy(plain.model, bundle.test) - 1.0


def test_bias_correction_without_bias_layers_does_nothing():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.Flatten(), nn.Linear(4 * 36, 3,
                                                                                  bias=False))
    assert correct_bias(model, model, _fake((1, 8, 8)), ["0", "2"]) == {}


def test_tracked_cut_reports_the_kept_channels_and_restores_biases():
    from xaicompress.prune.structured import apply_plan_tracked

    ck = _resnet()
    model = ck.model
    before = {n: (m.bias.detach().clone() if m.bias is not None else None)
              for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    kept = apply_plan_tracked(model, {"conv1": [0, 3]}, torch.zeros(1, 3, 16, 16))
    assert kept["conv1"].tolist() == [i for i in range(8) if i not in (0, 3)]
    assert model.conv1.weight.shape[0] == 6
    for n, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if before[n] is None:
                assert m.bias is None, n
            else:
                assert torch.equal(m.bias, before[n][kept[n]]), n


def _calibration_images(bundle) -> tuple[object, torch.Tensor]:
    """512 seeded training items, and their images stacked (N, C, H, W)."""
    calib = subset(bundle.train, 512, seed=2)
    return calib, torch.stack([calib[i][0] for i in range(len(calib))])


def _assert_refit_helps(ck, plain, fitted, x, test) -> None:
    """The refitted cut's logits are less than half as far from the uncut model's as the
    plain cut's, and it is more accurate on `test`."""
    want = ck.model(x).detach()
    err = {k: float(((m.model(x) - want) ** 2).mean()) for k, m in
           (("plain", plain), ("fitted", fitted))}
    assert err["fitted"] < 0.5 * err["plain"], err
    assert accuracy(fitted.model, test) > accuracy(plain.model, test)


def test_reconstruction_brings_the_cut_layers_outputs_back(lenet):
    bundle, ck = lenet
    calib, x = _calibration_images(bundle)
    plain = prune_structured(ck, "l1", calib, ratio=0.6, scope="layer", reconstruct=False)
    fitted = prune_structured(ck, "l1", calib, ratio=0.6, scope="layer", reconstruct=True)
    assert fitted.history[-1]["reconstruct"] is True
    assert plain.history[-1]["reconstruct"] is False
    assert plain.model.fc1.weight.shape == fitted.model.fc1.weight.shape
    # the logits (the classifier keeps all outputs) come closer to the uncut model's
    _assert_refit_helps(ck, plain, fitted, x, bundle.test)


def test_reconstruction_is_on_by_default_only_without_fine_tuning(lenet):
    """One-shot cuts are refitted unless the user says no; a stage that fine-tunes is left
    to its fine-tuning (the shipped configs were measured that way)."""
    bundle, ck = lenet
    calib = subset(bundle.train, 256, seed=3)
    one_shot = prune_structured(ck, "l1", calib, ratio=0.6, scope="layer")
    fitted = prune_structured(ck, "l1", calib, ratio=0.6, scope="layer", reconstruct=True)
    tuned = prune_structured(ck, "l1", calib, ratio=0.6, scope="layer", finetune_epochs=0.1)
    assert one_shot.history[-1]["reconstruct"] is True
    assert tuned.history[-1]["reconstruct"] is False
    for name, w in fitted.model.state_dict().items():
        assert torch.equal(one_shot.model.state_dict()[name], w), name


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_masked_refit_recovers_weights_the_kept_ones_can_express(solver, monkeypatch):
    """Reference outputs a sparse layer can reproduce exactly: the refit finds that layer's
    weights again from perturbed ones, and writes 0 where the mask removed a weight; the
    conjugate gradients of wide layers too."""
    if solver == "cg":
        monkeypatch.setattr(calibration, "EXACT_FLOPS", 0)
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))
    keep = torch.rand(6, 12) > 0.5
    with torch.no_grad():
        ref[0].weight.mul_(keep)
    model = Checkpoint(ref, None, None).copy().model
    with torch.no_grad():
        model[0].weight.add_(0.3 * torch.randn(6, 12) * keep)
        model[0].bias.add_(0.2)
    data = _fake((12,), n=256)
    done = refit_masked_layers(model, ref, data, {"0": keep}, samples=256)
    assert done == ["0"]
    assert torch.equal(model[0].weight[~keep], torch.zeros(int((~keep).sum())))
    assert torch.allclose(model[0].weight, ref[0].weight, atol=5e-3)
    assert torch.allclose(model[0].bias, ref[0].bias, atol=5e-3)
    assert torch.equal(model[2].weight, ref[2].weight)  # not masked: untouched


def test_unstructured_refit_keeps_the_masks_and_brings_the_logits_back(lenet):
    bundle, ck = lenet
    calib, x = _calibration_images(bundle)
    plain = prune_unstructured(ck, "l1", calib, ratio=0.9, layers="all", reconstruct=False)
    fitted = prune_unstructured(ck, "l1", calib, ratio=0.9, layers="all", reconstruct=True)
    assert fitted.history[-1]["reconstruct"] is True and fitted.history[-1]["refitted"] == 5
    assert plain.history[-1]["refitted"] == 0
    for name, st in fitted.state.layers.items():
        assert torch.equal(st.mask.keep, plain.state.layers[name].mask.keep), name
        w = dict(fitted.model.named_modules())[name].weight
        assert int((w[~st.mask.keep] != 0).sum()) == 0, name
    _assert_refit_helps(ck, plain, fitted, x, bundle.test)


def test_unstructured_refit_is_on_by_default_only_without_fine_tuning(lenet):
    bundle, ck = lenet
    calib = subset(bundle.train, 256, seed=3)
    one_shot = prune_unstructured(ck, "l1", calib, ratio=0.8)
    tuned = prune_unstructured(ck, "l1", calib, ratio=0.8, finetune_epochs=0.1)
    assert one_shot.history[-1]["reconstruct"] is True
    assert tuned.history[-1]["reconstruct"] is False and tuned.history[-1]["refitted"] == 0


def _sparse_and_perturbed(ref: nn.Sequential, drop: float,
                          tap: tuple[int, int]) -> tuple[nn.Module, torch.Tensor]:
    """Mask `drop` of ref[0]'s weights at random (input 0's `tap` always kept, so no unit
    is empty) in place, and return a copy with the kept weights perturbed, and the mask."""
    keep = torch.rand(ref[0].weight.shape) > drop
    keep[:, 0, tap[0], tap[1]] = True
    with torch.no_grad():
        ref[0].weight.mul_(keep)
    model = Checkpoint(ref, None, None).copy().model
    with torch.no_grad():
        model[0].weight.add_(0.3 * torch.randn(model[0].weight.shape) * keep)
    return model, keep


@pytest.mark.parametrize("groups", [1, 4])
def test_masked_refit_of_a_convolution_grouped_or_not(groups):
    """Convolutions too, one least squares per group for a grouped (depthwise) one."""
    torch.manual_seed(1)
    ref = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=groups), nn.ReLU())
    model, keep = _sparse_and_perturbed(ref, 0.4, (1, 1))
    done = refit_masked_layers(model, ref, _fake((4, 8, 8), n=64), {"0": keep}, samples=64)
    assert done == ["0"]
    assert int((model[0].weight[~keep] != 0).sum()) == 0
    assert torch.allclose(model[0].weight, ref[0].weight, atol=5e-3)
    assert torch.allclose(model[0].bias, ref[0].bias, atol=5e-3)


@pytest.mark.parametrize("padding,mode,stride", [("same", "zeros", 1), (1, "reflect", 1),
                                                 (0, "zeros", 2)])
def test_masked_refit_reads_the_patches_the_layer_pads(padding, mode, stride):
    """The least squares rows are the layer's own patches: "same" and reflect padding too
    (exact recovery fails if a row pairs the wrong positions)."""
    torch.manual_seed(2)
    ref = nn.Sequential(nn.Conv2d(3, 5, 3, padding=padding, padding_mode=mode, stride=stride))
    model, keep = _sparse_and_perturbed(ref, 0.5, (0, 0))
    refit_masked_layers(model, ref, _fake((3, 9, 9), n=64), {"0": keep}, samples=64)
    assert torch.allclose(model[0].weight, ref[0].weight, atol=5e-3)


@pytest.mark.parametrize("bias", [True, False])
def test_cg_with_fewer_rows_than_inputs_multiplies_by_the_rows_to_the_same_weights(bias):
    """A wide layer seen by few rows (resnet18's last stage at 32 x 32: one row an image):
    the conjugate gradients multiply by the rows instead of their Gram matrix and end at
    the same weights; a refit with that few rows takes that path."""
    torch.manual_seed(3)
    layer = nn.Linear(96, 5, bias=bias)
    keep = torch.rand(5, 96) > 0.3
    rows = torch.randn(40, 96).double()
    rows = torch.cat([rows, rows.new_ones(40, 1)], 1)
    target = torch.randn(40, 5).double()
    gram, cross = rows.t() @ rows, rows.t() @ target
    results = []
    for given in (None, rows):
        copy = Checkpoint(nn.Sequential(layer), None, None).copy().model[0]
        calibration._solve_masked_cg(copy, gram, cross, keep, steps=15, rows=given)
        results.append(copy)
    assert not torch.equal(results[0].weight, layer.weight)  # it moved
    assert torch.allclose(results[0].weight, results[1].weight, atol=1e-5)
    assert int((results[1].weight[~keep] != 0).sum()) == 0
    if bias:
        assert torch.allclose(results[0].bias, results[1].bias, atol=1e-5)


def test_a_refit_passes_the_rows_only_when_they_are_fewer_than_the_inputs(monkeypatch):
    seen = []
    monkeypatch.setattr(calibration, "_solve_masked_into",
                        lambda layer, gram, cross, keep, rows=None: seen.append(rows))
    ref = nn.Sequential(nn.Linear(48, 4))
    keep = torch.rand(4, 48) > 0.5
    for n in (16, 128):
        model = Checkpoint(ref, None, None).copy().model
        refit_masked_layers(model, ref, _fake((48,), n=n), {"0": keep}, samples=n)
    assert seen[0] is not None and seen[0].shape == (16, 49)
    assert seen[1] is None
