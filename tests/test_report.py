"""Explanation fidelity measures and report formatting on constructed inputs."""

import pytest
import torch

from xaicompress.report.fidelity import map_similarity
from xaicompress.report.report import report_markdown, summary_table


def test_identical_maps_are_perfectly_faithful():
    a = torch.randn(5, 1, 8, 8)
    cos, overlap = map_similarity(a, a.clone())
    assert torch.allclose(cos, torch.ones(5)) and torch.equal(overlap, torch.ones(5))
    cos, overlap = map_similarity(a, 3 * a)  # scale does not matter
    assert torch.allclose(cos, torch.ones(5))
    cos, _ = map_similarity(a, -a)
    assert torch.allclose(cos, -torch.ones(5))


def test_top10_overlap_counts_shared_top_pixels():
    a = torch.zeros(1, 1, 10, 10)
    b = torch.zeros(1, 1, 10, 10)
    a.view(-1)[:10] = torch.arange(10, 0, -1).float()  # top-10 pixels: 0..9
    b.view(-1)[5:15] = torch.arange(10, 0, -1).float()  # top-10 pixels: 5..14
    _, overlap = map_similarity(a, b)
    assert overlap.item() == pytest.approx(0.5)
    b2 = torch.zeros(1, 1, 10, 10)
    b2.view(-1)[50:60] = -1.0  # sign ignored for the ranking, disjoint pixels
    cos, overlap = map_similarity(a, b2)
    assert overlap.item() == 0 and cos.item() == pytest.approx(0.0)


def test_multichannel_maps_rank_pixels_by_summed_magnitude():
    a = torch.zeros(1, 3, 4, 5)
    a[0, :, 0, 0] = torch.tensor([1.0, -1.0, 1.0])  # strong pixel across channels
    a[0, 0, 3, 4] = 0.5
    cos, overlap = map_similarity(a, a)
    assert cos.item() == pytest.approx(1.0) and overlap.item() == 1.0


def _report():
    m = {"accuracy": 97.9, "params": 61706, "nonzero_params": 61706, "macs": 435850,
         "size_bytes": 247000, "fp32_bytes": 246824, "latency_ms": 11.5}
    f = {**m, "accuracy": 97.5, "params": 17000, "nonzero_params": 5000, "size_bytes": 4600}
    fid = {"cosine": 0.85, "top10_overlap": 0.8, "agreement": 98.0, "samples": 256}
    return {"title": "lenet5 on mnist5k", "version": "0", "seed": 0, "data": "mnist5k",
            "baseline": {**m, "seconds": 20.0},
            "stages": [{"name": "prune_structured", "type": "prune_structured",
                        "criterion": "deeplift", "seconds": 5.0, **f, "fidelity": fid}],
            "final": f, "compression_ratio": 246824 / 4600, "accuracy_drop": 0.4,
            "fidelity": {"method": "m", "final": fid, "per_stage": []},
            "layers": {"fc1": {"units": [120, 32], "weights": 8192, "sparsity": 0.8, "bits": 4,
                               "clusters": 16}},
            "files": {"packed": "model.xcpk", "plot_stages": "stages.png"}}


def test_markdown_and_table_show_the_headline():
    rep = _report()
    md = report_markdown(rep)
    assert "**53.7x smaller**" in md and "97.90% -> 97.50% (-0.40 pt)" in md
    assert "| fc1 | 32/120 | 8,192 | 80.0 | 4 | 16 |" in md
    assert "![stages](stages.png)" in md
    t = summary_table(rep)
    assert t.row_count == 3 and "53.7x smaller" in str(t.title)


def test_layer_summary_reads_each_layers_encoding():
    from xaicompress.checkpoint import Checkpoint, ModelSpec
    from xaicompress.encoding import Codebook, IntGrid, Mask
    from xaicompress.report.report import layer_summary

    torch.manual_seed(0)
    spec = ModelSpec("lenet5", (1, 28, 28), 10)
    base = Checkpoint(spec.build().eval(), spec)
    ck = base.copy()
    w = ck.model.fc1.weight.detach()
    ck.state.get("fc1").mask = Mask(w.abs() > w.abs().median())
    ck.state.get("fc1").weights = Codebook(torch.linspace(-0.1, 0.1, 8),
                                           torch.zeros_like(w, dtype=torch.int64))
    ck.state.get("conv1").weights = IntGrid(5, torch.ones(6))
    ck.state.apply(ck.model)
    rows = layer_summary(base, ck)
    assert (rows["fc1"]["bits"], rows["fc1"]["clusters"]) == (3, 8)
    assert rows["fc1"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert (rows["conv1"]["bits"], rows["conv1"]["clusters"]) == (5, None)
    assert (rows["fc2"]["bits"], rows["fc2"]["sparsity"]) == (32, 0.0)
