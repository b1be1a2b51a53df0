"""Devices on a CPU-only machine: `--device` resolution and errors, the same numbers with
`cpu` / `auto` as before, mixed precision on the CPU, CPU files, and device-following code
checked on the "meta" device (a second device that exists everywhere and, like a GPU,
refuses to mix its tensors with CPU tensors). The CUDA checks are in tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors import safe_open

from xaicompress import device as dv
from xaicompress.errors import XaiCompressError

META = torch.device("meta")


# ------------------------------------------------------------------ resolve_device
def test_cpu_and_auto_resolve_to_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dv.resolve_device("cpu") == torch.device("cpu")
    assert dv.resolve_device("auto") == torch.device("cpu")
    assert dv.resolve_device(None) == torch.device("cpu")
    for spec in ("cuda", "cuda:0", "CUDA:1"):
        with pytest.raises(XaiCompressError, match="CUDA is not available"):
            dv.resolve_device(spec)
    with pytest.raises(XaiCompressError, match="expected one of auto, cpu, cuda, cuda:N"):
        dv.resolve_device("gpu")


def test_cuda_indices_and_torchrun_local_rank(monkeypatch):
    # no kernel runs: only which torch.device a spec names, with two GPUs pretended
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert dv.resolve_device("auto") == torch.device("cuda", 0)
    assert dv.resolve_device("cuda") == torch.device("cuda", 0)
    assert dv.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(XaiCompressError, match="GPU index 2 does not exist; this machine has 2"):
        dv.resolve_device("cuda:2")
    with pytest.raises(XaiCompressError, match="cuda:N"):
        dv.resolve_device("cuda:x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dv.resolve_device("auto") == torch.device("cuda", 1)  # each rank its own GPU
    assert dv.resolve_device("cpu") == torch.device("cpu")


def test_backend_follows_the_tensors_device(monkeypatch):
    from xaicompress import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.backend() == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # NCCL only for CUDA tensors: CPU tensors (a --device cpu run, object broadcasts) use gloo
    assert distributed.backend() == "cpu:gloo,cuda:nccl"


def test_runtime_settings(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rt = dv.make_runtime("auto")
    assert (rt.device, rt.workers, rt.pin_memory, rt.amp) == (torch.device("cpu"), 0, False,
                                                              "off")
    with pytest.raises(XaiCompressError, match="--amp fp16: needs a CUDA device"):
        dv.make_runtime("cpu", amp="fp16")
    assert dv.runtime() == dv.Runtime()
    with dv.use_runtime(dv.make_runtime("cpu", workers=1, amp="bf16")):
        assert dv.runtime().workers == 1 and dv.runtime().amp == "bf16"
        from xaicompress.data import make_loader

        loader = make_loader(torch.utils.data.TensorDataset(torch.zeros(4, 1)), 2)
        assert loader.num_workers == 1 and not loader.pin_memory
    assert dv.runtime() == dv.Runtime()  # restored


def test_to_device_moves_nested_batches():
    batch = (torch.zeros(2, 3), [torch.ones(2)], {"y": torch.arange(2)}, "label")
    moved = dv.to_device(batch, META)
    assert moved[0].device == META and moved[1][0].device == META
    assert moved[2]["y"].device == META and moved[3] == "label"
    model = torch.nn.Linear(3, 2).to(META)
    assert dv.model_device(model) == META
    assert dv.to_model_device(torch.zeros(1, 3), model).device == META
    assert dv.model_device(torch.nn.ReLU()) == torch.device("cpu")
    # a CPU copy for writing files; the model itself stays where it is
    cpu_model = torch.nn.Linear(3, 2)
    assert dv.cpu_copy(cpu_model) is cpu_model


# ------------------------------------------------------------------ CLI
def test_device_cuda_without_cuda_is_exit_2_one_line(tmp_path, run_cli):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run_cli("train", "--model", "lenet300", "--data", "digits", "--device",
                           "cuda", "--out", tmp_path / "m.safetensors")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--device cuda: CUDA is not available" in err
    assert not (tmp_path / "m.safetensors").exists()
    code, _, err = run_cli("evaluate", "x.safetensors", "--device", "gpu")
    assert code == 2 and "--device" in err and "cuda:N" in err and "Traceback" not in err
    code, _, err = run_cli("train", "--amp", "fp16", "--out", tmp_path / "m.safetensors")
    assert code == 2 and "--amp fp16: needs a CUDA device" in err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": "lenet300", "data": "digits", "device": "cuda:3",
                                   "train": {"epochs": 0}}))
    code, _, err = run_cli("compress", "--config", cfg, "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "device: cuda:3: CUDA is not available" in err  # names the config's key
    assert not (tmp_path / "out").exists()


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("devices", [("cpu", "auto")])
def test_cpu_and_auto_give_the_numbers_of_before(tmp_path, run_cli, devices):
    """The library outside any command (the code path of before: no device, no workers)
    and `--device cpu` / `auto` (+ workers, which never change the order) train the same
    bits; the checkpoint holds CPU float32 tensors."""
    from xaicompress.train import train_checkpoint

    lib = train_checkpoint("lenet300", "digits", epochs=0.2, seed=3)
    want = {k: v for k, v in lib.model.state_dict().items()}
    for i, device in enumerate(devices):
        out = tmp_path / f"{device}.safetensors"
        extra = ["--workers", "1"] if i else []
        code, _, err = run_cli("train", "--model", "lenet300", "--data", "digits", "--epochs",
                               "0.2", "--seed", "3", "--device", device, *extra, "--out", out)
        assert code == 0, err
        got = _tensors(out)
        for k, v in want.items():
            assert torch.equal(got[k], v), (device, k)
            assert got[k].device.type == "cpu" and got[k].dtype == v.dtype


def test_amp_bf16_on_cpu_trains_a_finite_float32_checkpoint(tmp_path, run_cli):
    out = tmp_path / "bf16.safetensors"
    code, stdout, err = run_cli("train", "--model", "lenet300", "--data", "digits", "--epochs",
                                "0.5", "--amp", "bf16", "--device", "cpu", "--out", out)
    assert code == 0, err
    acc = float(stdout.split("test accuracy ")[1].split("%")[0])
    assert acc > 50.0  # 10 classes: chance is 10%
    tensors = _tensors(out)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all()
               for t in tensors.values() if t.is_floating_point())
    # autocast really ran: bf16 training does not reproduce the float32 bits
    from xaicompress.train import train_checkpoint

    fp32 = train_checkpoint("lenet300", "digits", epochs=0.5, seed=0).model.state_dict()
    assert any(not torch.equal(tensors[k], v) for k, v in fp32.items())


# ------------------------------------------------------------------ device-following code
def test_training_loop_moves_batches_to_the_models_device(digits):
    """train() on a model on the meta device: every batch (and the random shifts) must be
    moved there, or the first forward raises."""
    from xaicompress.models import create_model
    from xaicompress.train import train

    model = create_model("lenet300", digits.input_shape, digits.num_classes).to(META)
    train(model, digits.train, epochs=0.05, augment=1)
    assert all(p.device == META for p in model.parameters())


def test_compression_state_stays_on_cpu_and_follows_the_weight():
    from xaicompress.encoding import Codebook, CompressionState, IntGrid, LayerEncoding, Mask
    from xaicompress.encoding.activation import ActQuant, fake_quant_activation

    w = torch.randn(4, 6)
    keep = w.abs() > 0.5
    cb = Codebook(torch.tensor([-1.0, 0.0, 1.0]), torch.randint(0, 3, (4, 6)))
    grid = IntGrid(4, torch.full((4,), 0.1))
    for enc in (LayerEncoding(mask=Mask(keep)), LayerEncoding(weights=cb),
                LayerEncoding(mask=Mask(keep), weights=grid)):
        assert all(t.device.type == "cpu" for t in _state_tensors(enc))
        assert enc.effective(w.to(META)).device == META  # moved where it meets the weight
        assert torch.equal(enc.effective(w), enc.effective(w.clone()))
    model = torch.nn.Sequential(torch.nn.Linear(6, 4)).to(META)
    CompressionState({"0": LayerEncoding(mask=Mask(keep), weights=grid)}).apply(model)
    aq = ActQuant(8, torch.tensor(0.05))
    assert fake_quant_activation(torch.zeros(2, 6, device=META), aq.scale, 8).device == META


def _state_tensors(enc):
    out = []
    if enc.mask is not None:
        out.append(enc.mask.keep)
    if enc.codebook is not None:
        out += [enc.codebook.values, enc.codebook.indices]
    if enc.grid is not None:
        out.append(enc.grid.scale)
    return out

