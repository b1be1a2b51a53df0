"""Knowledge distillation: fine-tuning that also matches a teacher's softened outputs.

Every fine-tuning a compression step runs (after structured or unstructured pruning, of
shared codebooks or quantization-aware, the `finetune` stage) minimises the cross-entropy
on the labels. With `distill: a` (0 < a <= 1) the loss becomes

    (1 - a) * CE(student(x), y) + a * T^2 * KL(softmax(teacher(x) / T) || softmax(student(x) / T))

(Hinton et al. 2015; T = `TEMPERATURE`, the T^2 keeps the gradient's scale independent of
T). The teacher is the step's *input* model: what the step compresses, so the step learns
to keep its input's decisions, including its confidence on the wrong classes, which a
small training set's hard labels do not carry. It runs in eval mode on the same
(augmented) batch as the student, without gradients. a = 1 trains on the teacher alone
(labels unused), which is how a user without labels fine-tunes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xaicompress.errors import OptionError

#: softmax temperature of the distillation term (chosen on mnist5k?split=2, docs/design.md)
TEMPERATURE = 4.0

#: loss(student logits (N, K), inputs (N, C, H, W), labels (N,)) -> scalar
LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def cross_entropy(logits: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """The plain fine-tuning loss (x unused)."""
    return F.cross_entropy(logits, y)


@dataclass
class Distillation:
    """The distillation loss of one fine-tuning: `weight` (a above) of the teacher's term."""

    teacher: nn.Module
    weight: float
    temperature: float = TEMPERATURE

    def __call__(self, logits: Tensor, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            target = self.teacher(x).float()
        t = self.temperature
        kd = F.kl_div(F.log_softmax(logits.float() / t, dim=1),
                      F.log_softmax(target / t, dim=1), log_target=True,
                      reduction="batchmean") * (t * t)
        if self.weight >= 1.0:
            return kd
        return (1.0 - self.weight) * F.cross_entropy(logits, y) + self.weight * kd


def check_distill(weight: float) -> None:
    if not 0.0 <= weight <= 1.0 or weight != weight:
        raise OptionError("distill", weight, "expected a weight between 0 (off) and 1")


def distillation(teacher: nn.Module, weight: float) -> LossFn:
    """The loss of a fine-tuning distilled from `teacher` with `weight` (0: plain
    cross-entropy, no teacher kept). The teacher is copied, frozen and put in eval mode, so
    the caller may go on changing its own model."""
    check_distill(weight)
    if weight == 0:
        return cross_entropy
    frozen = copy.deepcopy(teacher).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return Distillation(frozen, float(weight))
