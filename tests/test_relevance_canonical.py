"""Canonicaliser: functional activations, reused modules, refused operations."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xaicompress.errors import XaiCompressError
from xaicompress.relevance.canonical import canonicalise
from xaicompress.relevance.deeplift import layer_attributions


class Functional(nn.Module):
    """ReLUs written three functional ways, a functional max-pool and a sigmoid."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.conv(x)), 2)
        x = F.relu(self.conv2(x)).relu()
        x = torch.sigmoid(x) + x * 0.5
        return self.fc(x.flatten(1))


class Reused(nn.Module):
    """One conv and one ReLU module called twice (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(3 * 6 * 6, 2)

    def forward(self, x):
        x = self.act(self.conv(x))
        x = self.act(self.conv(x))
        return self.fc(x.flatten(1))


def test_functional_activations_become_modules_and_delta_holds():
    torch.manual_seed(0)
    m = Functional().eval()
    canon = canonicalise(m)
    kinds = [type(mod).__name__ for mod in canon.module.modules()]
    assert kinds.count("ReLU") == 3 and "MaxPool2d" in kinds and "Sigmoid" in kinds
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(canon.module(x), m(x))
    ref = torch.zeros(1, 1, 8, 8)
    _, res = layer_attributions(m, x, ref, torch.tensor([0, 1, 2, 0, 1]))
    assert float(res.delta.abs().max()) < 1e-4 * float(res.delta_f.abs().mean())
    # Captum silently misses functional ReLUs: its delta is far off on the same model
    from captum.attr import DeepLift

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, delta = DeepLift(m).attribute(x, ref.expand_as(x), target=torch.tensor(
            [0, 1, 2, 0, 1]), return_convergence_delta=True)
    assert float(delta.abs().max()) > 100 * float(res.delta.abs().max())


def test_reused_modules_get_copies_mapped_to_original_names():
    torch.manual_seed(0)
    m = Reused().eval()
    canon = canonicalise(m)
    assert sorted(canon.names.values()) == ["conv", "conv", "fc"]
    assert "conv__use2" in canon.names
    assert m.act.inplace  # the caller's model is untouched
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(canon.module(x), m(x))
    layers, res = layer_attributions(m, x, torch.zeros(1, 3, 6, 6), torch.tensor([0, 1, 0, 1]))
    assert set(layers) == {"conv", "fc"}
    assert float(res.delta.abs().max()) < 1e-4 * float(res.delta_f.abs().mean())


class Softmaxed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.softmax(x.flatten(1), 1))


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc(x * torch.sigmoid(x))


class Exp(nn.Module):
    def forward(self, x):
        return x.flatten(1).exp()


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))


@pytest.mark.parametrize("model,word", [
    (Softmaxed(), "softmax"), (Gated(), "product of two activations"), (Exp(), "exp"),
    (nn.Sequential(nn.Flatten(), nn.Softmax(1)), "Softmax"),
    (nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten()), "AdaptiveMaxPool2d"),
    (Branchy(), "traced"),
])
def test_unsupported_operations_are_named(model, word):
    with pytest.raises(XaiCompressError, match=word):
        canonicalise(model.eval())


def test_constant_scaling_and_residual_adds_are_linear():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = nn.Linear(6, 3)

        def forward(self, x):
            h = x.flatten(1)
            return self.b(F.relu(self.a(h)) * 2.0 + h / 3)

    torch.manual_seed(0)
    _, res = layer_attributions(Res().eval(), torch.randn(4, 1, 2, 3), torch.zeros(1, 1, 2, 3),
                                "all")
    assert float(res.delta.abs().max()) < 1e-5
