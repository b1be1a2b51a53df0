"""The criterion contract: declared capabilities, the accumulating base class, `need`,
the registry (no silent overwrite, checked options, default seeds) and user rules."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from xaicompress.errors import XaiCompressError
from xaicompress.relevance import (
    AccumulatingCriterion,
    Criterion,
    CriterionError,
    Relevance,
    Rescale,
    compute_relevance,
    get_criterion,
    prunable_layers,
    register_criterion,
    register_rule,
)
from xaicompress.relevance.engine import layer_attributions
from xaicompress.relevance.registry import _CRITERIA
from xaicompress.relevance.rules import _RULES


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 2)).eval()


def _loader(n=10, batch=4):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 1, 4, 4, generator=g),
                                    torch.randint(0, 2, (n,), generator=g)), batch_size=batch)


class MeanAbsInput(AccumulatingCriterion):
    """A user criterion: mean |input| per layer input channel, written as one batch hook."""

    provides = frozenset({"units"})

    def setup(self, model, loader, sums, need):
        layers = super().setup(model, loader, sums, need)
        handles = []
        for name, layer in layers.items():
            def hook(mod, inputs, out, name=name):
                sums.add(f"units/{name}", out.detach().abs().flatten(2).mean(2).sum(0)
                         if out.dim() > 2 else out.detach().abs().sum(0))
            handles.append(layer.register_forward_hook(hook))
        return handles, model

    def accumulate(self, state, x, y, sums):
        with torch.no_grad():
            state[1](x)

    def teardown(self, state):
        for h in state[0]:
            h.remove()


def test_accumulating_base_runs_the_loop_counts_and_divides():
    m = _net()
    rel = MeanAbsInput().score(m, _loader(n=10, batch=4))
    assert rel.meta["samples"] == 10 and rel.meta["computed"] == ["units"]
    x = next(iter(_loader(n=10, batch=10)))[0]
    with torch.no_grad():
        expect = m[0](x).abs().mean((2, 3)).mean(0)
    torch.testing.assert_close(rel.units["0"], expect)
    assert rel.weights == {}
    with pytest.raises(XaiCompressError, match="needs data"):
        MeanAbsInput().score(m, None)
    with pytest.raises(XaiCompressError, match="gave no samples"):
        MeanAbsInput().score(m, DataLoader(TensorDataset(torch.zeros(0, 1, 4, 4),
                                                         torch.zeros(0)), batch_size=2))
    with pytest.raises(XaiCompressError, match="cannot provide"):
        MeanAbsInput().score(m, _loader(), need="weights")
    assert not m[0]._forward_hooks  # teardown ran


def test_declared_capabilities():
    assert get_criterion("deeplift").uses_normalisation and get_criterion("deeplift").seeded
    assert get_criterion("random").seeded and not get_criterion("random").needs_data
    assert not get_criterion("l1").seeded and not get_criterion("taylor").uses_normalisation
    # the old duck-typed name still answers
    assert get_criterion("deeplift").accepts_normalisation


def test_registry_refuses_overwrite_unless_asked():
    with pytest.raises(XaiCompressError, match="taken"):
        @register_criterion("l1")
        class Other(Criterion):
            needs_data = False

    @register_criterion("test-contract-overwrite")
    class First(Criterion):
        needs_data = False

    try:
        @register_criterion("test-contract-overwrite", overwrite=True)
        class Second(Criterion):
            needs_data = False

        assert type(get_criterion("test-contract-overwrite")) is Second
    finally:
        _CRITERIA.pop("test-contract-overwrite", None)
    with pytest.raises(XaiCompressError, match="without"):
        register_criterion("bad:name")


@pytest.mark.parametrize("spec,words", [
    ("l1:bogus=1", ["criterion 'l1:bogus=1'", "unknown option 'bogus'", "l1 takes no options"]),
    ("random:seed=1,colour=2", ["unknown option 'colour'", "valid options: seed"]),
    ("random:seed=-1", ["seed=-1", "expected an integer in [0,"]),
    ("gradxact:target=7.5", ["target"]),
    ("deeplift:reference=blur,sigma=1e9", ["sigma=1000000000.0", "(0, 1000]"]),
    ("deeplift:reference=samples:999", ["samples:N", "256"]),
    ("taylor:x", ["not key=value"]),
    ("l1:a=1,a=2", ["given twice"]),
    ("magic", ["unknown criterion", "deeplift"]),
])
def test_bad_specs_name_the_criterion_and_the_option(spec, words):
    with pytest.raises(CriterionError) as err:
        get_criterion(spec)
    for w in words:
        assert w in str(err.value), (w, str(err.value))
    assert err.value.spec == spec and not err.value.reason.startswith("criterion")


def test_default_seed_only_where_declared_and_not_given():
    assert get_criterion("random", default_seed=7).seed == 7
    assert get_criterion("random:seed=3", default_seed=7).seed == 3
    assert get_criterion("deeplift", default_seed=7).seed == 7
    assert "seed" not in get_criterion("l1", default_seed=7).options
    from xaicompress.pipeline.stages import stage_criterion

    assert stage_criterion("random", 5).seed == 5 and stage_criterion("random:seed=1", 5).seed == 1


def test_legacy_score_without_need_still_works():
    class Legacy(Criterion):
        name = "legacy"
        needs_data = False

        def score(self, model, loader=None):
            w = {n: m.weight.detach().abs() for n, m in prunable_layers(model).items()}
            return Relevance(self.name, {n: t.flatten(1).sum(1) for n, t in w.items()}, w)

    rel = compute_relevance(_net(), Legacy(), None, need="units")
    assert set(rel.units) == {"0", "3"}


def test_units_only_for_gradient_criteria_and_same_units():
    m = _net()
    for spec in ("taylor", "gradxact", "activation"):
        crit = get_criterion(spec)
        full, units = crit.score(m, _loader()), crit.score(m, _loader(), need="units")
        assert units.weights == {} and full.weights
        for k in full.units:
            torch.testing.assert_close(units.units[k], full.units[k])


class Swish(nn.Module):
    """A user activation torch.fx cannot trace (data-dependent check)."""

    def forward(self, x):
        if bool(torch.isnan(x).any()):
            raise ValueError("nan")
        return x * torch.sigmoid(x)


def test_user_registered_rule_for_a_custom_module_type():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), Swish(), nn.Linear(8, 3)).double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    ref = torch.zeros(1, 6, dtype=torch.float64)
    with pytest.raises(XaiCompressError, match=r"1 \(Swish\) cannot be traced.*register a "
                                               r"rule for Swish"):
        layer_attributions(m, x, ref, "all")
    try:
        register_rule(Swish, Rescale())
        with pytest.raises(XaiCompressError, match="already has rule"):
            register_rule(Swish, Rescale())
        register_rule(Swish, Rescale(), overwrite=True)
        layers, res = layer_attributions(m, x, ref, "all")
        assert float(res.delta.abs().max()) < 1e-12 * float(res.delta_f.abs().mean())
        assert set(layers) == {"0", "2"}
    finally:
        _RULES.pop(Swish, None)
    with pytest.raises(XaiCompressError, match="not an nn.Module"):
        register_rule(int, Rescale())
