"""Structured pruning removes channels for real, keeps coupled layers consistent, reloads."""

import pytest
import torch
import torch_pruning as tp

from xaicompress.checkpoint import (
    Checkpoint,
    ModelSpec,
    checkpoint_bytes,
    checkpoint_from_bytes,
    count_params,
    save_checkpoint,
)
from xaicompress.data import subset
from xaicompress.encoding import Mask
from xaicompress.errors import XaiCompressError
from xaicompress.metrics import count_macs
from xaicompress.prune import RelevanceImportance, prune_structured
from xaicompress.relevance import Relevance
from xaicompress.train import accuracy, train

MODELS = [
    pytest.param("lenet5", {}, (1, 28, 28), id="lenet5"),
    pytest.param("lenet300", {}, (1, 28, 28), id="lenet300"),
    pytest.param("vgg11", {"width": 0.25}, (3, 32, 32), id="vgg11"),
    pytest.param("resnet20", {"width": 0.5}, (3, 32, 32), id="resnet20"),
    pytest.param("resnet56", {"width": 0.25}, (3, 16, 16), id="resnet56", marks=pytest.mark.slow),
]


def _ckpt(name, kw, shape, seed=0):
    torch.manual_seed(seed)
    spec = ModelSpec(name, shape, 10, kw)
    return Checkpoint(spec.build().eval(), spec, None)


def _fake_train(shape, n=64):
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(n, *shape, generator=g),
                                          torch.randint(0, 10, (n,), generator=g))


@pytest.mark.parametrize("name,kw,shape", MODELS)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prune_shrinks_reloads_identically_and_is_pure(name, kw, shape, scope):
    ck = _ckpt(name, kw, shape)
    before = {k: v.clone() for k, v in ck.model.state_dict().items()}
    out = prune_structured(ck, "l1", _fake_train(shape), ratio=0.5, scope=scope)
    assert count_params(out.model) < 0.8 * count_params(ck.model)
    assert count_macs(out.model, shape) < count_macs(ck.model, shape)
    # input checkpoint untouched
    assert all(torch.equal(before[k], v) for k, v in ck.model.state_dict().items())
    x = torch.randn(5, *shape)
    y = out.model.eval()(x)
    assert y.shape == (5, 10)
    again = checkpoint_from_bytes(checkpoint_bytes(out))
    assert torch.equal(again.model(x), y)
    rec = out.history[-1]
    assert rec["stage"] == "prune_structured" and rec["criterion"] == "l1"
    assert rec["macs_after"] < rec["macs_before"]
    assert all(1 <= after <= orig for orig, after in rec["channels"].values())


def test_layer_scope_counts_exact_and_classifier_kept():
    ck = _ckpt("lenet5", {}, (1, 28, 28))
    out = prune_structured(ck, "l1", _fake_train((1, 28, 28)), ratio=0.5, scope="layer")
    m = out.model
    assert (m.conv1.out_channels, m.conv2.out_channels) == (3, 8)
    assert (m.fc1.out_features, m.fc2.out_features, m.fc3.out_features) == (60, 42, 10)
    assert m.conv2.in_channels == 3 and m.fc1.in_features == 8 * 5 * 5 and m.fc3.in_features == 42
    # the kept filters are the largest-L1 ones, kept in order
    norms = ck.model.conv1.weight.detach().abs().sum((1, 2, 3))
    keep = sorted(torch.argsort(norms, descending=True)[:3].tolist())
    assert torch.equal(m.conv1.weight, ck.model.conv1.weight[keep])


def test_residual_coupling_and_batchnorm_pruned_together():
    ck = _ckpt("resnet20", {"width": 0.5}, (3, 32, 32))
    m = prune_structured(ck, "l1", _fake_train((3, 32, 32)), ratio=0.5, scope="layer").model
    stem = m.conv1.out_channels
    assert stem < 8 and m.bn1.num_features == stem
    for b in list(m.layers)[:3]:  # stage 1: identity shortcuts share the stem's channels
        assert b.conv1.in_channels == stem and b.conv2.out_channels == stem
        assert b.bn2.num_features == stem and b.bn1.num_features == b.conv1.out_channels
    b3 = m.layers[3]
    assert b3.shortcut[0].in_channels == stem
    assert b3.shortcut[0].out_channels == b3.conv2.out_channels == m.layers[4].conv1.in_channels
    assert m.fc.in_features == m.layers[-1].conv2.out_channels and m.fc.out_features == 10


def test_group_score_is_mean_of_l1_normalised_member_scores():
    ck = _ckpt("resnet20", {"width": 0.5}, (3, 32, 32))
    model = ck.model
    g = torch.Generator().manual_seed(1)
    units = {n: torch.rand(mod.weight.shape[0], generator=g) for n, mod in model.named_modules()
             if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))}
    imp = RelevanceImportance.from_relevance(model, Relevance("test", units, {}))
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, 32, 32))
    group = graph.get_pruning_group(model.conv1, tp.prune_conv_out_channels, list(range(8)))
    members = ["conv1", "layers.0.conv2", "layers.1.conv2", "layers.2.conv2"]
    expected = sum(units[n] / units[n].sum() for n in members) / len(members)
    assert torch.allclose(imp(group), expected, atol=1e-6)


def test_global_never_empties_a_layer_and_honours_min_channels():
    ck = _ckpt("lenet5", {}, (1, 28, 28))
    out = prune_structured(ck, "l1", _fake_train((1, 28, 28)), ratio=0.99, scope="global",
                           min_channels=2)
    m = out.model
    assert min(m.conv1.out_channels, m.conv2.out_channels, m.fc1.out_features,
               m.fc2.out_features) == 2
    out1 = prune_structured(ck, "random", _fake_train((1, 28, 28)), ratio=0.9, scope="global")
    total = sum(a for _, a in out1.history[-1]["channels"].values())
    assert total == 226 - round(0.9 * 226)


def test_global_cap_and_norms_spread_the_cut_over_layers():
    ck = _ckpt("lenet5", {}, (1, 28, 28))
    data = _fake_train((1, 28, 28))

    def kept(**kw):
        out = prune_structured(ck, "l1", data, ratio=0.8, scope="global", **kw)
        ch = out.history[-1]["channels"]
        assert sum(a for _, a in ch.values()) == 226 - round(0.8 * 226)
        return {n: a for n, (_, a) in ch.items()}

    uncapped = kept(max_layer_ratio=1.0)
    assert uncapped["fc1"] < 12  # plain L1 ranking strips the widest layer (the failure mode)
    auto = kept()  # default cap: halfway between 0.8 and 1 -> at most 90% of a layer
    assert auto["fc1"] >= 12 and auto["fc2"] >= 84 - int(0.9 * 84 + 1e-9)
    fixed = kept(max_layer_ratio=0.85)
    assert fixed["fc1"] >= 18 and fixed["fc2"] >= 13
    sizes = {"conv1": 6, "conv2": 16, "fc1": 120, "fc2": 84}
    for norm in ("mean", "max"):
        k = kept(norm=norm)
        assert all(k[n] >= n0 - int(0.9 * n0 + 1e-9) for n, n0 in sizes.items())
    # a cap below the target is raised to it: every layer loses 80% (rounded down), and the
    # 2 channels still missing come from beyond the cap, lowest scores first
    tight = kept(max_layer_ratio=0.1)
    assert sum(max(0, n0 - int(0.8 * n0 + 1e-9) - tight[n]) for n, n0 in sizes.items()) == 2


@pytest.mark.slow
def test_iterative_steps_and_macs_target():
    ck = _ckpt("lenet5", {}, (1, 28, 28))
    data = _fake_train((1, 28, 28))
    out = prune_structured(ck, "l1", data, ratio=0.5, scope="layer", steps=2,
                           finetune_epochs=0.5)
    assert [s["fraction"] for s in out.history[-1]["schedule"]] == [0.25, 0.5]
    assert out.model.fc1.out_features == 60
    assert [h["stage"] for h in out.history] == ["prune_structured"]
    macs0 = count_macs(ck.model, (1, 28, 28))
    m = prune_structured(ck, "l1", data, macs_ratio=0.4, scope="global")
    cut = 1 - count_macs(m.model, (1, 28, 28)) / macs0
    assert 0.4 <= cut < 0.5
    with pytest.raises(XaiCompressError, match="--macs-ratio 0.99: unreachable"):
        prune_structured(ck, "l1", data, macs_ratio=0.99, min_channels=4)


@pytest.mark.slow
def test_torch_pruning_importances_go_through_the_same_pruner():
    ck = _ckpt("resnet20", {"width": 0.5}, (3, 32, 32))
    data = _fake_train((3, 32, 32))
    for crit in ("tp:magnitude", "tp:taylor"):
        out = prune_structured(ck, crit, data, ratio=0.5, scope="layer", samples=32)
        assert out.model.conv1.out_channels == 4
        assert out.history[-1]["criterion"].startswith("tp.Group")
        assert all(p.grad is None for p in out.model.parameters())


@pytest.mark.slow
def test_trained_model_still_predicts_after_pruning(mnist):
    ck = _ckpt("lenet5", {}, (1, 28, 28))
    train(ck.model, subset(mnist.train, 2000, seed=0), epochs=2, lr=3e-3, seed=0)
    base = accuracy(ck.model, mnist.test)
    out = prune_structured(ck, "l1", mnist, ratio=0.3, scope="layer", finetune_epochs=0.5)
    assert base > 85
    assert accuracy(out.model, mnist.test) > base - 5
    assert count_params(out.model) < 0.6 * count_params(ck.model)


@pytest.mark.parametrize("kw,msg", [
    ({"ratio": 1.0}, "--ratio 1.0"), ({"ratio": -0.1}, "--ratio -0.1"),
    ({"scope": "net"}, "--scope 'net'"), ({"steps": 0}, "--steps 0"),
    ({"min_channels": 0}, "--min-channels 0"), ({"samples": 0}, "--samples 0"),
    ({"finetune_epochs": -1}, "--finetune-epochs -1"), ({"norm": "l2"}, "--norm 'l2'"),
    ({"macs_ratio": 1.5}, "--macs-ratio 1.5"), ({"max_layer_ratio": 0.0}, "--max-layer-ratio 0"),
])
def test_bad_options_are_clear_errors(kw, msg):
    ck = _ckpt("lenet5", {}, (1, 28, 28))
    with pytest.raises(XaiCompressError, match=msg):
        prune_structured(ck, "l1", _fake_train((1, 28, 28)), **kw)
    with pytest.raises(XaiCompressError, match="unknown criterion"):
        prune_structured(ck, "nonsense", _fake_train((1, 28, 28)))


def test_refuses_after_unstructured_masks():
    ck = _ckpt("lenet5", {}, (1, 28, 28))
    ck.state.get("fc1").mask = Mask(torch.ones_like(ck.model.fc1.weight, dtype=torch.bool))
    with pytest.raises(XaiCompressError, match="must come before unstructured"):
        prune_structured(ck, "l1", _fake_train((1, 28, 28)))


@pytest.mark.slow
def test_cli_structured(run_cli, tmp_path):
    ck = _ckpt("lenet5", {}, (1, 28, 28))
    ck.data = "mnist5k"
    src = save_checkpoint(ck, tmp_path / "in.safetensors")
    out = tmp_path / "out.safetensors"
    code, stdout, err = run_cli("prune", src, "--criterion", "l1", "--structured", "--ratio",
                                "0.5", "--scope", "layer", "--seed", "0", "--out", out)
    assert code == 0, err
    for row in ("accuracy", "nonzero_params", "macs", "size_bytes", "latency_ms"):
        assert row in stdout
    from xaicompress.checkpoint import load_checkpoint
    assert load_checkpoint(out).model.conv2.out_channels == 8
    for args, msg in [(("--structured", "--unstructured", "--ratio", "0.5"), "exactly one"),
                      (("--structured", "--ratio", "0.5", "--layers", "all"), "--layers"),
                      (("--structured", "--ratio", "1.5"), "--ratio 1.5"),
                      (("--structured", "--macs-ratio", "0.3", "--ratio", "0.5"),
                       "give either --ratio or --macs-ratio"),
                      (("--unstructured", "--ratio", "0.5", "--steps", "2"), "--steps"),
                      (("--unstructured", "--ratio", "0.5", "--macs-ratio", "0.3"),
                       "--macs-ratio"),
                      (("--structured", "--ratio", "0.5", "--norm", "none"), "--norm 'none'")]:
        code, _, err = run_cli("prune", src, "--criterion", "l1", *args, "--out", out)
        assert code == 2 and msg in err, err
