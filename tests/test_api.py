"""The Python API on plain PyTorch objects (`import xaicompress as xc`), README's example
included."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import xaicompress as xc
from xaicompress.errors import XaiCompressError

README = Path(__file__).resolve().parents[1] / "README.md"


class Net(nn.Module):
    """A hand-written CNN: F.relu, a reused nn.ReLU, BatchNorm and a residual add."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(width * 4 * 4, 4)

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)) + h)
        return self.fc(F.max_pool2d(F.relu(h), 2).flatten(1))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    x = torch.randn(200, 1, 8, 8, generator=g) * 0.3
    x[:, 0, (y * 2), :] += 1.5  # class k: a bright row 2k (learnable in a few steps)
    return TensorDataset(x, y)


@pytest.fixture(scope="module")
def model(data):
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3):
        for x, y in DataLoader(data, batch_size=32, shuffle=True):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    return net.eval()


def _logits(m, data):
    with torch.no_grad():
        return m.eval()(data.tensors[0][:32])


def test_steps_take_and_return_modules(model, data, tmp_path):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = xc.prune_structured(model, data, ratio=0.5, criterion="deeplift")
    assert isinstance(small, Net) and small.conv1.out_channels < model.conv1.out_channels
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in
                                                            model.parameters())
    sparse = xc.prune_unstructured(small, DataLoader(data, batch_size=16), ratio=0.5,
                                   layers="all", criterion="l1")
    assert float((sparse.fc.weight == 0).float().mean()) >= 0.45
    shared = xc.share(sparse, data, clusters=4, criterion="l1")
    assert len(torch.unique(shared.fc.weight)) <= 4 + 1  # 4 centroids and the masked zeros
    assert (shared.fc.weight == 0).sum() >= (sparse.fc.weight == 0).sum()
    for k, v in model.state_dict().items():  # the input is never modified
        assert torch.equal(v, before[k])
    # what was recorded travels with the module and reloads exactly
    history = [h["stage"] for h in xc.compression_of(shared).history]
    assert history == ["prune_structured", "prune_unstructured", "share"]
    for name in ("s.safetensors", "s.xcpk"):
        xc.save(shared, tmp_path / name)
        back = xc.load(tmp_path / name, model=Net())
        assert torch.equal(_logits(back, data), _logits(shared, data))


def test_quantize_and_explain(model, data):
    q = xc.quantize(model, data, avg_bits=4, criterion="l1")
    scale = xc.compression_of(q).state.layers["fc"].grid.scale
    levels = torch.unique((q.fc.weight / scale.view(-1, 1)).round())
    assert len(levels) <= 16
    rel = xc.explain(model, data, samples=64, normalise=((0.5,), (0.25,)))
    assert set(rel.units) == {"conv1", "conv2", "fc"}
    assert rel.units["conv1"].shape == (8,) and rel.weights["fc"].shape == model.fc.weight.shape


def test_bad_arguments_are_one_line(model, data):
    with pytest.raises(XaiCompressError, match="ratio"):
        xc.prune_structured(model, data, ratio=1.5)
    with pytest.raises(XaiCompressError, match="nosuchoption"):
        xc.share(model, data, clusters=4, nosuchoption=1)
    with pytest.raises(XaiCompressError, match="expected a torch Dataset"):
        xc.prune_structured(model, [1, 2, 3])
    with pytest.raises(XaiCompressError, match="cannot run on an item"):
        xc.prune_structured(model, TensorDataset(torch.zeros(4, 3, 5, 5), torch.zeros(4)))
    with pytest.raises(XaiCompressError, match="data does not apply to xc.compress"):
        xc.compress(model, train=data, config={"data": "mnist5k"})


def _readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), scope)  # noqa: S102
    assert os.path.isfile("tiny.xcpk") and os.path.isfile("tiny-run/report.md")
    x = scope["data"].test[0][0][None]
    assert torch.equal(scope["again"](x), scope["tiny"](x))
    report = scope["result"].report
    assert report["final"]["size_bytes"] < report["baseline"]["size_bytes"]
    assert report["preprocess"]["mean"] == list(scope["norm"][0])
