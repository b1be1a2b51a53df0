"""DeepLIFT engine: Captum agreement layer by layer, summation-to-delta, options."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from xaicompress.errors import XaiCompressError
from xaicompress.models import create_model
from xaicompress.relevance import compute_relevance, get_criterion, prunable_layers
from xaicompress.relevance.deeplift import layer_attributions

MODELS = [("lenet5", (1, 28, 28), {}), ("vgg11", (3, 32, 32), {"width": 0.25}),
          ("resnet20", (3, 32, 32), {})]


def _model(name, shape, kw, seed=0):
    torch.manual_seed(seed)
    m = create_model(name, shape, 10, **kw)
    for mod in m.modules():  # non-trivial eval-mode BatchNorm
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.1, 0.1)
    return m.double().eval()


@pytest.mark.parametrize("name,shape,kw", MODELS)
def test_summation_to_delta(name, shape, kw):
    # float64: untrained networks have output differences near float32 rounding
    m = _model(name, shape, kw)
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = torch.full((1, *shape), -0.4, dtype=torch.float64)
    layers, res = layer_attributions(m, x, ref, torch.arange(8) % 10)
    with torch.no_grad():
        df = (m(x) - m(ref))[torch.arange(8), torch.arange(8) % 10]
    assert torch.allclose(res.delta_f, df, rtol=1e-9, atol=1e-12)
    assert float(res.delta.abs().max()) <= 1e-4 * float(df.abs().mean())
    # a layer every path crosses carries the whole output difference too
    first = next(iter(layers))
    total = layers[first].flatten(1).sum(1)
    assert torch.allclose(total, df, rtol=1e-4, atol=1e-4 * float(df.abs().mean()))


def _loader(shape=(1, 28, 28), n=40, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def test_criterion_shapes_keys_and_batch_independence():
    m = _model("lenet5", (1, 28, 28), {}).float()
    crit = get_criterion("deeplift", pixel_mean=(0.13,), pixel_std=(0.31,))
    a = crit.score(m, _loader(batch=16))
    b = crit.score(m, _loader(batch=7))
    for name, layer in prunable_layers(m).items():
        assert a.units[name].shape == (layer.weight.shape[0],)
        assert a.weights[name].shape == layer.weight.shape
        assert (a.units[name] >= 0).all() and a.units[name].sum() > 0
        torch.testing.assert_close(a.units[name], b.units[name], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(a.weights[name], b.weights[name], rtol=1e-4, atol=1e-8)
    assert a.meta["samples"] == 40 and a.meta["convergence_delta_rel"] < 1e-4
    assert a.meta["reference"] == "zeros" and a.meta["unreached_layers"] == []


def test_unit_and_weight_relevance_match_definition():
    """Per-weight contribution m_z * w * dx summed over positions, mean |.| over samples."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(3 * 5 * 5, 4)).double().eval()
    x = torch.randn(5, 2, 5, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0])
    ref = torch.zeros(1, 2, 5, 5, dtype=torch.float64)
    rel = get_criterion("deeplift", pixel_mean=(0.0, 0.0), pixel_std=(1.0, 1.0)).score(
        m.float(), DataLoader(TensorDataset(x.float(), y), batch_size=2))
    m = m.double()
    layers, _ = layer_attributions(m, x, ref, y)
    units = layers["0"].flatten(2).sum(2).abs().mean(0)
    torch.testing.assert_close(rel.units["0"].double(), units, rtol=1e-4, atol=1e-7)
    # brute force per sample: multiplier of conv output m = C / dz where dz != 0
    conv = m[0]
    with torch.no_grad():
        dz = conv(x) - conv(ref)
    mult = layers["0"] / dz
    expect = torch.zeros_like(conv.weight)
    for n in range(5):
        per = torch.zeros_like(conv.weight)
        xp = torch.nn.functional.pad(x[n] - ref[0], (1, 1, 1, 1))
        for i in range(5):
            for j in range(5):
                patch = xp[:, i:i + 3, j:j + 3]
                per += mult[n, :, i, j].view(3, 1, 1, 1) * conv.weight * patch
        expect += per.abs()
    torch.testing.assert_close(rel.weights["0"].double(), expect / 5, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_reference_and_target_options():
    m = _model("lenet5", (1, 28, 28), {}).float()
    loader = _loader(n=10, batch=5)
    norm = {"pixel_mean": (0.13,), "pixel_std": (0.31,)}
    base = get_criterion("deeplift", **norm).score(m, loader)
    for spec in ("deeplift:reference=mean", "deeplift:reference=blur,sigma=2",
                 "deeplift:reference=samples:3", "deeplift:reference=samples3",
                 "deeplift:target=pred", "deeplift:target=all", "deeplift:target=4",
                 "deeplift:aggregate=signed", "deeplift:normalise=true"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every run converges: no warning
            rel = get_criterion(spec, **norm).score(m, loader)
        assert set(rel.units) == set(base.units)
        assert not torch.allclose(rel.units["conv2"], base.units["conv2"]), spec
    assert get_criterion("deeplift:reference=samples:3").score(m, loader).meta[
        "references_per_sample"] == 3
    signed = get_criterion("deeplift:aggregate=signed", **norm).score(m, loader)
    assert (signed.units["fc2"] < 0).any()
    tensor_ref = get_criterion("deeplift", reference=torch.full((1, 28, 28), -0.13 / 0.31))
    torch.testing.assert_close(tensor_ref.score(m, loader).units["conv1"],
                               base.units["conv1"])


def test_zeros_is_black_pixel_image_via_bundle():
    from xaicompress.data import load_dataset

    bundle = load_dataset("digits")
    m = create_model("lenet5", bundle.input_shape, 10).eval()
    via_bundle = compute_relevance(m, get_criterion("deeplift"), bundle, samples=16)
    black = bundle.pixel_to_input(torch.zeros(1, *bundle.input_shape))[0]
    explicit = compute_relevance(m, get_criterion("deeplift", reference=black), bundle.train,
                                 samples=16)
    torch.testing.assert_close(via_bundle.units["conv2"], explicit.units["conv2"])
    assert via_bundle.meta["normalised_reference"] is True
    with pytest.warns(UserWarning, match="normalisation unknown"):
        compute_relevance(m, get_criterion("deeplift"), bundle.train, samples=8)


def test_convergence_warning_and_bad_options():
    m = _model("lenet5", (1, 28, 28), {}).float()
    with pytest.warns(UserWarning, match="convergence delta"):
        get_criterion("deeplift:tolerance=1e-30", pixel_mean=(0.1,), pixel_std=(0.3,)).score(
            m, _loader(n=8))
    for spec, word in [("deeplift:reference=purple", "reference"),
                       ("deeplift:target=best", "target"),
                       ("deeplift:aggregate=max", "aggregate"),
                       ("deeplift:reference=samples0", "samples"),
                       ("deeplift:reference=samples:100000", "samples"),
                       ("deeplift:reference=blur,sigma=1e9", "sigma"),
                       ("deeplift:sigma=-1", "sigma"),
                       ("deeplift:tolerance=0", "tolerance"),
                       ("deeplift:eps=nan", "eps"),
                       ("deeplift:normalise=maybe", "normalise"),
                       ("deeplift:rule=backprop", "rescale, revealcancel"),
                       ("deeplift:layernorm=none", "decompose, constant"),
                       ("deeplift:seed=-3", "seed"),
                       ("deeplift:colour=red", "unknown option 'colour'; valid options: "
                        "reference, target")]:
        with pytest.raises(XaiCompressError, match=word) as err:
            get_criterion(spec)
        assert str(err.value).startswith(f"criterion {spec!r}: ")
    with pytest.raises(XaiCompressError, match="pixel_std"):
        get_criterion("deeplift", pixel_mean=(0.1,))
    with pytest.raises(XaiCompressError, match="pixel_mean"):
        get_criterion("deeplift", pixel_mean=(0.1, 0.2), pixel_std=(0.3, 0.3)).score(
            m, _loader(n=4))
    with pytest.raises(XaiCompressError, match="needs data"):
        get_criterion("deeplift").score(m, None)


@pytest.mark.slow
def test_relevance_is_deterministic_and_leaves_model_untouched():
    m = _model("vgg11", (3, 32, 32), {"width": 0.25}).float()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    loader = _loader((3, 32, 32), n=6, batch=3)
    # untrained float32 vgg: |f(x) - f(ref)| ~ 1e-5, so rounding alone exceeds 1e-4 relative
    c = get_criterion("deeplift:reference=samples2,tolerance=1e-2", pixel_mean=(0.5,) * 3,
                      pixel_std=(0.25,) * 3)
    a, b = c.score(m, loader), c.score(m, loader)
    for k in a.units:
        assert torch.equal(a.units[k], b.units[k]) and torch.equal(a.weights[k], b.weights[k])
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.requires_grad for p in m.parameters())
    assert not hasattr(m, "graph")


def test_huge_blur_is_bounded_by_the_image():
    """sigma at its upper bound costs no more than the image (the kernel is cut there)."""
    import time

    from xaicompress.relevance.references import gaussian_blur

    x = torch.randn(4, 3, 16, 16)
    t = time.perf_counter()
    out = gaussian_blur(x, 1000.0)
    assert time.perf_counter() - t < 2.0 and out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_units_only_path_gives_the_same_units_without_weights():
    m = _model("resnet20", (3, 32, 32), {}).float()
    loader = _loader((3, 32, 32), n=12, batch=6)
    crit = get_criterion("deeplift:tolerance=1e-2", pixel_mean=(0.5,) * 3,
                         pixel_std=(0.25,) * 3)
    full = crit.score(m, loader)
    units = crit.score(m, loader, need="units")
    weights = crit.score(m, loader, need={"weights"})
    assert units.weights == {} and set(units.units) == set(full.units)
    assert units.meta["computed"] == ["units"] and full.meta["computed"] == ["units", "weights"]
    for k in full.units:
        torch.testing.assert_close(units.units[k], full.units[k], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(weights.weights[k], full.weights[k], rtol=1e-5, atol=1e-12)
    assert weights.units == {}
    with pytest.raises(XaiCompressError, match="need"):
        crit.score(m, loader, need={"biases"})


def _tv(name, size=32):
    from xaicompress.models.vision_import import import_torchvision

    torch.manual_seed(0)
    return import_torchvision().models.get_model(name, weights=None, num_classes=10
                                                 ).double().eval(), size


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf",
                                  "shufflenet_v2_x0_5"])
def test_torchvision_cnns_sum_to_delta(name):
    """Squeeze-excitation (products), Hardswish/SiLU, channel shuffle, grouped convs."""
    m, size = _tv(name, 48)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, size, size, generator=g, dtype=torch.float64)
    ref = torch.randn(1, 3, size, size, generator=g, dtype=torch.float64) * 0.1
    layers, res = layer_attributions(m, x, ref, torch.tensor([1, 7]))
    assert float(res.delta.abs().max()) <= 1e-4 * float(res.delta_f.abs().mean())
    assert set(layers) == set(prunable_layers(m))  # every Conv2d/Linear was reached


def test_revealcancel_sums_to_delta_and_differs_from_rescale():
    for name, shape, kw in MODELS:
        m = _model(name, shape, kw)
        x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(5),
                        dtype=torch.float64)
        ref = torch.full((1, *shape), -0.4, dtype=torch.float64)
        t = torch.tensor([0, 3, 9, 1])
        rc_layers, rc = layer_attributions(m, x, ref, t, rule="revealcancel")
        rs_layers, rs = layer_attributions(m, x, ref, t)
        torch.testing.assert_close(rc.delta_f, rs.delta_f)
        assert float(rc.delta.abs().max()) <= 1e-9 * float(rc.delta_f.abs().mean()), name
        # a layer that every path crosses carries the whole output difference
        first = next(iter(rc_layers))
        torch.testing.assert_close(rc_layers[first].flatten(1).sum(1), rc.delta_f,
                                   rtol=1e-8, atol=1e-10)
        diff = max(float((rc_layers[k] - rs_layers[k]).abs().max()) for k in rs_layers)
        assert diff > 1e-3 * float(rs.delta_f.abs().mean()), name


def test_revealcancel_criterion_scores_units_and_weights():
    m = _model("lenet5", (1, 28, 28), {}).float()
    loader = _loader(n=10, batch=5)
    norm = {"pixel_mean": (0.13,), "pixel_std": (0.31,)}
    rc = get_criterion("deeplift:rule=revealcancel", **norm).score(m, loader)
    rs = get_criterion("deeplift", **norm).score(m, loader)
    assert rc.meta["rule"] == "revealcancel" and rc.meta["revealcancel_nonlinearities"] == 4
    assert rc.meta["convergence_delta_rel"] < 1e-4
    for k in rs.units:
        assert rc.weights[k].shape == rs.weights[k].shape and (rc.weights[k] >= 0).all()
    assert not torch.allclose(rc.units["conv2"], rs.units["conv2"])
    # by construction units equal the per-sample |sum| of the weight-free definition
    layers, _ = layer_attributions(m.double(), next(iter(loader))[0].double(),
                                   torch.full((1, 1, 28, 28), -0.13 / 0.31,
                                              dtype=torch.float64),
                                   next(iter(loader))[1], rule="revealcancel")
    assert layers["fc1"].shape[1] == m.fc1.out_features


def test_engine_is_reused_and_invalidated_by_weight_and_structure_changes():
    from xaicompress.relevance.engine import DeepLiftEngine, instrumented

    m = _model("lenet5", (1, 28, 28), {}).float()
    loader = _loader(n=8, batch=4)
    crit = get_criterion("deeplift", pixel_mean=(0.13,), pixel_std=(0.31,))
    a = crit.score(m, loader)
    inst = instrumented(m)
    passes = inst.reference_passes
    b = crit.score(m, loader)
    assert instrumented(m) is inst and inst.reference_passes == passes  # no re-trace, no ref
    torch.testing.assert_close(a.units["conv1"], b.units["conv1"])
    last = list(prunable_layers(m))[-1]  # the classifier: its contributions scale with it
    m.get_submodule(last).weight.data.mul_(2.0)  # a write through .data: no version bump
    m.get_submodule(last).bias.data.mul_(2.0)
    c = crit.score(m, loader)
    assert instrumented(m) is inst and inst.reference_passes == passes + 1
    torch.testing.assert_close(c.units[last], 2 * a.units[last], rtol=1e-5, atol=1e-8)
    old = m.get_submodule(last)
    setattr(m, last, nn.Linear(old.in_features, 10))  # a structure change: traced again
    d = crit.score(m, loader)
    assert instrumented(m) is not inst and d.units[last].shape == (10,)
    assert DeepLiftEngine(m).inst is instrumented(m)


@pytest.mark.slow
def test_agrees_with_captum_deeplift_where_captum_is_exact():
    """timm's regnetx_002 (grouped convs, no reused modules, no functional ops): Captum's
    DeepLift sums to delta there, and our input maps equal its to float64 rounding."""
    from captum.attr import DeepLift

    from xaicompress.models.vision_import import import_timm

    torch.manual_seed(0)
    m = import_timm().create_model("regnetx_002", pretrained=False, num_classes=10)
    m = m.double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    ref = torch.randn(1, 3, 32, 32, generator=g, dtype=torch.float64) * 0.1
    t = torch.tensor([2, 5])
    _, ours = layer_attributions(m, x, ref, t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, delta = DeepLift(m).attribute(x, ref.expand_as(x), target=t,
                                              return_convergence_delta=True)
    assert float(delta.abs().max()) < 1e-8 * float(ours.delta_f.abs().mean())
    err = float((ours.inputs - theirs.detach()).abs().max() / theirs.abs().max())
    assert err < 1e-8


def test_classmax_is_the_largest_per_class_mean():
    """aggregate=classmax: per unit, the largest over the classes of the mean |contribution|
    of that class's samples, i.e. of abs relevance scored on each class alone; the weights
    stay abs. A unit one class needs scores at least its class's mean, not the diluted
    mean over all samples."""
    m = _model("lenet5", (1, 28, 28), {}).float()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(30, 1, 28, 28, generator=g), torch.arange(30) % 3
    norm = {"pixel_mean": (0.13,), "pixel_std": (0.31,)}
    rel = get_criterion("deeplift:aggregate=classmax", **norm).score(
        m, DataLoader(TensorDataset(x, y), batch_size=7))
    abs_all = get_criterion("deeplift", **norm).score(
        m, DataLoader(TensorDataset(x, y), batch_size=7))
    per_class = [get_criterion("deeplift", **norm).score(
        m, DataLoader(TensorDataset(x[y == k], y[y == k]), batch_size=4)) for k in range(3)]
    for name in rel.units:
        want = torch.stack([r.units[name] for r in per_class]).max(0).values
        torch.testing.assert_close(rel.units[name], want, rtol=1e-4, atol=1e-7)
        assert (rel.units[name] >= abs_all.units[name] - 1e-6).all()
        assert (rel.units[name] > abs_all.units[name] * 1.01).any(), name
        torch.testing.assert_close(rel.weights[name], abs_all.weights[name])
    bad = DataLoader(TensorDataset(x[:4], torch.tensor([0, 1, 2, 10])), batch_size=4)
    with pytest.raises(XaiCompressError, match="classmax: a label outside 0..9"):
        get_criterion("deeplift:aggregate=classmax", **norm).score(m, bad)


def test_weights_layer_is_the_layer_rms_contribution_shared_by_magnitude():
    """weights=layer: a layer's scores average to the mean over its weights of the
    root-mean-square (over samples and positions) contribution m w dx, and rank its weights
    by |w| (brute force on a padded, strided convolution)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
                      nn.Linear(3 * 3 * 3, 4)).double().eval()
    x = torch.randn(5, 2, 5, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0])
    ref = torch.zeros(1, 2, 5, 5, dtype=torch.float64)
    rel = get_criterion("deeplift:weights=layer", pixel_mean=(0.0, 0.0),
                        pixel_std=(1.0, 1.0)).score(
        m.float(), DataLoader(TensorDataset(x.float(), y), batch_size=2))
    m = m.double()
    layers, _ = layer_attributions(m, x, ref, y)
    conv = m[0]
    with torch.no_grad():
        dz = conv(x) - conv(ref)
    mult = layers["0"] / dz
    energy = torch.zeros_like(conv.weight)
    xp = torch.nn.functional.pad(x - ref, (1, 1, 1, 1))
    for n in range(5):
        for i in range(3):
            for j in range(3):
                patch = xp[n, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
                energy += (mult[n, :, i, j].view(3, 1, 1, 1) * conv.weight * patch) ** 2
    rms = (energy / 5).sqrt()
    s = rel.weights["0"].double()
    torch.testing.assert_close(s.mean(), rms.mean(), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(s / s.mean(), conv.weight ** 2 / (conv.weight ** 2).mean(),
                               rtol=1e-4, atol=1e-9)
    # the linear layer: one position per sample
    lin = m[3]
    with torch.no_grad():
        h = m[:3](x)
        href = m[:3](ref)
    mult_l = layers["3"] / (lin(h) - lin(href))
    e_l = ((mult_l[:, :, None] * lin.weight[None] * (h - href)[:, None, :]) ** 2).mean(0)
    torch.testing.assert_close(rel.weights["3"].double().mean(),
                               e_l.sqrt().mean(), rtol=1e-4, atol=1e-9)
    with pytest.raises(XaiCompressError, match="weights=layer"):
        get_criterion("deeplift:weights=layer,aggregate=signed")


def test_weights_layer_under_revealcancel_pairs_signs_as_pass_weights():
    """weight_energy with RevealCancel's split multipliers: the square of a position's term
    is (dx+ m+-)^2 + (dx- m-+)^2, compared with the squared per-position terms."""
    from xaicompress.relevance.kernels import weight_energy

    torch.manual_seed(1)
    lin = nn.Linear(6, 4).double()
    dx = torch.randn(7, 6, dtype=torch.float64)
    mp, mn = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    got = weight_energy(lin, dx, mp, split=(None, None, mp, mn))
    w = lin.weight.detach()
    xp, xn = dx.clamp(min=0), dx.clamp(max=0)
    pos = mp[:, :, None] * xp[:, None] + mn[:, :, None] * xn[:, None]
    neg = mn[:, :, None] * xp[:, None] + mp[:, :, None] * xn[:, None]
    want = torch.where(w > 0, (pos ** 2).sum(0), (neg ** 2).sum(0))
    torch.testing.assert_close(got, want)
