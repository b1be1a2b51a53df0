"""Unstructured pruning: masks in the state, zeros that survive fine-tuning, sparse bytes."""

import pytest
import torch

from xaicompress.checkpoint import (
    Checkpoint,
    ModelSpec,
    checkpoint_bytes,
    checkpoint_from_bytes,
    fp32_bytes,
    load_checkpoint,
    save_checkpoint,
)
from xaicompress.data import subset
from xaicompress.errors import XaiCompressError
from xaicompress.prune import prune_unstructured, sparse_bytes
from xaicompress.train import accuracy, train


def _ckpt(name="lenet5", seed=0):
    torch.manual_seed(seed)
    spec = ModelSpec(name, (1, 28, 28), 10, {})
    return Checkpoint(spec.build().eval(), spec, "mnist5k")


def _fake(n=64):
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(n, 1, 28, 28, generator=g),
                                          torch.randint(0, 10, (n,), generator=g))


def test_fc_layers_masked_to_exact_sparsity_convs_untouched():
    ck = _ckpt()
    out = prune_unstructured(ck, "l1", _fake(), ratio=0.9, scope="layer", reconstruct=False)
    m = out.model
    for name in ("fc1", "fc2", "fc3"):
        mask = out.state.layers[name].mask.keep
        w = getattr(m, name).weight
        assert mask.dtype == torch.bool and mask.shape == w.shape
        assert (~mask).sum().item() == round(0.9 * w.numel())
        assert torch.all(w[~mask] == 0)
        assert torch.equal(w[mask], getattr(ck.model, name).weight[mask])
        # magnitude: every removed weight is no larger than every kept one
        ref = getattr(ck.model, name).weight.abs()
        assert ref[~mask].max() <= ref[mask].min()
    assert "conv1" not in out.state and torch.equal(m.conv1.weight, ck.model.conv1.weight)
    assert "fc1" not in ck.state  # input untouched
    assert out.history[-1]["stage"] == "prune_unstructured"
    assert abs(out.history[-1]["sparsity"] - 0.9) < 1e-3


def test_masks_survive_save_and_reload(tmp_path):
    out = prune_unstructured(_ckpt(), "random", _fake(), ratio=0.8, layers="all")
    path = save_checkpoint(out, tmp_path / "u.safetensors")
    back = load_checkpoint(path)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(back.model(x), out.model(x))
    for name, lc in out.state.layers.items():
        assert torch.equal(back.state.layers[name].mask.keep, lc.mask.keep)


def test_pruned_weights_stay_exactly_zero_during_finetuning(mnist):
    ck = _ckpt()
    small = subset(mnist.train, 600, seed=0)
    pruned = prune_unstructured(ck, "l1", small, ratio=0.9)
    tuned = prune_unstructured(ck, "l1", small, ratio=0.9, finetune_epochs=1)
    for name in ("fc1", "fc2", "fc3"):
        mask = tuned.state.layers[name].mask.keep
        w = getattr(tuned.model, name).weight
        assert torch.equal(mask, pruned.state.layers[name].mask.keep)
        assert torch.count_nonzero(w[~mask]) == 0
        assert not torch.equal(w[mask], getattr(pruned.model, name).weight[mask])  # it trained
    assert [h["stage"] for h in tuned.history] == ["prune_unstructured"]


def test_global_scope_total_sparsity_and_no_empty_layer():
    ck = _ckpt("lenet300")
    out = prune_unstructured(ck, "l1", _fake(), ratio=0.95, layers="all", scope="global",
                             norm="l1")
    masks = [out.state.layers[n].mask.keep for n in ("fc1", "fc2", "fc3")]
    kept = sum(int(m.sum()) for m in masks)
    total = sum(m.numel() for m in masks)
    assert kept == total - round(0.95 * total)
    assert all(m.any() for m in masks)
    per_layer = out.history[-1]["per_layer"]
    assert per_layer["fc1"] > per_layer["fc3"]  # per-layer L1 normalisation: wide layers first


def test_global_cap_spreads_the_cut_instead_of_stripping_one_layer():
    from xaicompress.prune.unstructured import weight_masks

    # layer "a" scores far below "b": uncapped, 90% of all weights empties "a" (one kept)
    scores = {"a": torch.rand(100) * 1e-3, "b": torch.rand(100) + 1.0}
    prior = {"a": None, "b": None}
    free = weight_masks(scores, prior, 0.6, "global")
    assert int(free["a"].sum()) == 1 and int(free["b"].sum()) == 79
    capped = weight_masks(scores, prior, 0.6, "global", cap=0.8)
    assert int(capped["a"].sum()) == 20  # a loses exactly the cap ...
    assert int(capped["b"].sum()) == 60  # ... and b the rest, lowest scores first
    b_gone = scores["b"][~capped["b"]]
    assert b_gone.max() <= scores["b"][capped["b"]].min()
    # a cap the target cannot be met within is exceeded, never leaving a layer empty
    tight = weight_masks(scores, prior, 0.95, "global", cap=0.9)
    assert sum(int(m.sum()) for m in tight.values()) == 10
    assert all(m.any() for m in tight.values())


def test_auto_cap_keeps_every_layer_of_a_global_deeplift_cut():
    ck = _ckpt("lenet300")
    free = prune_unstructured(ck, "l1", _fake(), ratio=0.95, layers="all", norm="l1",
                              max_layer_ratio=1.0)
    auto = prune_unstructured(ck, "l1", _fake(), ratio=0.95, layers="all", norm="l1",
                              max_layer_ratio=None)
    for out in (free, auto):
        assert abs(out.history[-1]["sparsity"] - 0.95) < 1e-3
    assert max(free.history[-1]["per_layer"].values()) > 0.975
    assert max(auto.history[-1]["per_layer"].values()) <= 0.975 + 1e-6  # halfway to 1
    assert auto.history[-1]["max_layer_ratio"] is None


def test_default_is_classic_global_magnitude():
    ck = _ckpt("lenet300")
    out = prune_unstructured(ck, "l1", _fake(), ratio=0.9, layers="all")
    assert out.history[-1]["scope"] == "global" and out.history[-1]["norm"] == "none"
    kept = torch.cat([ck.model.fc1.weight.abs()[out.state.layers["fc1"].mask.keep],
                      ck.model.fc3.weight.abs()[out.state.layers["fc3"].mask.keep]])
    gone = ck.model.fc2.weight.abs()[~out.state.layers["fc2"].mask.keep]
    assert gone.max() <= kept.min()


def test_second_prune_keeps_earlier_zeros():
    first = prune_unstructured(_ckpt(), "random", _fake(), ratio=0.5, layers="conv",
                               scope="layer")
    second = prune_unstructured(first, "l1", _fake(), ratio=0.7, layers="conv", scope="layer")
    for name in ("conv1", "conv2"):
        m1, m2 = first.state.layers[name].mask.keep, second.state.layers[name].mask.keep
        assert not (m2 & ~m1).any()  # nothing revived
        assert abs(1 - m2.float().mean().item() - 0.7) < 0.01


def test_sparse_bytes_counts_positions_and_values():
    ck = _ckpt("lenet300")
    out = prune_unstructured(ck, "l1", _fake(), ratio=0.95, layers="all")
    assert sparse_bytes(ck) == fp32_bytes(ck.model)
    dense_weights = sum(m.weight.numel() for m in (out.model.fc1, out.model.fc2, out.model.fc3))
    nnz = sum(int(out.state.layers[n].mask.keep.sum()) for n in ("fc1", "fc2", "fc3"))
    bias = fp32_bytes(ck.model) - 4 * dense_weights
    sb = sparse_bytes(out)
    assert bias + 4 * nnz < sb < bias + 4 * nnz + dense_weights / 8 / 2
    assert checkpoint_from_bytes(checkpoint_bytes(out)).state.layers["fc1"].mask.keep.sum() > 0


@pytest.mark.slow
def test_trained_lenet5_fc_80_percent_still_predicts(mnist):
    ck = _ckpt()
    train(ck.model, subset(mnist.train, 1500, seed=0), epochs=2, lr=3e-3, seed=0)
    base = accuracy(ck.model, mnist.test)
    out = prune_unstructured(ck, "l1", subset(mnist.train, 2000, seed=1), ratio=0.8,
                             finetune_epochs=1)
    assert accuracy(out.model, mnist.test) > base - 8


@pytest.mark.parametrize("kw,msg", [
    ({"ratio": 1.0}, "--ratio 1.0"), ({"layers": "bn"}, "--layers 'bn'"),
    ({"scope": "x"}, "--scope 'x'"), ({"samples": -3}, "--samples -3"),
    ({"norm": "l2"}, "--norm 'l2'"), ({"finetune_lr": 0}, "--finetune-lr 0"),
])
def test_bad_options(kw, msg):
    with pytest.raises(XaiCompressError, match=msg):
        prune_unstructured(_ckpt(), "l1", _fake(), **kw)


@pytest.mark.slow
def test_cli_unstructured(run_cli, tmp_path):
    src = save_checkpoint(_ckpt(), tmp_path / "in.safetensors")
    out = tmp_path / "out.safetensors"
    code, stdout, err = run_cli("prune", src, "--criterion", "l1", "--unstructured", "--ratio",
                                "0.9", "--layers", "all", "--seed", "1", "--out", out)
    assert code == 0, err
    assert "sparse_bytes" in stdout and "nonzero_params" in stdout
    back = load_checkpoint(out)
    assert back.state.layers["conv1"].mask is not None
    assert back.metrics["nonzero_params"] < 0.2 * back.metrics["params"]
    code, _, err = run_cli("prune", src, "--criterion", "l1", "--unstructured", "--ratio",
                           "0.9", "--macs-ratio", "0.5", "--out", out)
    assert code == 2 and "--macs-ratio" in err


def test_deeplift_weights_layer_cuts_by_magnitude_inside_each_layer_by_relevance_across():
    """deeplift:weights=layer (global scope): inside every layer the removed weights are
    the smallest by magnitude, while the layers' sparsities follow the relevance (they
    differ from global magnitude pruning's)."""
    ck = _ckpt()
    out = prune_unstructured(ck, "deeplift:reference=mean,weights=layer", _fake(), ratio=0.8,
                             layers="all", samples=64)
    mag = prune_unstructured(ck, "l1", _fake(), ratio=0.8, layers="all")
    spars = {}
    for name in ("conv1", "conv2", "fc1", "fc2", "fc3"):
        keep = out.state.layers[name].mask.keep
        ref = getattr(ck.model, name).weight.abs()
        assert ref[~keep].max() <= ref[keep].min()
        spars[name] = 1 - keep.float().mean().item()
    assert abs(out.history[-1]["sparsity"] - 0.8) < 1e-3
    assert max(abs(spars[n] - 1 + mag.state.layers[n].mask.keep.float().mean().item())
               for n in spars) > 0.05
