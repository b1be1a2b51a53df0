"""Knowledge distillation in the compression steps' fine-tuning (`distill`)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from xaicompress.distill import TEMPERATURE, cross_entropy, distillation
from xaicompress.errors import OptionError
from xaicompress.train import accuracy, finetune_checkpoint, train_checkpoint


@pytest.fixture(scope="module")
def trained(digits):
    return train_checkpoint("lenet300", "digits", epochs=3, seed=0, bundle=digits)


def _shuffled_labels(dataset, seed=0):
    xs = torch.stack([dataset[i][0] for i in range(len(dataset))])
    ys = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(xs, ys[torch.randperm(len(ys), generator=g)])


def test_weight_zero_is_plain_cross_entropy_and_keeps_no_teacher(trained):
    assert distillation(trained.model, 0.0) is cross_entropy


def test_the_distillation_term_is_the_softened_kl_and_zero_on_the_teacher_itself(trained,
                                                                                  digits):
    x = torch.stack([digits.test[i][0] for i in range(32)])
    y = torch.zeros(32, dtype=torch.long)
    loss = distillation(trained.model, 1.0)
    with torch.no_grad():
        t = trained.model(x)
        s = t + torch.randn_like(t)
        assert float(loss(t, x, y)) == pytest.approx(0.0, abs=1e-6)
        expected = torch.nn.functional.kl_div(
            torch.log_softmax(s / TEMPERATURE, 1), torch.log_softmax(t / TEMPERATURE, 1),
            log_target=True, reduction="batchmean") * TEMPERATURE ** 2
        assert float(loss(s, x, y)) == pytest.approx(float(expected), rel=1e-5)
        half = distillation(trained.model, 0.5)(s, x, y)
        ce = torch.nn.functional.cross_entropy(s, y)
        assert float(half) == pytest.approx(float(0.5 * ce + 0.5 * expected), rel=1e-5)
        assert float(expected) > 0


def test_distill_one_needs_no_labels_where_labels_would_ruin_the_model(trained, digits):
    # fine-tuning on shuffled labels: cross-entropy learns them and loses the digits; with
    # distill 1 the labels are unused and the model (its own teacher) keeps its accuracy
    noisy = _shuffled_labels(digits.train)
    base = accuracy(trained.model, digits.test)
    plain = finetune_checkpoint(trained, noisy, epochs=3, lr=3e-3, seed=0)
    taught = finetune_checkpoint(trained, noisy, epochs=3, lr=3e-3, seed=0, distill=1.0)
    assert base > 90
    assert accuracy(plain.model, digits.test) < base - 20
    assert accuracy(taught.model, digits.test) == pytest.approx(base, abs=1.0)


def test_pruning_records_it_and_a_bad_weight_names_the_option(trained, digits):
    from xaicompress.prune.structured import prune_structured

    out = prune_structured(trained, "l1", digits, ratio=0.5, finetune_epochs=0.5,
                           distill=0.5)
    assert out.history[-1]["distill"] == 0.5
    assert accuracy(out.model, digits.test) > 80
    with pytest.raises(OptionError, match="distill"):
        prune_structured(trained, "l1", digits, ratio=0.5, distill=1.5)


def test_the_cli_refuses_a_weight_outside_zero_to_one(tmp_path, run_cli, trained):
    from xaicompress.checkpoint import save_checkpoint

    path = save_checkpoint(trained, tmp_path / "m.safetensors")
    code, _, err = run_cli("share", path, "--clusters", "4", "--distill", "2",
                           "--out", tmp_path / "s.safetensors")
    assert code == 2 and "--distill" in err and "Traceback" not in err
    assert not (tmp_path / "s.safetensors").exists()
