"""Structured pruning: remove whole filters / neurons for real, so the model is smaller and
faster.

Channels are removed with Torch-Pruning's `DependencyGraph`: pruning a conv's filters also
prunes its BatchNorm, the next layers' input channels (through flatten as well) and every
conv coupled to it by a residual addition. Each coupled *group* is scored by a
`tp.importance.Importance`: `RelevanceImportance` (our criterion's unit scores; group rule in
`prune/importance.py`: mean of the member layers' per-layer L1-normalised scores) or any
Torch-Pruning importance (e.g. `GroupMagnitudeImportance`), through the same selection.

Selection (per step, on group scores L1-normalised per group):
  scope "layer":  every group keeps ``n0 - round(f * n0)`` of its n0 original channels;
  scope "global": ``round(f * N0)`` of all N0 original channels are removed, the lowest
                  normalised scores first, never leaving a group below `min_channels`;
where f is the step's cumulative target (`schedule.cumulative_targets`) or, with
`macs_ratio`, the smallest f (bisection) whose pruned model's MACs fall by the target.
The classifier (last Linear with num_classes outputs) never loses outputs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.utils.data import Dataset

from xaicompress.calibration import reconstruct_layers, reestimate_batchnorm
from xaicompress.checkpoint import Checkpoint
from xaicompress.device import model_device
from xaicompress.distill import check_distill
from xaicompress.errors import XaiCompressError
from xaicompress.metrics import count_macs
from xaicompress.progress import track
from xaicompress.prune.importance import (
    RelevanceImportance,
    accumulate_gradients,
    gradient_batches,
    l1_normalise,
    needs_gradients,
)
from xaicompress.prune.schedule import (
    PRUNE_FINETUNE_LR,
    Tier,
    check_layer_cap,
    check_options,
    check_ratio,
    check_scope,
    cumulative_targets,
    layer_cap,
    pick_lowest,
)
from xaicompress.prune.support import PruningGraph
from xaicompress.relevance.base import UNITS, Criterion, compute_relevance
from xaicompress.relevance.registry import get_criterion
from xaicompress.train import finetune_checkpoint

CriterionLike = Criterion | str | tp.importance.Importance


def _outputs(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def classifier_layer(model: nn.Module, num_classes: int) -> nn.Module:
    """The layer producing the logits: the last Linear with `num_classes` outputs (else the
    last Conv2d with that many), whose outputs are never pruned."""
    for kind in (nn.Linear, nn.Conv2d):
        found = [m for m in model.modules() if isinstance(m, kind)
                 and (m.out_features if kind is nn.Linear else m.out_channels) == num_classes]
        if found:
            return found[-1]
    raise XaiCompressError(f"model: no Linear or Conv2d layer with {num_classes} outputs found; "
                           "cannot tell which layer is the classifier")


def _as_train_set(bundle_or_train_set: Any) -> Dataset:
    return getattr(bundle_or_train_set, "train", bundle_or_train_set)


def group_scores(model: nn.Module, importance: tp.importance.Importance, example: Tensor,
                 ignored: list[nn.Module]) -> dict[str, Tensor]:
    """Root layer name -> float32 (channels,) L1-normalised importance of every prunable
    group of coupled channels (what `prune.support` excludes left out)."""
    out: dict[str, Tensor] = {}
    for root, group in PruningGraph.build(model, example).groups(ignored):
        imp = importance(group)
        if imp is None:
            continue
        # Torch-Pruning's own importances score on the weights' device; selection is CPU-side
        out[root] = l1_normalise(imp.cpu())
    return out


NORMS = ("l1", "mean", "max")


def plan_removal(scores: dict[str, Tensor], original: dict[str, int], fraction: float,
                 scope: str, min_channels: int, norm: str = "l1",
                 cap: float = 1.0) -> dict[str, list[int]]:
    """Channel indices to remove from each group so that `fraction` of the original channels
    are gone (per group in "layer" scope, in total in "global" scope).

    scores: group -> float (channels,), L1-normalised per group. Global scope compares them
    across groups after `norm`: "l1" as is (the issue's rule; a unit of a wide layer scores
    less), "mean" times the group's channel count (relative to the layer's mean), "max"
    divided by the group's maximum. It removes at most `cap` of any group's original
    channels while the target can be met without exceeding it (beyond that, the lowest
    scores above the cap go next), and never leaves a group below `min_channels`.
    """
    floors = {n: min(min_channels, len(s)) for n, s in scores.items()}
    plan: dict[str, list[int]] = {}
    if scope == "layer":
        for name, s in scores.items():
            n0 = original.get(name, len(s))
            keep = max(floors[name], n0 - int(round(fraction * n0)))
            n_remove = len(s) - keep
            if n_remove > 0:
                order = torch.sort(s, stable=True).indices
                plan[name] = sorted(order[:n_remove].tolist())
        return plan
    if norm == "mean":
        scores = {n: s * len(s) for n, s in scores.items()}
    elif norm == "max":
        scores = {n: s / s.max() if s.max() > 0 else torch.ones_like(s)
                  for n, s in scores.items()}
    total0 = sum(original.get(n, len(s)) for n, s in scores.items())
    current = sum(len(s) for s in scores.values())
    n_remove = current - (total0 - int(round(fraction * total0)))
    if n_remove <= 0:
        return plan
    # tier 0: removable within the cap; tier 1: beyond the cap, down to the floor
    tiers: tuple[Tier, Tier] = ([], [])
    for gi, (name, s) in enumerate(scores.items()):
        n0 = original.get(name, len(s))
        keep_cap = max(floors[name], n0 - int(cap * n0 + 1e-9))
        order = torch.sort(s, stable=True).indices
        split = max(0, len(s) - keep_cap)
        for t, idx in ((0, order[:split]), (1, order[split: len(s) - floors[name]])):
            tiers[t].append((s[idx], torch.full((len(idx),), gi, dtype=torch.long), idx))
    owners, idxs = pick_lowest(tiers, n_remove)
    names = list(scores)
    for gi in owners.unique().tolist():
        plan[names[gi]] = sorted(idxs[owners == gi].tolist())
    return plan


def apply_plan(model: nn.Module, plan: dict[str, list[int]], example: Tensor) -> None:
    """Remove the planned channels (and everything coupled to them) from `model`, in place."""
    if not plan:
        return
    graph = PruningGraph.build(model, example)
    for name, idxs in plan.items():
        group = graph.group(name, idxs)
        if not graph.check(group):
            raise RuntimeError(f"pruning {name} would empty a layer")  # plan keeps >= 1
        group.prune()


def apply_plan_tracked(model: nn.Module, plan: dict[str, list[int]], example: Tensor
                       ) -> dict[str, Tensor]:
    """`apply_plan`, returning for every Conv2d / Linear the indices (in the model before
    the cut) of the output channels it kept. Each layer's bias is temporarily replaced by
    its channel indices, which the dependency graph prunes along with the channels."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    saved = {n: m.bias for n, m in layers.items()}
    for m in layers.values():
        m.bias = nn.Parameter(torch.arange(m.weight.shape[0], dtype=m.weight.dtype,
                                           device=m.weight.device), requires_grad=False)
    try:
        apply_plan(model, plan, example)
    finally:
        kept = {n: m.bias.detach().round().long() for n, m in layers.items()}
        for n, m in layers.items():
            old = saved[n]
            if old is None:
                m.bias = None
            else:
                m.bias = nn.Parameter(old.detach()[kept[n]].clone(),
                                      requires_grad=old.requires_grad)
    return kept


def _cut(model: nn.Module, plan: dict[str, list[int]], example: Tensor,
         calibration: Dataset | None, seed: int) -> None:
    """Apply the plan; with calibration data, then refit the layers that lost inputs."""
    if calibration is None:
        apply_plan(model, plan, example)
        return
    before = copy.deepcopy(model)
    kept = apply_plan_tracked(model, plan, example)
    reconstruct_layers(model, before, calibration, kept, seed=seed)


def _channels(model: nn.Module, example: Tensor, ignored: list[nn.Module]) -> dict[str, int]:
    return {root: len(g[0].idxs)
            for root, g in PruningGraph.build(model, example).groups(ignored)}


def _support(model: nn.Module, example: Tensor, ignored: list[nn.Module]
             ) -> tuple[dict[str, int], dict[str, str]]:
    """Channels of every prunable group, and what `prune.support` excluded (and why);
    refuses a model with nothing to prune."""
    graph = PruningGraph.build(model, example)
    original = {root: len(g[0].idxs) for root, g in graph.groups(ignored)}
    notes = {**graph.skipped, **graph.excluded}
    if not original:
        name, why = next(iter(notes.items()), ("model", "no Conv2d or Linear layer"))
        raise XaiCompressError(f"structured pruning: no channels of the model can be "
                               f"removed (module {name or type(model).__name__!r}: {why})")
    return original, notes


def _importance(criterion: Criterion | tp.importance.Importance, model: nn.Module,
                data: Any, samples: int, seed: int) -> tp.importance.Importance:
    if isinstance(criterion, Criterion):
        # a DatasetBundle also hands its normalisation to criteria (DeepLIFT's black image);
        # a group is scored from its layers' output units: per-weight scores are not needed
        rel = compute_relevance(model, criterion, data, samples=samples, seed=seed,
                                need=UNITS)
        return RelevanceImportance.from_relevance(model, rel)
    if needs_gradients(criterion):
        accumulate_gradients(model, gradient_batches(_as_train_set(data), samples, seed))
    return criterion


TP_IMPORTANCES = {
    "tp:magnitude": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "tp:taylor": lambda: tp.importance.GroupTaylorImportance(),
}


def resolve_criterion(criterion: CriterionLike) -> Criterion | tp.importance.Importance:
    """A criterion spec string (including Torch-Pruning's own group importances
    "tp:magnitude" and "tp:taylor"), a `Criterion`, or a Torch-Pruning importance."""
    if isinstance(criterion, str):
        if criterion.strip() in TP_IMPORTANCES:
            return TP_IMPORTANCES[criterion.strip()]()
        return get_criterion(criterion)
    if isinstance(criterion, (Criterion, tp.importance.Importance)):
        return criterion
    raise XaiCompressError(f"criterion {criterion!r}: expected a criterion name, a Criterion "
                           "or a torch_pruning Importance")


def criterion_name(criterion: Criterion | tp.importance.Importance) -> str:
    if isinstance(criterion, Criterion):
        return repr(criterion)
    return f"tp.{type(criterion).__name__}"


def _fraction_for_macs(model: nn.Module, scores: dict[str, Tensor], original: dict[str, int],
                       target_macs: float, lo: float, hi: float, scope: str, min_channels: int,
                       norm: str, max_layer_ratio: float | None,
                       input_shape: tuple[int, int, int], example: Tensor) -> float:
    """Smallest cumulative channel fraction in [lo, hi] whose pruned copy has MACs <= target
    (bisection; MACs fall monotonically with the fraction)."""
    def macs_at(f: float) -> int:
        trial = copy.deepcopy(model)
        apply_plan(trial, plan_removal(scores, original, f, scope, min_channels, norm,
                                       layer_cap(f, max_layer_ratio)), example)
        return count_macs(trial, input_shape)

    if macs_at(lo) <= target_macs:
        return lo
    for _ in range(14):
        mid = (lo + hi) / 2
        if macs_at(mid) <= target_macs:
            hi = mid
        else:
            lo = mid
    return hi


def _check_structured_options(ckpt: Checkpoint, ratio: float, scope: str, steps: int,
                              finetune_epochs: float, finetune_lr: float | None, samples: int,
                              macs_ratio: float | None, min_channels: int, norm: str,
                              max_layer_ratio: float | None) -> None:
    if norm not in NORMS:
        raise XaiCompressError(f"--norm {norm!r}: expected one of {', '.join(NORMS)}")
    check_layer_cap(max_layer_ratio)
    check_options(steps=steps, finetune_epochs=finetune_epochs, samples=samples,
                  finetune_lr=finetune_lr)
    check_scope(scope)
    if macs_ratio is None:
        check_ratio(ratio, "--ratio")
    else:
        check_ratio(macs_ratio, "--macs-ratio")
    if int(min_channels) != min_channels or min_channels < 1:
        raise XaiCompressError(f"--min-channels {min_channels}: expected a positive integer")
    busy = [n for n in ckpt.state.layers if n in ckpt.state]
    if busy:
        raise XaiCompressError(f"checkpoint: layers {busy[:3]} already carry masks/codebooks/"
                               "bits; structured pruning must come before unstructured pruning "
                               "and quantization")


def _check_reachable(model: nn.Module, original: dict[str, int], macs_ratio: float, scope: str,
                     min_channels: int, norm: str, shape: tuple[int, ...], example: Tensor,
                     macs0: int) -> None:
    """Refuse a MACs target that pruning every group to `min_channels` cannot reach."""
    smallest = copy.deepcopy(model)
    floor_scores = {n: torch.ones(c) for n, c in original.items()}
    apply_plan(smallest, plan_removal(floor_scores, original, 1.0, scope, min_channels, norm),
               example)  # cap 1.0: the floor of what any cap allows
    reachable = 1 - count_macs(smallest, shape) / macs0
    if reachable < macs_ratio:
        raise XaiCompressError(f"--macs-ratio {macs_ratio}: unreachable, pruning every layer "
                               f"to --min-channels {min_channels} cuts MACs by only "
                               f"{reachable:.3f}")


def prune_structured(
    ckpt: Checkpoint,
    criterion: CriterionLike,
    bundle: Any,
    *,
    ratio: float = 0.5,
    scope: str = "global",
    steps: int = 1,
    finetune_epochs: float = 0,
    finetune_lr: float | None = None,
    samples: int = 512,
    macs_ratio: float | None = None,
    min_channels: int = 1,
    norm: str = "l1",
    max_layer_ratio: float | None = None,
    bn_recalibration: bool = True,
    reconstruct: bool | None = None,
    distill: float = 0.0,
    seed: int = 0,
) -> Checkpoint:
    """Remove `ratio` of the channels (filters / neurons) of `ckpt`, or enough to cut MACs by
    `macs_ratio`, ranked by `criterion`, in `steps` steps with `finetune_epochs` epochs of
    fine-tuning after each (Adam, `finetune_lr`, default `PRUNE_FINETUNE_LR` 2e-3).
    Returns a new Checkpoint (the input is untouched) whose model is
    physically smaller; inputs stay (N, C, H, W), outputs (N, num_classes).

    bundle: a `DatasetBundle` (its train split is used) or a training `Dataset`; relevance
    uses `samples` seeded-random items of it. Global scope: `norm` ("l1", "mean", "max")
    makes scores comparable across groups and `max_layer_ratio` caps the fraction of any
    group's original channels removed (None: halfway between the step's target and 1, see
    `layer_cap`; 1.0: no cap); see `plan_removal`. bn_recalibration: after every cut,
    re-estimate the BatchNorm statistics on calibration samples of the training data
    (`calibration.reestimate_batchnorm`), before any fine-tuning. reconstruct: before that,
    refit every layer that lost input channels by least squares so that it reproduces the
    uncut layer's outputs on calibration samples (`calibration.reconstruct_layers`); None
    (default): when the stage does not fine-tune (`finetune_epochs` 0: one-shot, where it
    kept 698 of 720 post-training grid cells at or above the plain cut's validation
    accuracy, resnet20 at 0.5: 46% -> 96%; docs/design.md).
    distill: weight of distillation from the input model in the fine-tuning loss
    (`xaicompress.distill`; 0 = off).
    """
    crit = resolve_criterion(criterion)
    _check_structured_options(ckpt, ratio, scope, steps, finetune_epochs, finetune_lr, samples,
                              macs_ratio, min_channels, norm, max_layer_ratio)
    check_distill(distill)
    if reconstruct is None:
        reconstruct = finetune_epochs == 0
    lr = finetune_lr or PRUNE_FINETUNE_LR
    train_set = _as_train_set(bundle)
    out = ckpt.copy()
    out.model.eval()
    shape = tuple(ckpt.spec.input_shape)
    example = torch.zeros(1, *shape, device=model_device(out.model))
    # the classifier's outputs (and anything else reaching the output) are never pruned
    # (prune/support.py); naming it also keeps its group out of the importance pass
    ignored = [m for m in out.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
               and _outputs(m) == ckpt.spec.num_classes][-1:]
    original, excluded = _support(out.model, example, ignored)
    macs0 = count_macs(out.model, shape)
    targets = cumulative_targets(macs_ratio if macs_ratio is not None else ratio, steps)
    names = {id(m): n for n, m in out.model.named_modules()}
    ignored_names = [names[id(m)] for m in ignored]
    if macs_ratio is not None:
        _check_reachable(out.model, original, macs_ratio, scope, min_channels, norm, shape,
                         example, macs0)
    fraction = 0.0
    step_log = []
    for k in track(range(steps), "prune (structured)", steps):
        model = out.model
        ignored = [dict(model.named_modules())[n] for n in ignored_names]
        imp = _importance(crit, model, bundle, samples, seed + k)
        scores = group_scores(model, imp, example, ignored)
        if needs_gradients(crit):
            model.zero_grad(set_to_none=True)
        if macs_ratio is not None:
            fraction = _fraction_for_macs(model, scores, original, macs0 * (1 - targets[k]),
                                          fraction, 1.0, scope, min_channels, norm,
                                          max_layer_ratio, shape, example)
        else:
            fraction = targets[k]
        _cut(model, plan_removal(scores, original, fraction, scope, min_channels, norm,
                                 layer_cap(fraction, max_layer_ratio)), example,
             train_set if reconstruct else None, seed + k)
        bn = (reestimate_batchnorm(model, train_set, seed=seed + k)
              if bn_recalibration and train_set is not None else 0)
        step_log.append({"fraction": round(fraction, 6), "macs": count_macs(model, shape),
                         "bn_reestimated": bn})
        if finetune_epochs > 0:
            out = finetune_checkpoint(out, train_set, epochs=finetune_epochs, lr=lr,
                                      seed=seed + k, description=f"fine-tune step {k + 1}/{steps}",
                                      distill=distill, teacher=ckpt.model)
            out.history.pop()  # recorded once, below, as part of this step
    final = _channels(out.model, example, ignored)
    out.model.eval()
    out.history.append({
        "stage": "prune_structured", "criterion": criterion_name(crit), "ratio": ratio,
        "scope": scope, "steps": steps, "finetune_epochs": finetune_epochs,
        "finetune_lr": lr, "samples": samples, "macs_ratio": macs_ratio,
        "min_channels": min_channels, "norm": norm, "max_layer_ratio": max_layer_ratio,
        "bn_recalibration": bn_recalibration, "reconstruct": reconstruct, "seed": seed,
        "distill": distill,
        "channels": {n: [original[n], final.get(n, 0)] for n in original},
        "macs_before": macs0, "macs_after": count_macs(out.model, shape), "schedule": step_log,
        "excluded": excluded,
    })
    return out
