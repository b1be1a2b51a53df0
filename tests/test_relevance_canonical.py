"""Canonicaliser: functional activations, reused modules, shape bookkeeping, refusals that
name the module the user wrote."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xaicompress.errors import XaiCompressError
from xaicompress.relevance.canonical import canonicalise
from xaicompress.relevance.engine import layer_attributions
from xaicompress.relevance.rules import Elementwise


def _delta(model, shape, target="all", **options):
    torch.manual_seed(0)
    x = torch.randn(5, *shape, dtype=torch.float64)
    ref = torch.zeros(1, *shape, dtype=torch.float64)
    _, res = layer_attributions(model.double().eval(), x, ref, target, **options)
    return float(res.delta.abs().max()), float(res.delta_f.abs().mean())


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
    fns = [mod.fn for mod in canon.module.modules() if isinstance(mod, Elementwise)]
    assert fns.count(torch.relu) == 3 and torch.sigmoid in fns
    assert any(isinstance(mod, nn.MaxPool2d) for mod in canon.module.modules())
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


def test_reused_modules_get_call_sites_mapped_to_original_names_and_model_is_shared():
    torch.manual_seed(0)
    m = Reused().eval()
    canon = canonicalise(m)
    assert sorted(canon.layers.values()) == ["conv", "conv", "fc"]
    assert "conv__use2" in canon.layers
    assert m.act.inplace  # the caller's model is untouched
    # no copy of the weights: the trace holds the model's own parameters
    assert canon.module.get_submodule("conv__use2").weight is m.conv.weight
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(canon.module(x), m(x))
    layers, res = layer_attributions(m, x, torch.zeros(1, 3, 6, 6), torch.tensor([0, 1, 0, 1]))
    assert set(layers) == {"conv", "fc"}
    assert float(res.delta.abs().max()) < 1e-4 * float(res.delta_f.abs().mean())


class Shuffle(nn.Module):
    """shufflenet's channel shuffle (sizes, floordiv, view, transpose), chunk, cat, split,
    permute, indexing and flatten: all linear bookkeeping."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 1)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        x = F.relu(self.a(x))
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        x1, x2 = x.chunk(2, dim=1)
        x = torch.cat((x1, F.relu(self.b(x2))), dim=1)
        p, q = torch.split(x, [1, 3], dim=1)
        x = torch.cat([q, p], 1).permute(0, 2, 3, 1)[:, :, :, :4]
        return self.fc(torch.flatten(x.permute(0, 3, 1, 2), 1))


class Products(nn.Module):
    """Squeeze-excitation (x * gate), SiLU written as x * sigmoid(x), a division by a
    signal, x ** 2 and exp: products of two signals and elementwise functions."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.se1, self.se2 = nn.Conv2d(4, 2, 1), nn.Conv2d(2, 4, 1)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        x = self.conv(x)
        gate = torch.sigmoid(self.se2(F.relu(self.se1(x.mean((2, 3), keepdim=True)))))
        x = x * gate
        x = x * torch.sigmoid(x) + x / (1.5 + x.pow(2)) + 0.1 * torch.exp(-x.abs())
        return self.fc(x.flatten(1))


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        x = F.gelu(self.gn(self.conv(x)))
        x = self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # channels-last LayerNorm
        x = F.layer_norm(x, (4, 5, 5))                            # functional, no affine
        return self.fc(F.adaptive_max_pool2d(x, 5).flatten(1))


@pytest.mark.parametrize("model", [Shuffle(), Products(), Norms()])
def test_modern_operations_are_exact(model):
    delta, df = _delta(model, (2, 5, 5))
    assert delta <= 1e-10 * df, (delta, df)


def test_layernorm_constant_statistics_rule_reports_its_delta():
    torch.manual_seed(0)
    model = Norms()
    for m in model.modules():  # non-zero biases: reference rows have their own variance
        if isinstance(m, nn.Conv2d):
            m.bias.data.uniform_(-1, 1)
    delta, df = _delta(model, (2, 5, 5), layernorm="constant")
    assert delta > 1e-3 * df  # statistics held constant: a real, reported delta
    exact, _ = _delta(model, (2, 5, 5))
    assert exact <= 1e-10 * df


class Softmaxed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.softmax(x.flatten(1), 1))


class Gate(nn.Module):
    def forward(self, x):
        return x * torch.softmax(x, 1)


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), Gate())
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.block(x.flatten(1)))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))


class Indexed(nn.Module):
    def forward(self, x):
        x = x.flatten(1)
        return x[:, x.argmax(1)]


@pytest.mark.parametrize("model,words", [
    (Softmaxed(), ["Softmaxed.forward", "softmax", "register_rule", "gradient criterion"]),
    (Nested(), ["block.1 (Gate)", "softmax", "register a rule for Gate"]),
    (nn.Sequential(nn.Flatten(), nn.Softmax(1)), ["1 (Softmax)", "module type Softmax"]),
    (nn.Sequential(nn.Flatten(), nn.MultiheadAttention(4, 1)), ["MultiheadAttention"]),
    (Branchy(), ["cannot be traced", "Branchy"]),
    (Indexed(), ["argmax"]),
])
def test_unsupported_operations_name_the_module_and_what_to_do(model, words):
    with pytest.raises(XaiCompressError) as err:
        canonicalise(model.eval())
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_constant_scaling_and_residual_adds_are_linear():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = nn.Linear(6, 3)

        def forward(self, x):
            h = x.flatten(1)
            return self.b(F.relu(self.a(h)) * 2.0 + h / 3)

    delta, df = _delta(Res(), (1, 2, 3))
    assert delta < 1e-12 * max(df, 1.0)


class SizeBranch(nn.Module):
    """Control flow on sizes (timm's ConvMlp pools only when the map is large enough)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 2 * 2, 2)

    def forward(self, x):
        x = F.relu(self.conv(x))
        if x.shape[-1] > 2:
            x = F.adaptive_avg_pool2d(x, 2)
        return self.fc(x.flatten(1))


def test_control_flow_on_sizes_is_traced_on_the_reference():
    from xaicompress.relevance.engine import DeepLiftEngine

    with pytest.raises(XaiCompressError, match="cannot be traced"):
        canonicalise(SizeBranch().eval())  # no example input: plain symbolic tracing
    torch.manual_seed(0)
    m = SizeBranch().double().eval()
    canon = canonicalise(m, torch.zeros(1, 2, 6, 6, dtype=torch.float64))
    assert canon.shape == (2, 6, 6)
    delta, df = _delta(m, (2, 6, 6))
    assert delta <= 1e-12 * df
    engine = DeepLiftEngine(m)
    engine.set_reference(torch.zeros(1, 2, 6, 6, dtype=torch.float64))
    with pytest.raises(XaiCompressError, match="traced for"):
        engine.attribute(torch.zeros(2, 2, 5, 5, dtype=torch.float64), "all")
    with pytest.raises(XaiCompressError, match="cannot be traced"):
        canonicalise(Branchy().eval(), torch.zeros(1, 1, 2, 2))  # values, not sizes
