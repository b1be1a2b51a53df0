"""Quantization-aware entropy-constrained sharing (share `finetune: qat`, ECQx): weights move
between clusters while training, pruned weights stay zero, every kept state fits the budget
in coded bits, the best state is the validation split's, and the packed file reloads to the
same outputs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError
from torch.utils.data import TensorDataset

from tests.test_entropy_share import _weight_bits
from xaicompress.checkpoint import Checkpoint, ModelSpec
from xaicompress.encoding import Mask
from xaicompress.errors import XaiCompressError
from xaicompress.export.packed import packed_bytes, packed_from_bytes
from xaicompress.pipeline.config import ShareStage
from xaicompress.quant.codebook import share_weights
from xaicompress.quant.share_qat import periods_of
from xaicompress.relevance import prunable_layers
from xaicompress.train import accuracy

AVG_BITS = 1.0
SHAPE = (1, 8, 8)  # 8 x 8 digits' size: a LeNet-5 of 6k weights keeps the tests fast


def _ckpt() -> Checkpoint:
    torch.manual_seed(0)
    spec = ModelSpec("lenet5", SHAPE, 10, {})
    return Checkpoint(spec.build().eval(), spec, "digits")


def _data(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, *SHAPE, generator=g), torch.randint(0, 10, (n,),
                                                                          generator=g))


def _pruned() -> Checkpoint:
    ck = _ckpt()
    for name, m in prunable_layers(ck.model).items():
        ck.state.get(name).mask = Mask(m.weight.detach().abs() > 0.03)
    ck.state.apply(ck.model)
    return ck


def _share(ck, bundle, **kw):
    return share_weights(ck, "l1", bundle, avg_bits=AVG_BITS, assignment="entropy",
                         samples=32, **kw)


@pytest.fixture(scope="module")
def qat_last():
    """QAT without a validation split (the last state is kept) and the start it came from."""
    ck = _pruned()
    bundle = SimpleNamespace(train=_data(64), val=None)
    start = _share(ck, bundle)
    return ck, start, _share(ck, bundle, finetune="qat", finetune_epochs=1, finetune_lr=3e-3)


def test_qat_moves_weights_between_clusters(qat_last):
    _, start, qat = qat_last
    log = qat.history[-1]["log"]
    assert qat.history[-1]["stage"] == "finetune_qat"
    assert [e["event"] for e in log].count("reassign") == 2  # 1 epoch x 2 periods
    assert sum(e["to_zero"] + e["from_zero"] for e in log if e["event"] == "reassign") > 0
    # the shipped assignment is not the one sharing started from
    assert any(not torch.equal(qat.state.layers[n].codebook.indices,
                               start.state.layers[n].codebook.indices)
               for n in prunable_layers(qat.model))


def test_qat_keeps_pruned_weights_zero_and_fits_the_budget(qat_last):
    ck, _, qat = qat_last
    n = 0
    for name, m in prunable_layers(qat.model).items():
        before = ck.state.layers[name].mask.keep
        lc = qat.state.layers[name]
        assert not (lc.mask.keep & ~before).any()  # nothing pruned comes back
        assert (m.weight.detach()[~before] == 0).all()
        z = lc.codebook.zero_entry()
        assert z is not None and lc.codebook.values[z] == 0
        assert torch.equal(lc.mask.keep, lc.codebook.indices != z)  # the zero cluster
        assert torch.equal(m.weight.detach(), lc.effective(m.weight.detach()))
        n += m.weight.numel()
    assert _weight_bits(qat) <= AVG_BITS * n
    for e in qat.history[-1]["log"]:
        if e["event"] == "reassign":
            assert e["used_bits"] <= AVG_BITS * n


def test_qat_packed_file_reloads_to_identical_outputs(qat_last):
    _, _, qat = qat_last
    assert not any("parametrizations" in k for k in qat.model.state_dict())
    assert all(p.requires_grad for p in qat.model.parameters())
    back = packed_from_bytes(packed_bytes(qat))
    x = torch.randn(8, *SHAPE)
    with torch.no_grad():
        assert torch.equal(back.model(x), qat.model(x))


def test_qat_keeps_the_best_state_on_validation():
    val = _data(48, seed=1)
    qat = _share(_pruned(), SimpleNamespace(train=_data(64), val=val), finetune="qat",
                 finetune_epochs=1, finetune_lr=3e-3)
    h = qat.history[-1]
    states = [e for e in h["log"] if e.get("val_loss") is not None]
    assert len(states) == 3  # start, after each of the two budgeted re-assignments
    # the kept state is the one of the lowest validation loss (SELECT_BY; the later one on
    # a tie), and the model is that state: its accuracy is the one logged for it
    best = min(states, key=lambda e: (e["val_loss"], -e["step"]))
    assert h["select_by"] == "loss" and h["kept_step"] == best["step"]
    assert h["kept_val_accuracy"] == best["val_accuracy"]
    assert accuracy(qat.model, val) == pytest.approx(best["val_accuracy"])
    assert len({e["val_loss"] for e in states}) == 3  # the states really differ


def test_periods_split_the_steps():
    assert periods_of(3, 10, 2) == [5, 5, 5, 5, 5, 5]
    assert periods_of(0.5, 10, 2) == [5]
    assert sum(periods_of(2, 7, 3)) == 14


def test_qat_option_errors():
    with pytest.raises(XaiCompressError, match="assignment entropy"):
        share_weights(_ckpt(), "none", None, clusters=4, finetune="qat", finetune_epochs=1)
    with pytest.raises(XaiCompressError, match="--finetune"):
        share_weights(_ckpt(), "none", None, clusters=4, finetune="lloyd")
    with pytest.raises(ValidationError, match="assignment entropy"):
        ShareStage(type="share", clusters=4, finetune="qat")
    assert ShareStage(type="share", avg_bits=0.9, assignment="entropy",
                      finetune="qat").finetune == "qat"


def test_size_kb_budget_holds_the_packed_file():
    from xaicompress.export.packed import packed_report

    ck = _pruned()
    bundle = SimpleNamespace(train=_data(64), val=_data(48, seed=1))
    for kw in ({}, {"finetune": "qat", "finetune_epochs": 0.5, "finetune_lr": 3e-3}):
        sh = share_weights(ck, "l1", bundle, size_kb=1.5, assignment="entropy", samples=32,
                           **kw)
        size = packed_report(sh).file_bytes
        assert 0.9 * 1536 <= size <= 1536  # the budget is used, and held
    with pytest.raises(XaiCompressError, match="--size-kb"):
        share_weights(ck, "l1", bundle, size_kb=1.5, clusters=4)
    with pytest.raises(ValidationError, match="size_kb"):
        ShareStage(type="share", size_kb=2.0, avg_bits=0.9, assignment="entropy")


def test_a_re_assignment_that_cannot_fit_skips_its_period(monkeypatch):
    # a budgeted re-assignment that fails (the coder could not be brought within the
    # budget) costs that period's measurement, not the run: training goes on and the kept
    # state is one that fit
    import xaicompress.quant.codebook as cb

    real = cb.entropy_assigner

    def flaky(*args, **kwargs):
        inner, calls = real(*args, **kwargs), []

        def assign(weights, starts=None):
            calls.append(1)
            if len(calls) == 2:  # the first re-assignment during training
                raise XaiCompressError("--avg-bits 1.0: could not fit the entropy-coded "
                                       "layers in the budget")
            return inner(weights, starts)
        return assign

    monkeypatch.setattr(cb, "entropy_assigner", flaky)
    val = _data(48, seed=1)
    ck = _pruned()
    qat = _share(ck, SimpleNamespace(train=_data(64), val=val), finetune="qat",
                 finetune_epochs=1, finetune_lr=3e-3)
    log = qat.history[-1]["log"]
    assert [e["event"] for e in log] == ["start", "reassign_failed", "reassign"]
    assert qat.history[-1]["kept_step"] in [e["step"] for e in log if e.get("val_loss")]
    n = sum(m.weight.numel() for m in prunable_layers(ck.model).values())
    assert _weight_bits(qat) <= AVG_BITS * n
