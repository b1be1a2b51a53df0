"""taylor, gradxact and activation criteria against hand computations."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from xaicompress.relevance import get_criterion, list_criteria, prunable_layers


def _data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 36, 3)).eval()


def _loader(x, y, batch=5):
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def test_all_criteria_registered():
    assert {"deeplift", "taylor", "gradxact", "activation", "l1", "random"} <= set(
        list_criteria())


def test_gradxact_equals_deeplift_on_a_linear_model():
    """Without nonlinearities and biases, DeepLIFT against a zero input is grad x act."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.Flatten(),
                      nn.Linear(3 * 16, 3, bias=False)).eval()
    x, y = _data()
    g = get_criterion("gradxact").score(m, _loader(x, y))
    d = get_criterion("deeplift", pixel_mean=(0.0, 0.0), pixel_std=(1.0, 1.0)).score(
        m, _loader(x, y))
    for k in g.units:
        torch.testing.assert_close(g.units[k], d.units[k], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(g.weights[k], d.weights[k], rtol=1e-4, atol=1e-7)


def test_taylor_matches_autograd():
    m = _model()
    x, y = _data()
    rel = get_criterion("taylor").score(m, _loader(x, y))
    # units: mean_n |mean_p z * dL_n/dz|
    conv = m[0]
    z = conv(x).detach().requires_grad_(True)
    loss = F.cross_entropy(m[1:](z), y, reduction="sum")
    (gz,) = torch.autograd.grad(loss, z)
    expect = (z * gz).mean((2, 3)).abs().mean(0).detach()
    torch.testing.assert_close(rel.units["0"], expect, rtol=1e-4, atol=1e-8)
    # weights: |w * d(mean loss)/dw|
    m.zero_grad()
    F.cross_entropy(m(x), y).backward()
    torch.testing.assert_close(rel.weights["4"], (m[4].weight * m[4].weight.grad).abs().detach(),
                               rtol=1e-4, atol=1e-9)
    assert all(p.requires_grad for p in m.parameters())


def test_gradxact_targets_and_signed():
    m = _model()
    x, y = _data()
    true = get_criterion("gradxact").score(m, _loader(x, y))
    z = m[0](x).detach().requires_grad_(True)
    out = m[1:](z)
    (gz,) = torch.autograd.grad(out.gather(1, y.view(-1, 1)).sum(), z)
    torch.testing.assert_close(true.units["0"], (z * gz).sum((2, 3)).abs().mean(0).detach(),
                               rtol=1e-4, atol=1e-7)
    signed = get_criterion("gradxact:aggregate=signed,target=pred").score(m, _loader(x, y))
    assert (signed.units["4"] < 0).any() or (signed.units["0"] < 0).any()
    assert signed.meta["target"] == "pred"


def test_activation_reads_post_relu_and_weights_rms():
    m = _model()
    x, y = _data()
    rel = get_criterion("activation").score(m, _loader(x, y, batch=4))
    assert rel.meta["points"]["0"] == "2"  # conv -> bn -> relu
    with torch.no_grad():
        a = m[:3](x)
        torch.testing.assert_close(rel.units["0"], a.abs().mean((0, 2, 3)), rtol=1e-5,
                                   atol=1e-7)
        rms = x.pow(2).mean((0, 2, 3)).sqrt()
        torch.testing.assert_close(rel.weights["0"], m[0].weight.abs() * rms.view(1, 2, 1, 1),
                                   rtol=1e-5, atol=1e-7)
        h = m[:4](x)
        torch.testing.assert_close(rel.weights["4"], m[4].weight.abs() * h.pow(2).mean(0).sqrt(),
                                   rtol=1e-5, atol=1e-7)


def _vision(source, name):
    from xaicompress.models.vision_import import import_timm, import_torchvision

    torch.manual_seed(0)
    if source == "torchvision":
        return import_torchvision().models.get_model(name, weights=None, num_classes=5).eval()
    return import_timm().create_model(name, pretrained=False, num_classes=5).eval()


@pytest.mark.slow
@pytest.mark.parametrize("source,name", [
    ("torchvision", "mobilenet_v3_small"),  # depthwise convs, squeeze-excitation, Hardswish
    ("torchvision", "shufflenet_v2_x0_5"),  # grouped convs and a channel shuffle
    ("torchvision", "squeezenet1_1"),       # ReLU(inplace=True) straight after each conv
    ("timm", "tf_efficientnet_lite0"),      # Conv2dSame: TensorFlow "same" padding in forward
    ("timm", "efficientvit_b0"),            # LiteMLA: torch.fx cannot trace it
])
def test_gradient_criteria_work_on_vision_models(source, name):
    m = _vision(source, name)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 5, (6,), generator=g)
    taylor = get_criterion("taylor").score(m, _loader(x, y, batch=3))
    m.zero_grad()
    F.cross_entropy(m(x), y).backward()  # Taylor's weight score: |w * d(mean loss)/dw|
    layers = prunable_layers(m)
    for n, layer in layers.items():
        expect = (layer.weight * layer.weight.grad).abs().detach()
        torch.testing.assert_close(taylor.weights[n], expect, rtol=1e-3, atol=1e-6 * float(
            expect.abs().max()))
    m.zero_grad()
    for spec in ("gradxact", "activation"):
        rel = get_criterion(spec).score(m, _loader(x, y, batch=3))
        assert set(rel.units) == set(layers) == set(rel.weights)
        for n, layer in layers.items():
            assert rel.units[n].shape == (layer.weight.shape[0],)
            assert rel.weights[n].shape == layer.weight.shape
            assert torch.isfinite(rel.weights[n]).all() and (rel.units[n] >= 0).all()
        assert rel.meta["samples"] == 6
