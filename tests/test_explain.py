"""`explain` command and library: files, user models, input maps, bad inputs."""

import json
import textwrap

import pytest
import torch
from torch import nn

from xaicompress.checkpoint import Checkpoint, ModelSpec, save_checkpoint
from xaicompress.data import load_dataset
from xaicompress.errors import XaiCompressError
from xaicompress.relevance.explain import load_relevance, save_relevance
from xaicompress.relevance.inputmaps import input_attribution, save_heatmap_grid
from xaicompress.train import accuracy, train


def _checkpoint(name, bundle, path, epochs=1):
    spec = ModelSpec(name, tuple(bundle.input_shape), bundle.num_classes)
    torch.manual_seed(0)
    model = spec.build()
    train(model, bundle.train, epochs=epochs, seed=0)
    ckpt = Checkpoint(model, spec, bundle.spec)
    save_checkpoint(ckpt, path)
    return ckpt


def test_explain_cli_writes_scores_plots_heatmaps(tmp_path, run_cli, digits):
    ck = tmp_path / "m.safetensors"
    ckpt = _checkpoint("lenet5", digits, ck)
    out = tmp_path / "exp"
    code, stdout, err = run_cli("explain", ck, "--data", "digits", "--criterion",
                                "deeplift:reference=mean,target=pred", "--samples", 40,
                                "--images", 4, "--seed", 1, "--out", out)
    assert code == 0, err
    assert "convergence delta" in stdout
    rel = load_relevance(out / "relevance.safetensors")
    for name, layer in ((n, m) for n, m in ckpt.model.named_modules()
                        if isinstance(m, (nn.Conv2d, nn.Linear))):
        assert rel.units[name].shape == (layer.weight.shape[0],)
        assert rel.weights[name].shape == layer.weight.shape
        assert (out / "units" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "heatmaps.png").read_bytes()[:4] == b"\x89PNG"
    assert rel.meta["samples"] == 40 and rel.meta["reference"] == "mean"
    # the Python API with the same seed gives the same numbers
    from xaicompress.relevance import compute_relevance, get_criterion

    again = compute_relevance(ckpt.model, get_criterion("deeplift:reference=mean,target=pred"),
                              load_dataset("digits", seed=1), samples=40, seed=1)
    assert all(torch.equal(again.units[k], rel.units[k]) for k in rel.units)
    assert all(torch.equal(again.weights[k], rel.weights[k]) for k in rel.units)


def test_explain_user_factory_model(tmp_path, run_cli, monkeypatch, digits):
    pkg = tmp_path / "usernets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tiny.py").write_text(textwrap.dedent("""
        import torch.nn.functional as F
        from torch import nn

        class Tiny(nn.Module):
            def __init__(self, c, k):
                super().__init__()
                self.conv = nn.Conv2d(c, 5, 3, padding=1)
                self.head = nn.Linear(5 * 16, k)

            def forward(self, x):
                x = F.max_pool2d(F.relu(self.conv(x)), 2)  # functional: canonicalised
                return self.head(x.flatten(1))

        def make(in_channels=1, num_classes=10):
            return Tiny(in_channels, num_classes)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    ck = tmp_path / "u.safetensors"
    ckpt = _checkpoint("usernets.tiny:make", digits, ck, epochs=2)
    assert accuracy(ckpt.model, digits.test) > 30
    # The file alone may not make us import its factory; the user's --model does.
    code, _, err = run_cli("explain", ck, "--samples", 32, "--out", tmp_path / "ue")
    assert code == 2 and "--model usernets.tiny:make" in err
    assert not (tmp_path / "ue").exists()
    code, stdout, err = run_cli("explain", ck, "--model", "usernets.tiny:make", "--samples", 32,
                                "--images", 2, "--out", tmp_path / "ue")
    assert code == 0, err
    rel = load_relevance(tmp_path / "ue" / "relevance.safetensors")
    assert set(rel.units) == {"conv", "head"}
    assert rel.meta["convergence_delta_rel"] < 1e-4


def test_explain_bad_inputs(tmp_path, run_cli, digits):
    code, _, err = run_cli("explain", tmp_path / "missing.safetensors", "--out", tmp_path / "x")
    assert code == 2 and "missing.safetensors" in err
    ck = tmp_path / "m.safetensors"
    _checkpoint("lenet5", digits, ck, epochs=0.2)
    code, _, err = run_cli("explain", ck, "--criterion", "deeplift:reference=sky",
                           "--out", tmp_path / "x")
    assert code == 2 and "reference" in err and "Traceback" not in err
    code, _, err = run_cli("explain", ck, "--criterion", "nosuch", "--out", tmp_path / "x")
    assert code == 2 and "nosuch" in err
    code, _, err = run_cli("explain", ck, "--data", "mnist5k", "--out", tmp_path / "x")
    assert code == 2 and "shape" in err
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli("explain", ck, "--out", tmp_path / "file")
    assert code == 2 and "folder" in err


def test_input_attribution_sums_to_output_difference(digits, tmp_path):
    torch.manual_seed(0)
    from xaicompress.models import create_model

    m = create_model("lenet5", digits.input_shape, 10).eval()
    x = torch.stack([digits.test[i][0] for i in range(6)])
    maps = input_attribution(m, x, target=3, pixel_mean=digits.mean, pixel_std=digits.std)
    black = digits.pixel_to_input(torch.zeros(1, *digits.input_shape))
    with torch.no_grad():
        df = m(x)[:, 3] - m(black)[0, 3]
    assert maps.shape == x.shape
    torch.testing.assert_close(maps.flatten(1).sum(1), df, rtol=1e-4, atol=1e-5)
    blur = input_attribution(m, x, reference="blur")
    assert blur.shape == x.shape and not torch.allclose(blur, maps)
    two = input_attribution(m, x, reference=torch.stack([black[0], black[0] + 0.5]))
    assert two.shape == x.shape
    save_heatmap_grid(digits.input_to_pixel(x), maps, tmp_path / "h.png", titles=["a"] * 6)
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(XaiCompressError, match="N, C, H, W"):
        input_attribution(m, x[0])
    with pytest.raises(XaiCompressError, match="needs a dataset"):
        input_attribution(m, x, reference="mean")


def test_relevance_file_roundtrip_and_bad_file(tmp_path):
    from xaicompress.relevance import Relevance

    rel = Relevance("deeplift", {"a.b": torch.rand(3)}, {"a.b": torch.rand(3, 2)},
                    {"samples": 5, "reference": "zeros"})
    save_relevance(rel, tmp_path / "r.safetensors")
    back = load_relevance(tmp_path / "r.safetensors")
    assert torch.equal(back.units["a.b"], rel.units["a.b"]) and back.meta["samples"] == 5
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00" + b"junk" * 10)
    with pytest.raises(XaiCompressError, match="not a relevance file"):
        load_relevance(tmp_path / "bad.safetensors")
    assert json.loads(json.dumps(back.meta))
