"""Which channels of a model structured pruning may remove, and the Torch-Pruning dependency
graphs that remove them.

Torch-Pruning's `DependencyGraph` couples channels into groups (a conv's filters, its
BatchNorm, the next layers' inputs, residual additions, squeeze-excitation products). Where
it cannot prune a structure safely, that structure is *excluded* (its channels stay) rather
than the whole model refused:

- **Outputs.** A group whose channels reach the model's output (the classifier's outputs,
  also a convolutional classifier such as SqueezeNet's) is never pruned: its dependencies
  include Torch-Pruning's output node.
- **Grouped convolutions** (1 < groups, not depthwise, e.g. RegNet's and ResNeXt's 3x3
  convs). Torch-Pruning removes a grouped conv's input channels by position without keeping
  the groups aligned (`ConvPruner.prune_in_channels` keeps the first len/groups indices), so
  any group that touches one is skipped. Depthwise convs (groups == in == out) are pruned
  together with their input channels.
- **Untraceable structures.** A model Torch-Pruning cannot trace as a whole (torchvision's
  ShuffleNetV2: its channel shuffle is view -> transpose -> view, on which Torch-Pruning's
  reshape mapping divides by zero) is pruned by parts: every submodule it can trace (there:
  each block's branches) gets its own graph, and the channels at a part's boundary stay
  (they are that part's outputs). The modules it could not trace are listed in `skipped`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import Tensor, nn

ROOT_TYPES = (nn.Conv2d, nn.Linear)


def _build_graph(module: nn.Module, example: Tensor) -> tp.DependencyGraph:
    # Tracing runs a forward pass: in train mode BatchNorm would update its running stats.
    was_training = module.training
    module.eval()
    try:
        return tp.DependencyGraph().build_dependency(module, example_inputs=example)
    finally:
        module.train(was_training)


def is_grouped_conv(m: nn.Module) -> bool:
    """A convolution with groups that is not depthwise (which Torch-Pruning cannot keep
    aligned when it removes input channels)."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and not (
        m.groups == m.in_channels == m.out_channels)


def _has_layers(m: nn.Module) -> bool:
    return any(isinstance(x, ROOT_TYPES) for x in m.modules())


@dataclass
class Part:
    """One traced graph: the module it covers and its name inside the model ("" = all)."""

    prefix: str
    module: nn.Module
    graph: tp.DependencyGraph

    def names(self) -> dict[nn.Module, str]:
        """Module -> its name in the whole model."""
        join = (lambda n: f"{self.prefix}.{n}" if n else self.prefix) if self.prefix else str
        return {m: join(n) for n, m in self.module.named_modules()}


@dataclass
class PruningGraph:
    """The dependency graphs covering a model (one, or one per traceable part) and what
    was excluded: `skipped` module -> reason (untraceable), `excluded` root layer ->
    reason (groups never pruned)."""

    parts: list[Part]
    skipped: dict[str, str] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, model: nn.Module, example: Tensor) -> PruningGraph:
        try:
            return cls([Part("", model, _build_graph(model, example))])
        except Exception as exc:  # Torch-Pruning fails in many ways on what it cannot trace
            whole = _reason(exc)
        inputs = _module_inputs(model, example)
        out = cls([])
        out._add_parts(model, "", inputs)
        if not out.parts:
            out.skipped[""] = whole
        return out

    def _add_parts(self, module: nn.Module, prefix: str, inputs: dict[str, Tensor]) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if not _has_layers(child):
                continue
            if full not in inputs:
                self.skipped[full] = "called more than once or with other than one tensor"
                continue
            try:
                self.parts.append(Part(full, child, _build_graph(child, inputs[full])))
            except Exception as exc:  # see build()
                if not any(_has_layers(c) for c in child.children()):
                    self.skipped[full] = _reason(exc)
                    continue
                before = len(self.skipped)
                self._add_parts(child, full, inputs)
                if len(self.skipped) == before:  # its children traced: name the module itself
                    self.skipped[full] = f"{type(child).__name__}: {_reason(exc)}"

    def groups(self, ignored: Sequence[nn.Module] = ()) -> Iterator[tuple[str, tp.Group]]:
        """(root layer name, group with every channel) of every group that may be pruned."""
        for part in self.parts:
            names = part.names()
            for group in part.graph.get_all_groups(ignored_layers=list(ignored),
                                                   root_module_types=ROOT_TYPES):
                root = names[group[0].dep.target.module]
                why = _unsafe(group)
                if why is None:
                    yield root, group  # type: ignore[misc]
                elif why != "output":
                    self.excluded[root] = why  # type: ignore[index]

    def group(self, name: str, idxs: list[int]) -> tp.Group:
        """The group removing output channels `idxs` of layer `name` (and what they couple)."""
        for part in self.parts:
            for m, n in part.names().items():
                if n == name:
                    graph = part.graph
                    return graph.get_pruning_group(
                        m, graph.get_pruner_of_module(m).prune_out_channels, idxs)
        raise KeyError(name)

    def check(self, group: tp.Group) -> bool:
        return any(p.graph.check_pruning_group(group) for p in self.parts
                   if group[0].dep.target.module in p.graph.module2node)


def _unsafe(group: tp.Group) -> str | None:
    """Why a group must not be pruned ("output" for the model's outputs), None if it may."""
    for item in group:
        m = item.dep.target.module
        if isinstance(m, tp.ops._OutputOp):
            return "output"
        if is_grouped_conv(m):
            return (f"coupled to grouped convolution (groups={m.groups}), which Torch-Pruning "
                    "cannot prune keeping its groups aligned")
    return None


def _reason(exc: Exception) -> str:
    text = str(exc).splitlines()[0][:120] if str(exc) else ""
    return f"Torch-Pruning cannot trace it ({type(exc).__name__}: {text})"


def _module_inputs(model: nn.Module, example: Tensor) -> dict[str, Tensor]:
    """Zero example inputs (batch 1) of every submodule called exactly once with one tensor,
    from one forward pass of `model`."""
    seen: dict[str, list[Tensor]] = {}
    hooks = []
    for name, m in model.named_modules():
        if not name:
            continue

        def pre(_m: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            ok = len(args) == 1 and not kwargs and isinstance(args[0], Tensor)
            seen.setdefault(name, []).append(args[0] if ok else None)  # type: ignore[arg-type]

        hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return {n: torch.zeros(1, *v[0].shape[1:], dtype=v[0].dtype)
            for n, v in seen.items() if len(v) == 1 and v[0] is not None}
