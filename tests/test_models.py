import pytest
import torch
from torch import nn

from xaicompress.errors import XaiCompressError
from xaicompress.models import create_model, list_models


def test_zoo_is_registered():
    assert {"lenet5", "lenet300", "vgg11", "vgg16", "resnet20", "resnet56"} <= set(list_models())


@pytest.mark.parametrize(
    "name,shape,classes,params",
    [
        ("lenet5", (1, 28, 28), 10, 61_706),
        ("lenet300", (1, 28, 28), 10, 266_610),
        ("resnet20", (3, 32, 32), 10, None),
        ("resnet56", (1, 28, 28), 10, None),
        ("vgg11", (3, 32, 32), 100, None),
        ("vgg16", (1, 28, 28), 10, None),
        ("lenet5", (1, 8, 8), 10, None),
        ("vgg11", (1, 8, 8), 10, None),
        ("resnet20", (1, 8, 8), 10, None),
    ],
)
def test_forward_shapes_and_params(name, shape, classes, params):
    model = create_model(name, shape, classes)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, classes)
    n = sum(p.numel() for p in model.parameters())
    if params is not None:
        assert n == params
    # every activation is its own module instance: no instance appears twice
    acts = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len({id(a) for a in acts}) == len(acts) > 0


def test_resnet20_has_expected_size():
    n = sum(p.numel() for p in create_model("resnet20", (3, 32, 32), 10).parameters())
    assert 0.26e6 < n < 0.29e6  # ~0.27M, as in He et al.


def test_width_multiplier_shrinks_vgg():
    full = sum(p.numel() for p in create_model("vgg11", (3, 32, 32), 10).parameters())
    half = sum(p.numel() for p in create_model("vgg11", (3, 32, 32), 10, width=0.5).parameters())
    assert half < full / 3


def test_user_factory(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "from torch import nn\n"
        "def tiny(num_classes=10, in_channels=1, image_size=28):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels*image_size**2, 16),\n"
        "                         nn.ReLU(), nn.Linear(16, num_classes))\n"
        "def not_a_model():\n    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    m = create_model("mymodels:tiny", (1, 28, 28), 7)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    with pytest.raises(XaiCompressError, match="not_a_model"):
        create_model("mymodels:not_a_model", (1, 28, 28), 7)
    with pytest.raises(XaiCompressError, match="cannot import"):
        create_model("no_such_pkg.mod:f", (1, 28, 28), 7)
    with pytest.raises(XaiCompressError, match="no callable"):
        create_model("mymodels:missing", (1, 28, 28), 7)
    with pytest.raises(XaiCompressError, match="unknown model"):
        create_model("lenet6", (1, 28, 28), 7)


def test_registering_a_name_twice_is_refused():
    from xaicompress.models.registry import _REGISTRY, register_model

    def tiny(num_classes=10, in_channels=1, image_size=28):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, num_classes))

    with pytest.raises(XaiCompressError, match="already registered"):
        register_model("lenet5")(tiny)
    original = _REGISTRY["lenet5"]
    try:
        register_model("lenet5", overwrite=True)(tiny)
        assert isinstance(create_model("lenet5", (1, 28, 28), 10), nn.Sequential)
    finally:
        _REGISTRY["lenet5"] = original
    with pytest.raises(XaiCompressError, match="has no ':'"):
        register_model("my:net")(tiny)


def test_a_family_resolves_inside_its_own_namespace():
    from xaicompress.models.registry import _FAMILIES, check_trusted, register_family

    zoo = {"tiny": lambda num_classes=10: nn.Linear(4, num_classes)}
    register_family("testzoo", zoo.get)
    try:
        assert isinstance(create_model("testzoo:tiny", (1, 2, 2), 3), nn.Linear)
        check_trusted("testzoo:tiny", None, "f.xcpk")  # a file may name it: no import
        with pytest.raises(XaiCompressError, match="testzoo has no model 'os'"):
            check_trusted("testzoo:os", None, "f.xcpk")
        with pytest.raises(XaiCompressError, match="already registered"):
            register_family("testzoo", zoo.get)
    finally:
        del _FAMILIES["testzoo"]


def test_metadata_kwargs_are_checked_against_the_signature():
    from xaicompress.models.registry import check_model_kwargs

    check_model_kwargs("vgg11", {"width": 0.5}, "f")
    check_model_kwargs("vgg11", {"width": 1}, "f")  # an int is a valid float
    for kwargs, match in (({"depth": 3}, "takes no argument 'depth'"),
                          ({"width": "wide"}, "expected float"),
                          ({"width": True}, "expected float"),
                          ({"width": float("inf")}, "not a JSON number"),
                          ({"width": [[1]]}, "not a JSON number"),
                          ({"image_size": 10 ** 6}, "comes from the data"),
                          ([1, 2], "must be an object")):
        with pytest.raises(XaiCompressError, match=match):
            check_model_kwargs("vgg11", kwargs, "f")


def test_factory_options_may_be_called_name(tmp_path, monkeypatch):
    (tmp_path / "named.py").write_text(
        "from torch import nn\n"
        "def build(name='a', num_classes=10):\n"
        "    return nn.Linear(2, num_classes)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert create_model("named:build", (1, 1, 2), 3, name="b").out_features == 3
