"""Weight sharing: exactly k values per layer, relevance-weighted centroids, pruned zeros kept,
centroid fine-tuning with summed gradients, bit allocation, and the `share` command."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from xaicompress.checkpoint import Checkpoint, ModelSpec, load_checkpoint, save_checkpoint
from xaicompress.encoding import IntGrid, Mask
from xaicompress.errors import XaiCompressError
from xaicompress.export.packed import load_packed, packed_report
from xaicompress.quant.codebook import (
    cluster_weights,
    initial_centroids,
    layer_sample_weights,
    share_weights,
)
from xaicompress.quant.share_finetune import SharedWeight, centroid_lr, finetune_shared
from xaicompress.relevance import Criterion, Relevance, prunable_layers

SHAPE = (1, 28, 28)


def _ckpt(name: str = "lenet5", **kwargs) -> Checkpoint:
    torch.manual_seed(0)
    spec = ModelSpec(name, SHAPE, 10, kwargs)
    return Checkpoint(spec.build().eval(), spec, "mnist5k")


def _data(n: int = 96) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, *SHAPE, generator=g), torch.randint(0, 10, (n,),
                                                                          generator=g))


def _distinct(ck: Checkpoint) -> dict[str, int]:
    return {n: int(torch.unique(m.weight.detach()).numel())
            for n, m in prunable_layers(ck.model).items()}


@pytest.mark.parametrize("k,dtype", [(2, "fp16"), (5, "fp16"), (16, "fp32"), (64, "fp16")])
def test_shared_layer_holds_exactly_k_values(k, dtype):
    ck = _ckpt()
    before = {n: m.weight.detach().clone() for n, m in prunable_layers(ck.model).items()}
    sh = share_weights(ck, "none", None, clusters=k, codebook_dtype=dtype)
    assert _distinct(sh) == {n: k for n in before}
    for name, m in prunable_layers(sh.model).items():
        lc = sh.state.get(name).codebook
        assert lc.values.dtype == torch.float32 and lc.values.shape == (k,)
        assert lc.indices.dtype == torch.int64 and lc.indices.shape == m.weight.shape
        assert torch.equal(m.weight.detach(), lc.values[lc.indices])
        if dtype == "fp16":
            assert torch.equal(lc.values.half().float(), lc.values)
        # the input checkpoint is untouched
        assert torch.equal(prunable_layers(ck.model)[name].weight, before[name])
    assert sh.history[-1]["stage"] == "share" and not ck.state.layers


def test_fewer_distinct_weights_than_k():
    ck = _ckpt()
    with torch.no_grad():
        ck.model.fc3.weight.copy_(torch.tensor([-0.5, 0.0, 0.25]).repeat(280)[:840].reshape(
            10, 84))
    sh = share_weights(ck, "none", None, clusters=8)
    assert sorted(sh.state.get("fc3").codebook.values.tolist()) == [-0.5, 0.0, 0.25]
    assert torch.equal(sh.model.fc3.weight, ck.model.fc3.weight)


def test_relevance_weighting_moves_centroids_to_heavy_points():
    # Two groups: 0..9 spread out and a heavy pair at 9.0/9.1. Plain k-means with k=2 splits
    # the range in the middle; weighting the pair pulls the upper centroid onto it.
    values = np.concatenate([np.linspace(0, 9, 10), [9.0, 9.1]]).astype(np.float32)
    plain_w = np.ones_like(values, dtype=np.float64)
    heavy_w = plain_w.copy()
    heavy_w[-2:] = 100.0
    plain, _ = cluster_weights(values, plain_w, 2, codebook_dtype="fp32")
    heavy, _ = cluster_weights(values, heavy_w, 2, codebook_dtype="fp32")
    assert plain[1] < 8.0
    assert abs(heavy[1] - 9.05) < 0.2
    assert abs(heavy[1] - 9.05) < abs(plain[1] - 9.05)


class _LargeWeightsMatter(Criterion):
    """Relevance 1000 on every weight above 0.03, 1 elsewhere (a constructed criterion)."""

    name = "test-large"
    needs_data = False

    def score(self, model, loader=None):
        w = {n: torch.where(m.weight.detach() > 0.03, 1000.0, 1.0)
             for n, m in prunable_layers(model).items()}
        return Relevance(self.name, {n: v.sum(tuple(range(1, v.dim()))) for n, v in w.items()},
                         w)


def test_criterion_weights_the_clustering_of_a_model():
    ck = _ckpt()
    plain = share_weights(ck, "none", None, clusters=4)
    weighted = share_weights(ck, _LargeWeightsMatter(), None, clusters=4)
    w = ck.model.fc1.weight.detach()
    big = w[w > 0.03]

    def err(sh):
        return float(((sh.model.fc1.weight.detach()[w > 0.03] - big) ** 2).mean())

    assert err(weighted) < 0.5 * err(plain)
    assert weighted.history[-1]["criterion"] == "test-large"


def _pruned(ck: Checkpoint, frac: float = 0.7) -> Checkpoint:
    out = ck.copy()
    for name, m in prunable_layers(out.model).items():
        w = m.weight.detach().abs()
        out.state.get(name).mask = Mask(w > w.flatten().kthvalue(int(frac * w.numel())).values)
    out.state.apply(out.model)
    return out


def test_pruned_zeros_stay_zero_through_sharing_and_finetuning():
    pr = _pruned(_ckpt())
    sh = share_weights(pr, "l1", None, clusters=4)
    ft = finetune_shared(sh, _data(), epochs=1, lr=1e-3)
    for ck in (sh, ft):
        for name, m in prunable_layers(ck.model).items():
            lc = ck.state.get(name)
            w = m.weight.detach()
            assert torch.equal(lc.mask.keep, pr.state.get(name).mask.keep)
            assert (w[~lc.mask.keep] == 0).all()
            kept = torch.unique(w[lc.mask.keep])
            assert kept.numel() == 4 and (kept != 0).all()  # no cluster spent on the zeros
            assert torch.equal(w, lc.codebook.values[lc.codebook.indices] * lc.mask.keep)
    moved = [not torch.equal(sh.state.get(n).codebook.values, ft.state.get(n).codebook.values)
             for n in sh.state.layers]
    assert all(moved)
    assert ft.history[-1]["stage"] == "finetune_shared"


def test_centroid_gradient_is_the_sum_of_member_gradients():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 3)
    sh = share_weights(Checkpoint(lin, ModelSpec("lenet5", SHAPE, 10)), "none", None,
                       clusters=3, codebook_dtype="fp32")
    lc = sh.state.get("").codebook
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    plain = torch.nn.Linear(6, 3)
    with torch.no_grad():
        plain.weight.copy_(lc.values[lc.indices])
        plain.bias.copy_(sh.model.bias)
    F.cross_entropy(plain(x), y).backward()
    expected = torch.zeros(3).index_add_(0, lc.indices.reshape(-1), plain.weight.grad.reshape(-1))
    param = SharedWeight(lc.values, lc.indices, torch.ones(3, 6))
    w = param(plain.weight)
    F.cross_entropy(F.linear(x, w, plain.bias.detach()), y).backward()
    assert torch.allclose(param.codebook.grad, expected, atol=1e-6)


def test_finetuning_trains_centroids_and_keeps_outputs_consistent(tmp_path):
    sh = share_weights(_ckpt(), "none", None, clusters=8)
    data = _data()
    ft = finetune_shared(sh, data, epochs=2, lr=3e-3)
    x, y = data.tensors

    def loss(ck):
        with torch.no_grad():
            return float(F.cross_entropy(ck.model(x), y))

    assert loss(ft) < loss(sh)
    assert _distinct(ft) == _distinct(sh)  # indices fixed: still 8 values per layer
    for name, lc in ft.state.layers.items():
        assert torch.equal(lc.codebook.indices, sh.state.get(name).codebook.indices)
    # no parametrisation is left behind and the packed file reproduces the model
    assert not any("parametrizations" in k for k in ft.model.state_dict())
    assert all(p.requires_grad for p in ft.model.parameters())  # trainable for later stages
    from xaicompress.export.packed import write_packed

    write_packed(ft, tmp_path / "ft.xcpk")
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "ft.xcpk").model(x), ft.model(x))


def test_avg_bits_allocates_cluster_counts_within_budget():
    sh = share_weights(_ckpt(), "l1", None, avg_bits=3)
    h = sh.history[-1]
    assert h["used_bits"] <= h["budget_bits"]
    for name, b in h["allocated_bits"].items():
        assert 1 <= b <= 8
        assert sh.state.get(name).codebook.k == 2 ** b
    rep = packed_report(sh)
    # the allocation's budget is the size of 3 bits everywhere (indices + fp16 codebooks)
    assert rep.parts_bits["indices"] + rep.parts_bits["codebook"] <= h["budget_bits"]


def test_resnet_and_vgg_share():
    for name, kw in (("resnet20", {"width": 0.5}), ("vgg11", {"width": 0.125})):
        sh = share_weights(_ckpt(name, **kw), "none", None, clusters=4)
        assert set(_distinct(sh).values()) == {4}


def test_user_errors():
    ck = _ckpt()
    with pytest.raises(XaiCompressError, match="exactly one"):
        share_weights(ck, "none", None)
    with pytest.raises(XaiCompressError, match="exactly one"):
        share_weights(ck, "none", None, clusters=4, avg_bits=3)
    with pytest.raises(XaiCompressError, match="--clusters 1"):
        share_weights(ck, "none", None, clusters=1)
    with pytest.raises(XaiCompressError, match="--clusters 300"):
        share_weights(ck, "none", None, clusters=300)
    with pytest.raises(XaiCompressError, match="unknown layers"):
        share_weights(ck, "none", None, clusters={"nope": 4})
    with pytest.raises(XaiCompressError, match="--avg-bits"):
        share_weights(ck, "none", None, avg_bits=12)
    with pytest.raises(XaiCompressError, match="--codebook"):
        share_weights(ck, "none", None, clusters=4, codebook_dtype="int8")
    with pytest.raises(XaiCompressError, match="criterion 'nonsense'"):
        share_weights(ck, "nonsense", None, clusters=4)
    q = ck.copy()
    q.state.get("fc1").weights = IntGrid(4, torch.ones(120))
    with pytest.raises(XaiCompressError, match="integer-quantized"):
        share_weights(q, "none", None, clusters=4)
    with pytest.raises(XaiCompressError, match="no shared layers"):
        finetune_shared(ck, _data(), epochs=1)


def test_share_cli(run_cli, tmp_path):
    ck = _ckpt()
    src = tmp_path / "base.safetensors"
    save_checkpoint(ck, src)
    out, packed = tmp_path / "shared.safetensors", tmp_path / "shared.xcpk"
    code, stdout, err = run_cli("share", src, "--data", "mnist5k", "--criterion", "l1",
                                "--clusters", "4", "--samples", "32", "--seed", "0",
                                "--out", out, "--packed", packed)
    assert code == 0, err
    assert "fc1" in stdout and "accuracy" in stdout
    saved = load_checkpoint(out)
    assert _distinct(saved) == {n: 4 for n in _distinct(saved)}
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        assert torch.equal(load_packed(packed).model(x), saved.model(x))

    code, _, err = run_cli("share", src, "--data", "mnist5k", "--criterion", "none",
                           "--out", out)
    assert code == 2 and "--clusters" in err and "Traceback" not in err
    code, _, err = run_cli("share", tmp_path / "missing.safetensors", "--data", "mnist5k",
                           "--criterion", "none", "--clusters", "4", "--out", out)
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli("share", src, "--data", "mnist5k", "--criterion", "none",
                           "--clusters", "4", "--out", tmp_path / "no" / "x.safetensors")
    assert code == 2 and "does not exist" in err


@pytest.mark.parametrize("init", ["linear", "quantile", "kmeans++"])
def test_initialisations_give_k_sorted_centroids_in_range(init):
    rng = np.random.default_rng(0)
    # skewed: a dense bulk near 0 and a thin tail up to 5
    v = np.concatenate([rng.normal(0, 0.1, 900), rng.uniform(1, 5, 100)]).astype(np.float32)
    sw = np.ones(v.size)
    c0 = initial_centroids(v, sw, 4, init, seed=0)
    assert c0.shape == (4,) and np.all(np.diff(c0) >= 0)
    assert v.min() <= c0.min() and c0.max() <= v.max()
    if init == "linear":
        assert np.allclose(c0, np.linspace(v.min(), v.max(), 4))
    if init == "quantile":
        assert (np.abs(c0) < 0.5).sum() >= 3  # density init puts most centroids in the bulk
    assert np.array_equal(c0, initial_centroids(v, sw, 4, init, seed=0))
    cb, labels = cluster_weights(v, sw, 4, codebook_dtype="fp32", init=init)
    assert cb.shape == (4,) and len(np.unique(labels)) == 4


def test_sample_weight_shaping():
    keep = np.ones(6, dtype=bool)
    r = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 50.0]])
    rel = Relevance("x", {"l": r.sum(1)}, {"l": r})
    w1 = layer_sample_weights(rel, "l", (2, 3), keep)
    assert np.isclose(w1.mean(), 1.0) and np.isclose(w1[5] / w1[4], 12.5)
    half = layer_sample_weights(rel, "l", (2, 3), keep, power=0.5)
    assert np.isclose(half.mean(), 1.0) and np.isclose(half[5] / half[4], 12.5 ** 0.5)
    assert np.allclose(layer_sample_weights(rel, "l", (2, 3), keep, mix=1.0), 1.0)
    mixed = layer_sample_weights(rel, "l", (2, 3), keep, mix=0.5)
    assert np.allclose(mixed, 0.5 * w1 + 0.5, atol=1e-6)
    assert np.allclose(layer_sample_weights(None, "l", (2, 3), keep), 1.0)


def test_centroid_lr_follows_the_layer_spread():
    w = torch.randn(50, 20, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(50, 20, generator=torch.Generator().manual_seed(1)) > 0.5
    assert np.isclose(centroid_lr(10 * w, mask), 10 * centroid_lr(w, mask), rtol=1e-5)
    assert np.isclose(centroid_lr(w, None, scale=0.1), 0.1 * float(w.std()), rtol=1e-5)


def test_keep_best_never_returns_a_worse_training_loss():
    sh = share_weights(_ckpt(), "none", None, clusters=4)
    data = _data()
    x, y = data.tensors

    def loss(ck):
        with torch.no_grad():
            return float(F.cross_entropy(ck.model(x), y))

    # A learning rate of 50 wrecks every parameter; the start state is kept instead.
    ft = finetune_shared(sh, data, epochs=1, lr=50.0, clip=None)
    h = ft.history[-1]
    assert h["kept_step"] == 0 and loss(ft) <= loss(sh) + 1e-6
    wild = finetune_shared(sh, data, epochs=1, lr=50.0, clip=None, keep_best=False)
    assert not loss(wild) <= loss(sh)  # without the guard it is worse (or NaN -> error)
    good = finetune_shared(sh, data, epochs=2)
    h = good.history[-1]
    assert len(h["train_loss"]) == 3  # start, after epoch 1, after epoch 2
    assert h["kept_step"] > 0 and loss(good) < loss(sh)
    # the state kept is the best one seen (up to the final fp16 rounding of the codebooks)
    assert np.isclose(loss(good), min(h["train_loss"]), rtol=1e-2)


def test_the_best_finetuning_state_is_chosen_on_the_validation_split():
    """Given a validation set, the state kept is the one of lowest validation loss, not
    training loss: from a model fitted to validation labels that disagree with every
    training label, each step of training makes the validation loss worse, so the start
    is kept, where the training loss keeps a later state."""
    from types import SimpleNamespace

    data = _data(64)
    x, y = data.tensors
    val = TensorDataset(x, (y + 1) % 10)
    start = finetune_shared(share_weights(_ckpt(), "none", None, clusters=4), val, epochs=4,
                            keep_best=False)

    def loss(ck, labels):
        with torch.no_grad():
            return float(F.cross_entropy(ck.model(x), labels))

    by_train = finetune_shared(start, data, epochs=2)
    assert by_train.history[-1]["best_by"] == "train_loss"
    assert by_train.history[-1]["kept_step"] > 0 and loss(by_train, y) < loss(start, y)
    assert loss(by_train, (y + 1) % 10) > loss(start, (y + 1) % 10)  # worse on validation
    by_val = finetune_shared(start, data, epochs=2, val_set=val)
    h = by_val.history[-1]
    assert h["best_by"] == "val_loss" and len(h["val_loss"]) == 3 and "train_loss" not in h
    assert h["kept_step"] == 0 and np.isclose(h["val_loss"][0], min(h["val_loss"]))
    assert np.isclose(loss(by_val, (y + 1) % 10), loss(start, (y + 1) % 10), rtol=1e-3)
    # the share step passes the bundle's validation split on
    bundle = SimpleNamespace(train=data, val=val)
    step = share_weights(_ckpt(), "none", bundle, clusters=4, finetune_epochs=1)
    assert step.history[-1]["best_by"] == "val_loss" and len(step.history[-1]["val_loss"]) == 2


def test_sharing_and_finetuning_option_errors():
    ck = _ckpt()
    with pytest.raises(XaiCompressError, match="--init"):
        share_weights(ck, "none", None, clusters=4, init="random")
    with pytest.raises(XaiCompressError, match="power"):
        share_weights(ck, "l1", None, clusters=4, weight_power=0)
    with pytest.raises(XaiCompressError, match="mix"):
        share_weights(ck, "l1", None, clusters=4, uniform_mix=1.5)
    sh = share_weights(ck, "none", None, clusters=4)
    with pytest.raises(XaiCompressError, match="--lr"):
        finetune_shared(sh, _data(), lr=-1.0)
    with pytest.raises(XaiCompressError, match="other_lr"):
        finetune_shared(sh, _data(), other_lr=float("nan"))
    with pytest.raises(XaiCompressError, match="fc1"):
        finetune_shared(sh, _data(), centroid_lrs={"fc1": 0.0})
