import pickle

import pytest
import torch
from safetensors.torch import save_file

from tests.badinput.makers_files import edit_checkpoint
from xaicompress.checkpoint import Checkpoint, ModelSpec, load_checkpoint, save_checkpoint
from xaicompress.encoding import CompressionState, IntGrid, Mask
from xaicompress.errors import XaiCompressError


def _ckpt(name="lenet5", shape=(1, 28, 28)):
    torch.manual_seed(0)
    spec = ModelSpec(name, shape, 10)
    model = spec.build().eval()
    return Checkpoint(model, spec, "mnist5k", history=[{"stage": "train"}], metrics={"a": 1.0})


@pytest.mark.parametrize("name,shape", [("lenet5", (1, 28, 28)), ("lenet300", (1, 28, 28)),
                                        ("vgg11", (3, 32, 32)), ("resnet20", (1, 28, 28))])
def test_roundtrip_identical_outputs(tmp_path, name, shape):
    ck = _ckpt(name, shape)
    x = torch.randn(4, *shape)
    p = save_checkpoint(ck, tmp_path / "m.safetensors")
    back = load_checkpoint(p)
    assert torch.equal(ck.model(x), back.model(x))
    assert back.history == [{"stage": "train"}] and back.metrics == {"a": 1.0}
    assert back.data == "mnist5k"


def test_resized_layers_rebuild(tmp_path):
    """A checkpoint whose layers were narrowed (as structured pruning does) reloads."""
    import torch_pruning as tp

    ck = _ckpt("resnet20", (1, 28, 28))
    ex = torch.randn(1, 1, 28, 28)
    dg = tp.DependencyGraph().build_dependency(ck.model, example_inputs=ex)
    group = dg.get_pruning_group(ck.model.conv1, tp.prune_conv_out_channels, idxs=[0, 3, 5])
    group.prune()
    x = torch.randn(2, 1, 28, 28)
    p = save_checkpoint(ck, tmp_path / "p.safetensors")
    back = load_checkpoint(p)
    assert back.model.conv1.out_channels == 13
    assert torch.equal(ck.model(x), back.model(x))


def test_compression_state_roundtrip(tmp_path):
    ck = _ckpt()
    w = ck.model.fc1.weight
    mask = torch.rand(w.shape) > 0.5
    st = CompressionState()
    st.get("fc1").mask = Mask(mask)
    st.get("fc2").weights = IntGrid(4, ck.model.fc2.weight.detach().abs().amax(1) / 7)
    st.apply(ck.model)
    ck.state = st
    assert (ck.model.fc1.weight[~mask] == 0).all()
    back = load_checkpoint(save_checkpoint(ck, tmp_path / "c.safetensors"))
    assert torch.equal(back.state.layers["fc1"].mask.keep, mask)
    assert back.state.layers["fc2"].grid.bits == 4
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(ck.model(x), back.model(x))


def test_bad_files(tmp_path):
    ck = _ckpt()
    good = save_checkpoint(ck, tmp_path / "good.safetensors")
    raw = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 100)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"a": 1}))
    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))

    def nan(t):
        t["fc1.weight"][0, 0] = float("nan")

    def shape(t):
        t["fc1.weight"] = torch.zeros(3, 3)

    # re-signed: the loader's checks must hold although the checksum matches
    edit_checkpoint(good, tmp_path, "nan.safetensors", tensors_fn=nan)
    edit_checkpoint(good, tmp_path, "shape.safetensors", tensors_fn=shape)
    edit_checkpoint(good, tmp_path, "unknown.safetensors",
                    meta_fn=lambda m: m["model"].update(name="no_such_net"))
    edit_checkpoint(good, tmp_path, "unsigned.safetensors", tensors_fn=nan, sign=False)
    cases = {"trunc": "truncated or corrupt", "garbage": "truncated or corrupt",
             "empty": "truncated or corrupt", "foreign": "without xaicompress metadata",
             "nan": "NaN or Inf", "unknown": "unknown model", "shape": "has shape",
             "unsigned": "checksum mismatch"}
    for stem, msg in cases.items():
        with pytest.raises(XaiCompressError, match=msg) as ei:
            load_checkpoint(tmp_path / f"{stem}.safetensors")
        assert stem in str(ei.value) and "\n" not in str(ei.value)
    with pytest.raises(XaiCompressError, match="refusing to unpickle"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(XaiCompressError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    ck = _ckpt()
    p = save_checkpoint(ck, tmp_path / "m.safetensors")
    before = p.read_bytes()
    import xaicompress.checkpoint as cp

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(cp, "checkpoint_bytes", boom)
    with pytest.raises(RuntimeError):
        cp.save_checkpoint(ck, p)
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["m.safetensors"]


def test_version_1_files_without_checksum_still_load(tmp_path):
    ck = _ckpt()
    good = save_checkpoint(ck, tmp_path / "v2.safetensors")

    def to_v1(m):
        m["version"] = 1
    edit_checkpoint(good, tmp_path, "v1.safetensors", meta_fn=to_v1, sign=False)
    back = load_checkpoint(tmp_path / "v1.safetensors")
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(back.model(x), ck.model(x))


def test_checksum_covers_metadata_and_every_tensor(tmp_path):
    raw = bytearray(save_checkpoint(_ckpt(), tmp_path / "m.safetensors").read_bytes())
    n = int.from_bytes(raw[:8], "little")
    # one flipped bit in the last tensor byte, and one in a metadata digit
    for pos in (len(raw) - 1, raw.index(b'"num_classes\\": 10') + 17):
        bad = bytearray(raw)
        bad[pos] ^= 0x01
        (tmp_path / "bad.safetensors").write_bytes(bytes(bad))
        with pytest.raises(XaiCompressError, match="checksum mismatch"):
            load_checkpoint(tmp_path / "bad.safetensors")
    assert n < len(raw)


def test_a_diverged_model_is_not_written(tmp_path):
    ck = _ckpt()
    with torch.no_grad():
        ck.model.fc2.bias[3] = float("nan")
    out = tmp_path / "m.safetensors"
    with pytest.raises(XaiCompressError, match=r"m.safetensors: not written: .*NaN.*'fc2.bias'"):
        save_checkpoint(ck, out)
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_does_not_reproduce_the_model_is_not_written(tmp_path, monkeypatch):
    import xaicompress.checkpoint as cp

    ck, other = _ckpt(), _ckpt()
    with torch.no_grad():
        other.model.fc3.bias += 1  # loads fine, but gives other outputs
    real = cp.checkpoint_bytes
    monkeypatch.setattr(cp, "checkpoint_bytes", lambda c: real(other))
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"previous")
    with pytest.raises(XaiCompressError, match="not written: reloaded, it gives other outputs"):
        cp.save_checkpoint(ck, out)
    assert out.read_bytes() == b"previous" and len(list(tmp_path.iterdir())) == 1


def test_user_factory_needs_the_users_word(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(
        "from torch import nn\n"
        "def tiny(num_classes=10, in_channels=1, image_size=28, hidden=8):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels*image_size**2, hidden),\n"
        "                         nn.ReLU(), nn.Linear(hidden, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = ModelSpec("mynets:tiny", (1, 28, 28), 10, {"hidden": 4})
    p = save_checkpoint(Checkpoint(spec.build(), spec), tmp_path / "u.safetensors")
    with pytest.raises(XaiCompressError, match="refusing to run it on a file's word"):
        load_checkpoint(p)
    assert load_checkpoint(p, model="mynets:tiny").model[1].out_features == 4
