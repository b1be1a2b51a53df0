"""Group importance for Torch-Pruning, fed by any xaicompress criterion.

Torch-Pruning couples channels into *groups* (a conv's filters, its BatchNorm, the next
layers' input channels, and every conv joined to it by a residual addition). A criterion
scores each Conv2d/Linear layer's output units independently, so a group's score is built
from the scores of its members:

**Group rule.** For every member layer whose *output* channels the group removes (the
root, plus convs coupled through residual additions / shortcuts), take the criterion's unit
scores, L1-normalise them per layer (``s / sum |s|``) and average them over those members,
channel by channel (aligned through Torch-Pruning's ``root_idxs``). Input-channel members
(the next layer) and BatchNorms add nothing: the criterion already scores a unit by its
effect downstream. The pruner then L1-normalises the group vector once more (a no-op for
a single member) so that groups of different sizes and any Torch-Pruning importance are
ranked on the same per-layer-normalised scale in global scope.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn
from torch.utils.data import Dataset

from xaicompress.device import to_model_device
from xaicompress.relevance.base import Relevance

_OUT_FNS = (tp.pruner.function.prune_conv_out_channels,
            tp.pruner.function.prune_linear_out_channels)


def l1_normalise(t: Tensor) -> Tensor:
    """`t / sum |t|` (float32); a vector of zeros becomes uniform."""
    t = t.detach().float().reshape(-1)
    s = t.abs().sum()
    return t / s if s > 0 else torch.full_like(t, 1.0 / max(1, t.numel()))


class RelevanceImportance(tp.importance.Importance):
    """A `tp.importance.Importance` returning a criterion's unit scores for a group.

    units: module -> float (out_units,) scores of that module's output units (a
    `Relevance.units` entry, looked up by module object so it survives renaming).
    Returns float32 (group_channels,), the mean of the member layers' L1-normalised scores.
    """

    def __init__(self, units: dict[nn.Module, Tensor]):
        self.units = units

    @classmethod
    def from_relevance(cls, model: nn.Module, relevance: Relevance) -> RelevanceImportance:
        modules = dict(model.named_modules())
        return cls({modules[name]: scores for name, scores in relevance.units.items()
                    if name in modules})

    @torch.no_grad()
    def __call__(self, group: tp.dependency.Group) -> Tensor | None:
        total: Tensor | None = None
        members = 0
        n = len(group[0].idxs)
        for item in group:
            dep, idxs = item.dep, item.idxs
            if dep.pruning_fn not in _OUT_FNS or dep.layer not in self.units:
                continue
            root_idxs = item.root_idxs
            if any(r is None for r in root_idxs):
                continue
            scores = l1_normalise(self.units[dep.layer])
            if scores.numel() <= max(idxs):
                raise ValueError(f"relevance has {scores.numel()} unit scores, layer has more "
                                 "channels: relevance computed on another model?")
            if total is None:
                total = torch.zeros(n)
            total.scatter_add_(0, torch.as_tensor(root_idxs), scores[torch.as_tensor(idxs)])
            members += 1
        return None if total is None else total / members


def needs_gradients(importance: object) -> bool:
    """Torch-Pruning importances that read `.grad` (Taylor expansion)."""
    return isinstance(importance, tp.importance.GroupTaylorImportance)


def accumulate_gradients(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> None:
    """Fill `.grad` of every parameter with the summed cross-entropy gradient over `batches`
    ((N, C, H, W) inputs, (N,) labels), as Torch-Pruning's Taylor importance expects."""
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    for batch in batches:
        x, y = to_model_device(batch, model)
        F.cross_entropy(model(x), y, reduction="sum").backward()
    model.train(was_training)


def gradient_batches(dataset: Dataset, samples: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """`samples` seeded-random items of `dataset` in batches of 128."""
    from xaicompress.data import make_loader, subset

    return list(make_loader(subset(dataset, samples, seed=seed), 128, shuffle=False, seed=seed))
