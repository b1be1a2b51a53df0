"""Captum 0.9 `LayerDeepLift` (Rescale) against our all-layer engine, layer by layer."""

import warnings

import pytest
import torch

from tests.test_relevance_deeplift import MODELS, _model
from xaicompress.relevance import prunable_layers
from xaicompress.relevance.deeplift import layer_attributions


def _captum_layers(model, x, ref, y):
    from captum.attr import LayerDeepLift

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, layer in prunable_layers(model).items():
            out[name] = LayerDeepLift(model, layer).attribute(
                x, baselines=ref.expand_as(x), target=y).detach()
    return out


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("name,shape,kw", [pytest.param(*m, marks=pytest.mark.slow)
                                            if m[0] == "resnet20" else m for m in MODELS])
def test_layers_match_captum_layerdeeplift(name, shape, kw):
    m = _model(name, shape, kw)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    ref = torch.full((1, *shape), -0.4, dtype=torch.float64)
    y = torch.tensor([0, 3, 9])
    # Captum 0.9 lets an activation that feeds a max-pool read the pool's plain gradient
    # (hook order); maxpool="captum" reproduces that, the default keeps summation-to-delta.
    ours, _ = layer_attributions(m, x, ref, y, maxpool="captum")
    theirs = _captum_layers(m, x, ref, y)
    assert set(ours) == set(theirs)
    for layer in theirs:
        assert _rel_err(ours[layer], theirs[layer]) < 1e-5, layer
    if name == "resnet20":  # no max-pool: the default rule is Captum's exactly
        default, _ = layer_attributions(m, x, ref, y)
        for layer in theirs:
            assert _rel_err(default[layer], theirs[layer]) < 1e-5, layer


