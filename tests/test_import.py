"""`xaicompress import`: a user's own state dict in, their own accuracy out; the model's
preprocessing recorded and used by every later step (evaluate, DeepLIFT, ONNX, report)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from xaicompress.checkpoint import load_checkpoint
from xaicompress.data import load_dataset
from xaicompress.data.preprocess import Preprocess, parse_normalise
from xaicompress.models.registry import create_model

MEAN, STD = 0.5, 0.25  # the user's own normalisation (not the data's statistics)


def _user_training(seed: int = 0) -> tuple[torch.nn.Module, float]:
    """What a user does outside xaicompress: digits pixels in [0, 1], their own
    normalisation, plain PyTorch training and their own accuracy measurement."""
    raw = load_dataset("digits", preprocess=Preprocess((0.0,), (1.0,)))
    x_tr, y_tr = (torch.stack([raw.train[i][0] for i in range(len(raw.train))]),
                  torch.tensor([int(raw.train[i][1]) for i in range(len(raw.train))]))
    x_te = torch.stack([raw.test[i][0] for i in range(len(raw.test))])
    y_te = torch.tensor([int(raw.test[i][1]) for i in range(len(raw.test))])
    torch.manual_seed(seed)
    net = create_model("lenet5", (1, 8, 8), 10)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(3):
        for i in range(0, len(x_tr), 64):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net((x_tr[i:i + 64] - MEAN) / STD),
                                                     y_tr[i:i + 64])
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = float((net((x_te - MEAN) / STD).argmax(1) == y_te).float().mean() * 100)
    return net, acc


@pytest.fixture(scope="module")
def user_model():
    return _user_training()


def _import(run_cli, weights: Path, out: Path, *extra: str):
    return run_cli("import", weights, "--model", "lenet5", "--data", "digits",
                   "--normalise", f"{MEAN}/{STD}", "--out", out, "--json", *extra)


def test_import_pth_gives_the_users_accuracy(user_model, tmp_path, run_cli):
    net, own = user_model
    # a training checkpoint: state dict under "model", saved from DistributedDataParallel
    sd = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"model": sd, "epoch": 3, "optimizer": {"lr": 3e-3}}, tmp_path / "mine.pth")
    code, out, err = _import(run_cli, tmp_path / "mine.pth", tmp_path / "c.safetensors")
    assert code == 0, err
    info = json.loads(out)
    assert abs(info["accuracy"] - own) < 0.01
    ckpt = load_checkpoint(tmp_path / "c.safetensors")
    assert ckpt.spec.preprocess == Preprocess((MEAN,), (STD,), size=8)
    assert ckpt.history[0]["stage"] == "import"
    for k, v in net.state_dict().items():
        assert torch.equal(ckpt.model.state_dict()[k], v)
    # every later command feeds the model the way it was trained: evaluate says the same
    code, out, err = run_cli("evaluate", tmp_path / "c.safetensors", "--json")
    assert code == 0, err
    assert abs(json.loads(out)["accuracy"] - own) < 0.01


def test_import_safetensors_and_bin(user_model, tmp_path, run_cli):
    net, own = user_model
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(tmp_path / "mine.safetensors"))
    torch.save(net.state_dict(), tmp_path / "pytorch_model.bin")
    for name in ("mine.safetensors", "pytorch_model.bin"):
        code, out, err = _import(run_cli, tmp_path / name, tmp_path / f"{name}.ckpt")
        assert code == 0, err
        assert abs(json.loads(out)["accuracy"] - own) < 0.01


@pytest.mark.parametrize("edit, needle", [
    (lambda sd: sd.pop("fc1.weight"), "missing: fc1.weight"),
    (lambda sd: sd.update({"extra.weight": torch.zeros(2)}), "unexpected: extra.weight"),
    (lambda sd: sd.update({"fc3.weight": torch.zeros(5, 84)}),
     "shape mismatch: fc3.weight (5, 84) (model: (10, 84))"),
    (lambda sd: sd["conv1.weight"].view(-1)[0].fill_(float("nan")), "NaN"),
])
def test_import_refuses_what_does_not_fit(user_model, tmp_path, run_cli, edit, needle):
    net, _ = user_model
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    edit(sd)
    torch.save(sd, tmp_path / "w.pth")
    code, _, err = _import(run_cli, tmp_path / "w.pth", tmp_path / "c.safetensors")
    assert code == 2 and needle in err and "w.pth" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "c.safetensors").exists()


BROKEN_FACTORY = "def build(num_classes):\n    raise ValueError('my factory is broken')\n"


@pytest.mark.parametrize("model, needle", [
    ("lenet300", "does not fit --model lenet300 (unexpected: conv1.weight"),  # another net
    ("userbroken_import:build", "factory failed for input (1, 8, 8) and 10 classes (ValueError: "
     "my factory is broken)"),
    ("timm:nosuchmodel", "timm has no model 'nosuchmodel'"),
    ("torchvision:nosuchmodel", "torchvision has no model 'nosuchmodel'"),
])
def test_import_refuses_the_wrong_model(user_model, tmp_path, run_cli, monkeypatch, model,
                                        needle):
    """Issue 14's bad-input list through the command: one line naming the input, exit 2."""
    (tmp_path / "userbroken_import.py").write_text(BROKEN_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save(user_model[0].state_dict(), tmp_path / "w.pth")
    code, _, err = run_cli("import", tmp_path / "w.pth", "--model", model, "--data", "digits",
                           "--out", tmp_path / "c.safetensors")
    assert code == 2 and needle in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "c.safetensors").exists()


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_import_never_runs_a_pickle_payload(tmp_path, run_cli):
    marker = tmp_path / "marker"
    torch.save({"conv1.weight": torch.zeros(1), "x": _Payload(marker)}, tmp_path / "evil.pth")
    code, _, err = _import(run_cli, tmp_path / "evil.pth", tmp_path / "c.safetensors")
    assert code == 2 and "refused unrun" in err and not marker.exists()
    # a whole pickled model object (not a state dict) is refused the same way
    torch.save(create_model("lenet5", (1, 8, 8), 10), tmp_path / "model.pth")
    code, _, err = _import(run_cli, tmp_path / "model.pth", tmp_path / "c.safetensors")
    assert code == 2 and "save model.state_dict()" in err


@pytest.mark.parametrize("text, want", [
    ("0.485,0.456,0.406/0.229,0.224,0.225", ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
    ("0.485,0.456,0.406,0.229,0.224,0.225", ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
    ("0.5,0.25", ((0.5,), (0.25,))),
    ("imagenet", ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
    ("data", None),
])
def test_normalise_forms(text, want):
    assert parse_normalise(text) == want


@pytest.mark.parametrize("text", ["0.5", "0.5,0.2,0.1", "0.5/0", "a/b", "0.1,0.2/0.3"])
def test_normalise_refused(text):
    from xaicompress.errors import XaiCompressError

    with pytest.raises(XaiCompressError, match="--normalise"):
        parse_normalise(text)


def test_preprocess_reaches_deeplift_onnx_and_report(user_model, tmp_path, run_cli):
    """The recorded normalisation is the data every step sees, DeepLIFT's black reference
    (-mean / std), the ONNX file's metadata and the report's line."""
    onnx = pytest.importorskip("onnx")
    net, _ = user_model
    torch.save(net.state_dict(), tmp_path / "w.pth")
    assert _import(run_cli, tmp_path / "w.pth", tmp_path / "c.safetensors")[0] == 0
    ckpt = load_checkpoint(tmp_path / "c.safetensors")
    bundle = load_dataset("digits", preprocess=ckpt.spec.preprocess)
    assert bundle.mean == (MEAN,) and bundle.std == (STD,)
    black = bundle.pixel_to_input(torch.zeros(1, 1, 8, 8))
    assert torch.allclose(black, torch.full_like(black, -MEAN / STD))
    from xaicompress.export.onnx import export_onnx

    export_onnx(ckpt, tmp_path / "m.onnx")
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert meta["normalise_mean"] == "0.5" and meta["normalise_std"] == "0.25"
    assert json.loads(meta["xaicompress.preprocess"])["size"] == 8
    from xaicompress.report.report import _preprocess_line

    line = _preprocess_line({"model": "lenet5", "preprocess": ckpt.spec.preprocess.to_meta()})
    assert "mean 0.5" in line[-1] and "std 0.25" in line[-1]


def test_config_checkpoint_accepts_a_state_dict(user_model, tmp_path):
    from xaicompress.pipeline.config import validate_config
    from xaicompress.pipeline.run import run_pipeline

    net, own = user_model
    torch.save({"state_dict": net.state_dict()}, tmp_path / "w.pth")
    cfg = validate_config({
        "model": "lenet5", "checkpoint": str(tmp_path / "w.pth"), "data": "digits",
        "preprocess": {"normalise": f"{MEAN}/{STD}"},
        "stages": [{"type": "prune_unstructured", "ratio": 0.5, "criterion": "l1"}],
        "export": {"onnx": False}, "report": {"heatmaps": 0, "latency_repeats": 1,
                                              "fidelity_samples": 16}})
    res = run_pipeline(cfg, tmp_path / "out", plots=False)
    assert abs(res.report["baseline"]["accuracy"] - own) < 0.01
    assert res.report["preprocess"]["mean"] == [MEAN]
    # a state dict without model: says what is missing
    from xaicompress.errors import XaiCompressError

    bad = validate_config({"checkpoint": str(tmp_path / "w.pth"), "data": "digits"})
    with pytest.raises(XaiCompressError, match="give model"):
        run_pipeline(bad, tmp_path / "out2")


def test_folder_resize_centre_crop_matches_torchvision(tmp_path):
    """`--resize R --size S` on image folders is torchvision's Resize(R) + CenterCrop(S)."""
    from PIL import Image

    from xaicompress.data.folder import load_image
    from xaicompress.models.vision_import import import_torchvision

    tv = import_torchvision()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (37, 50, 3), dtype=np.uint8), "RGB").save(
        tmp_path / "a.png")
    ours = load_image(tmp_path / "a.png", "RGB", 24, 28)
    tf = tv.transforms.Compose([tv.transforms.Resize(28), tv.transforms.CenterCrop(24),
                                tv.transforms.PILToTensor()])
    theirs = tf(Image.open(tmp_path / "a.png").convert("RGB")).float().numpy() / 255.0
    assert ours.shape == (3, 24, 24)
    np.testing.assert_array_equal(ours, theirs)
