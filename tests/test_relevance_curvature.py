"""The second-order criteria: Hutchinson's Hessian estimate and the empirical Fisher agree
with autograd computed the slow way, and plug into the steps like any criterion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from xaicompress.errors import XaiCompressError
from xaicompress.relevance import compute_relevance, get_criterion, list_criteria
from xaicompress.relevance.curvature import per_sample_square_sum


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 2, 6, 6, generator=g),
                         torch.randint(0, 3, (n,), generator=g))


def test_registered():
    assert {"hessian", "fisher"} <= set(list_criteria())
    with pytest.raises(XaiCompressError, match="per="):
        get_criterion("hessian:per=bogus")
    with pytest.raises(XaiCompressError, match="probes"):
        get_criterion("hessian:probes=0")


def test_per_sample_square_sum_matches_a_loop_over_samples():
    torch.manual_seed(0)
    net = Net()
    data = _data(10)
    x, y = data.tensors
    want = {n: torch.zeros_like(m.weight) for n, m in (("conv", net.conv), ("fc", net.fc))}
    for i in range(len(x)):
        net.zero_grad()
        F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]).backward()
        for n, m in (("conv", net.conv), ("fc", net.fc)):
            want[n] += m.weight.grad ** 2
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: seen.__setitem__(n, (a[0], out)))
             for n, m in (("conv", net.conv), ("fc", net.fc))]
    logits = net(x)
    for h in hooks:
        h.remove()
    outs = [seen[n][1] for n in ("conv", "fc")]
    grads = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), outs)
    for (n, m), g in zip((("conv", net.conv), ("fc", net.fc)), grads, strict=True):
        got = per_sample_square_sum(m, seen[n][0].detach(), g)
        assert torch.allclose(got, want[n], rtol=1e-4, atol=1e-6), n


def test_fisher_scores_are_the_mean_squared_gradient_times_half_w2():
    torch.manual_seed(0)
    net = Net().eval()
    data = _data(16)
    x, y = data.tensors
    sq = torch.zeros_like(net.fc.weight)
    for i in range(len(x)):
        net.zero_grad()
        F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]).backward()
        sq += net.fc.weight.grad ** 2
    rel = compute_relevance(net, get_criterion("fisher"), data, samples=16)
    want = 0.5 * (sq / 16) * net.fc.weight.detach() ** 2
    assert torch.allclose(rel.weights["fc"], want, rtol=1e-4, atol=1e-8)
    curv = compute_relevance(net, get_criterion("fisher:score=curvature"), data, samples=16)
    assert torch.allclose(curv.weights["fc"], sq / 16, rtol=1e-4, atol=1e-8)
    assert rel.units["fc"].shape == (3,) and (rel.units["fc"] >= 0).all()


@pytest.mark.slow
def test_hutchinson_trace_is_close_to_the_exact_hessian_trace():
    torch.manual_seed(0)
    net = Net().eval()
    data = _data(8)
    x, y = data.tensors
    w0 = net.fc.weight.detach().clone()

    def loss_of(w):
        h = torch.tanh(net.conv(x)).flatten(1)
        return F.cross_entropy(F.linear(h, w, net.fc.bias), y)

    exact = torch.autograd.functional.hessian(loss_of, w0).reshape(w0.numel(), -1).diagonal()
    crit = get_criterion("hessian:probes=64,score=curvature,per=layer,seed=3")
    # the same 8 images 16 times: 1,024 probes of the same Hessian
    repeated = TensorDataset(x.repeat(16, 1, 1, 1), y.repeat(16))
    rel = crit.score(net, DataLoader(repeated, batch_size=8), need=None)
    assert float(rel.weights["fc"].mean()) == pytest.approx(float(exact.mean()), rel=0.1)
    assert float(rel.weights["fc"].std()) == 0.0  # per=layer: one value per layer
    diag = get_criterion("hessian:probes=64,score=curvature,per=weight,seed=3").score(
        net, DataLoader(repeated, batch_size=8))
    assert torch.corrcoef(torch.stack([diag.weights["fc"].flatten(),
                                       exact.clamp(min=0)]))[0, 1] > 0.8


@pytest.mark.slow
def test_curvature_criteria_drive_the_bit_allocation():
    from xaicompress.checkpoint import Checkpoint, ModelSpec
    from xaicompress.quant.integer import quantize

    torch.manual_seed(0)
    spec = ModelSpec("lenet5", (1, 8, 8), 10)
    ck = Checkpoint(spec.build().eval(), spec, None)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8, generator=g),
                         torch.randint(0, 10, (64,), generator=g))
    for spec_ in ("hessian:score=curvature", "fisher:score=curvature"):
        q = quantize(ck, spec_, data, avg_bits=3, samples=64)
        bits = q.history[-1]["bits"]
        assert set(bits) == {"conv1", "conv2", "fc1", "fc2", "fc3"}
        assert q.history[-1]["criterion"].startswith(spec_.split(":")[0])
