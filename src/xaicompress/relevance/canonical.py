"""Canonicalise a model for DeepLIFT: every nonlinearity is its own module, used once.

DeepLIFT replaces the gradient of each nonlinearity by a Rescale multiplier, which needs a
module to hook. A model is traced with torch.fx and rewritten on a deep copy:

- a module called more than once gets a private copy per call (`name`, `name__use2`, ...),
  so hooks see one input per module; Conv2d/Linear copies map back to the original name;
- functional nonlinearities (`torch.relu`, `F.relu`, `x.relu()`, `F.max_pool2d`,
  `torch.sigmoid`, ...) become modules;
- in-place activations become out-of-place (DeepLIFT needs both input and output);
- anything whose gradient is not a valid DeepLIFT multiplier (softmax, a product of two
  activations, exp, max, ...) is refused with an error that names the node, never
  attributed silently wrong.

Linear operations (additions, concatenation, reshapes, average pooling, BatchNorm in eval
mode, padding, interpolation, multiplication by a constant) need no rule: their gradient is
their multiplier.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from xaicompress.errors import XaiCompressError

#: elementwise nonlinearities handled by the Rescale rule
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
)
#: max pooling, handled by Captum's maxpool rule
MAXPOOL: tuple[type[nn.Module], ...] = (nn.MaxPool2d,)
#: modules whose gradient already is their DeepLIFT multiplier (linear / affine in eval mode)
LINEAR: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Unflatten, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.ZeroPad2d, nn.ConstantPad1d,
    nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.Upsample,
    nn.ConvTranspose2d, nn.PixelShuffle, nn.PixelUnshuffle,
)

_FUNCTIONAL_ACTS: dict[Any, Callable[..., nn.Module]] = {
    torch.relu: lambda *a, **k: nn.ReLU(),
    F.relu: lambda *a, **k: nn.ReLU(),
    torch.relu_: lambda *a, **k: nn.ReLU(),
    F.relu6: lambda *a, **k: nn.ReLU6(),
    F.leaky_relu: lambda negative_slope=0.01, inplace=False: nn.LeakyReLU(negative_slope),
    F.elu: lambda alpha=1.0, inplace=False: nn.ELU(alpha),
    F.gelu: lambda approximate="none": nn.GELU(approximate=approximate),
    F.silu: lambda inplace=False: nn.SiLU(),
    F.mish: lambda inplace=False: nn.Mish(),
    torch.sigmoid: lambda: nn.Sigmoid(),
    F.sigmoid: lambda: nn.Sigmoid(),
    torch.tanh: lambda: nn.Tanh(),
    F.tanh: lambda: nn.Tanh(),
    F.softplus: lambda beta=1.0, threshold=20.0: nn.Softplus(beta, threshold),
    F.hardtanh: lambda min_val=-1.0, max_val=1.0, inplace=False: nn.Hardtanh(min_val, max_val),
    F.hardswish: lambda inplace=False: nn.Hardswish(),
    F.hardsigmoid: lambda inplace=False: nn.Hardsigmoid(),
    F.max_pool2d: lambda *a, **k: nn.MaxPool2d(*a, **{x: v for x, v in k.items()
                                                      if x != "return_indices"}),
}
_METHOD_ACTS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "relu_": nn.ReLU, "sigmoid": nn.Sigmoid, "sigmoid_": nn.Sigmoid,
    "tanh": nn.Tanh, "tanh_": nn.Tanh,
}
#: functions that are linear in every tensor argument that depends on the input
_LINEAR_FUNCS: set[Any] = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.neg, operator.pos,
    operator.getitem, getattr, torch.add, torch.sub, torch.neg, torch.cat, torch.concat,
    torch.stack, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
    torch.transpose, torch.permute, torch.chunk, torch.split, torch.mean, torch.sum,
    torch.narrow, torch.roll, torch.flip, F.avg_pool1d, F.avg_pool2d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.pad, F.dropout, F.dropout2d,
    F.linear, F.conv1d, F.conv2d, F.batch_norm, F.interpolate, F.pixel_shuffle,
}
#: products / quotients: linear only when at most one factor depends on the input
_PRODUCT_FUNCS: set[Any] = {operator.mul, operator.imul, operator.truediv, operator.itruediv,
                            operator.matmul, torch.mul, torch.div, torch.matmul, torch.mm,
                            torch.bmm, torch.einsum}
_LINEAR_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "size", "dim", "permute",
    "transpose", "contiguous", "mean", "sum", "squeeze", "unsqueeze", "add", "add_", "sub",
    "sub_", "neg", "expand", "expand_as", "chunk", "split", "float", "to", "type_as", "clone",
    "narrow", "flip", "repeat", "unbind", "__getitem__", "t",
}
_PRODUCT_METHODS = {"mul", "mul_", "div", "div_", "matmul"}


@dataclass
class Canonical:
    """A rewritten copy of a model plus how its Conv2d/Linear names map back.

    module:   torch.fx GraphModule in eval mode, every nonlinearity a module used once.
    names:    canonical Conv2d/Linear module name -> the original model's module name
              (two entries point at one original name when the layer was called twice).
    """

    module: fx.GraphModule
    names: dict[str, str]


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*ELEMENTWISE, *MAXPOOL, *LINEAR)) or super().is_leaf_module(
            m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace `model` (a deep copy; the caller's model is untouched)."""
    root = copy.deepcopy(model).eval()
    try:
        graph = _Tracer().trace(root)
    except Exception as exc:  # fx raises many types; all mean "this forward is not traceable"
        raise XaiCompressError(
            f"model {type(model).__name__}: cannot be traced by torch.fx for attribution "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); write "
            "its forward without data-dependent Python control flow") from exc
    return fx.GraphModule(root, graph, class_name=type(model).__name__)


def canonicalise(model: nn.Module) -> Canonical:
    """Rewrite a copy of `model` so DeepLIFT hooks can attribute it exactly (see module doc).

    Raises XaiCompressError naming the first node that has no DeepLIFT rule.
    """
    gm = trace(model)
    modules = dict(gm.named_modules())
    names: dict[str, str] = {}
    uses: dict[str, int] = {}
    dependent: set[fx.Node] = set()
    counter = 0

    def depends(arg: Any) -> bool:
        found = False

        def visit(a: Any) -> Any:
            nonlocal found
            if isinstance(a, fx.Node) and a in dependent:
                found = True
            return a

        fx.node.map_aggregate(arg, visit)
        return found

    def as_module(node: fx.Node, new: nn.Module, label: str) -> None:
        nonlocal counter
        counter += 1
        target = f"_canon_{label}_{counter}"
        gm.add_submodule(target, new)
        tensor_args = [a for a in node.args if isinstance(a, fx.Node)]
        node.op, node.target = "call_module", target
        node.args, node.kwargs = (tensor_args[0],), {}

    for node in list(gm.graph.nodes):
        if node.op == "placeholder":
            dependent.add(node)
            continue
        if node.op in ("get_attr", "output"):
            continue
        if not depends((node.args, node.kwargs)):
            continue  # pure constant computation (shapes, parameters)
        dependent.add(node)
        where = f"node {node.name!r} ({_describe(node)})"
        if node.op == "call_module":
            m = modules[node.target]
            if not isinstance(m, (*ELEMENTWISE, *MAXPOOL, *LINEAR)):
                raise XaiCompressError(
                    f"module {node.target!r} ({type(m).__name__}): no DeepLIFT rule for this "
                    "layer type; supported nonlinearities are "
                    f"{', '.join(t.__name__ for t in (*ELEMENTWISE, *MAXPOOL))}")
            if isinstance(m, MAXPOOL) and m.return_indices:
                raise XaiCompressError(f"module {node.target!r}: MaxPool2d(return_indices=True)"
                                       " has no DeepLIFT rule")
            original = node.target
            n = uses.get(original, 0) + 1
            uses[original] = n
            if n > 1:  # a second call: give it a private copy so hooks see one input each
                node.target = f"{original}__use{n}"
                gm.add_submodule(node.target, copy.deepcopy(m))
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                names[node.target] = original
            sub = gm.get_submodule(node.target)
            if getattr(sub, "inplace", False):
                sub.inplace = False
        elif node.op == "call_function":
            fn = node.target
            if fn in _FUNCTIONAL_ACTS:
                if any(isinstance(a, fx.Node) for a in node.args[1:]) or any(
                        isinstance(v, fx.Node) for v in node.kwargs.values()):
                    raise XaiCompressError(f"{where}: arguments computed from the input are "
                                           "not supported")
                try:
                    new = _FUNCTIONAL_ACTS[fn](*node.args[1:], **_drop(node.kwargs, "input"))
                except TypeError as exc:
                    raise XaiCompressError(f"{where}: unexpected arguments ({exc})") from exc
                if isinstance(new, nn.MaxPool2d) and (node.kwargs.get("return_indices") or (
                        len(node.args) > 6 and node.args[6])):
                    raise XaiCompressError(f"{where}: max_pool2d(return_indices=True) has no "
                                           "DeepLIFT rule")
                as_module(node, new, type(new).__name__.lower())
            elif fn in _PRODUCT_FUNCS:
                if sum(depends(a) for a in (*node.args, *node.kwargs.values())) > 1:
                    raise XaiCompressError(
                        f"{where}: product of two activations has no DeepLIFT rule (gating "
                        "and attention are not supported)")
            elif fn not in _LINEAR_FUNCS:
                raise XaiCompressError(f"{where}: no DeepLIFT rule for this function; "
                                       "use a supported module (e.g. nn.ReLU) instead")
        elif node.op == "call_method":
            meth = node.target
            if meth in _METHOD_ACTS:
                as_module(node, _METHOD_ACTS[meth](), meth.rstrip("_"))
            elif meth in _PRODUCT_METHODS:
                if sum(depends(a) for a in (*node.args, *node.kwargs.values())) > 1:
                    raise XaiCompressError(f"{where}: product of two activations has no "
                                           "DeepLIFT rule")
            elif meth not in _LINEAR_METHODS:
                raise XaiCompressError(f"{where}: no DeepLIFT rule for tensor method "
                                       f".{meth}()")
    gm.graph.lint()
    gm.recompile()
    gm.eval()
    return Canonical(gm, names)


def _drop(kwargs: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k not in keys}


def _describe(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"method .{t}()"
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)
    mod = getattr(t, "__module__", None)
    return f"{mod}.{name}" if mod and mod not in ("_operator", "builtins") else name
