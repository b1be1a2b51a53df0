"""Canonicalise a model for DeepLIFT: every operation either has a rule or is linear.

The model is traced with torch.fx (in eval mode) into a GraphModule that *shares* the
model's modules and parameters (no copy: later weight updates are seen, and memory is not
doubled). Leaves of the trace are the modules that have a rule in the table
(`relevance/rules.py`), every Conv2d/Linear (also subclasses, so their contributions are
seen), and torch.nn modules without a rule (refused by name). Everything else is traced
into and its operations are rewritten:

- a rule-bearing module gets one private call site per call (a module called twice gets
  two, so each records its own reference); in-place activations become out-of-place;
- functional nonlinearities (`F.relu`, `torch.sigmoid`, `x.relu()`, `F.hardswish`,
  `torch.exp`, `x.clamp(0, 6)`, `F.max_pool2d`, `F.layer_norm`, ...) become modules;
- a product of two signals (squeeze-excitation `x * gate`, gating, `x / y`, `a @ b`) becomes
  a `Multiply` / `Bilinear` module with the exact product rule;
- linear operations pass through: additions, concatenation, reshapes, indexing, pooling
  averages, BatchNorm in eval mode, padding, interpolation, multiplication by a constant;
- arithmetic on sizes (`x.size(1) // groups` in a channel shuffle) is bookkeeping, not a
  signal, and passes through too;
- anything else is refused with the module path the user wrote and what to do about it.
"""

from __future__ import annotations

import copy
import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from xaicompress.errors import XaiCompressError
from xaicompress.relevance.rules import (
    Bilinear,
    Elementwise,
    FunctionalGroupNorm,
    FunctionalLayerNorm,
    MaxPool,
    Multiply,
    PassThrough,
    Rescale,
    RevealCancelHead,
    Rule,
    rule_for,
)

PRUNABLE = (nn.Conv2d, nn.Linear)
GRADIENT_HINT = "or use a gradient criterion (taylor, gradxact, activation)"


def _hint(stack: Any) -> str:
    """What to do: register a rule for the innermost module (treated as one unit then)."""
    if stack:
        typ = list(stack.values())[-1][1]
        return (f"register a rule for {getattr(typ, '__name__', typ)} "
                f"(xaicompress.relevance.register_rule) {GRADIENT_HINT}")
    return ("wrap it in a module and register a rule for that "
            f"(xaicompress.relevance.register_rule) {GRADIENT_HINT}")
CONST, SHAPE, SIGNAL = 0, 1, 2


def _elementwise(fn: Callable[..., Any], *names: str) -> Callable[..., nn.Module]:
    """Factory for `fn(x, *args)`: keeps the named parameters, drops `inplace`."""
    def make(*args: Any, **kwargs: Any) -> nn.Module:
        kwargs.pop("inplace", None)
        if len(args) > len(names):
            args = args[:len(names)]  # a trailing positional `inplace`
        return Elementwise(fn, (), {**dict(zip(names, args, strict=False)), **kwargs})

    return make


def _max_pool(kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
              ceil_mode: bool = False, return_indices: bool = False) -> nn.Module:
    if return_indices:
        raise ValueError("max_pool2d(return_indices=True) has no DeepLIFT rule")
    return nn.MaxPool2d(kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)


def _adaptive_max_pool(output_size: Any, return_indices: bool = False) -> nn.Module:
    if return_indices:
        raise ValueError("adaptive_max_pool2d(return_indices=True) has no DeepLIFT rule")
    return nn.AdaptiveMaxPool2d(output_size)


_PLAIN = [torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, torch.exp, torch.log, torch.sqrt,
          torch.rsqrt, torch.reciprocal, torch.abs, torch.square, torch.erf, F.logsigmoid,
          F.softsign, F.tanhshrink, torch.nn.functional.silu, F.mish, F.hardswish,
          F.hardsigmoid, F.selu, torch.relu]
#: function -> factory(constant args...) of the module that replaces the call
FUNCTION_MODULES: dict[Any, Callable[..., nn.Module]] = {
    **{fn: _elementwise(fn) for fn in _PLAIN},
    torch.relu_: _elementwise(torch.relu), F.relu: _elementwise(torch.relu),
    F.relu_: _elementwise(torch.relu), F.relu6: lambda inplace=False: Elementwise(
        F.hardtanh, (0.0, 6.0)),
    F.leaky_relu: _elementwise(F.leaky_relu, "negative_slope"),
    F.elu: _elementwise(F.elu, "alpha"), F.celu: _elementwise(F.celu, "alpha"),
    F.gelu: _elementwise(F.gelu), F.softplus: _elementwise(F.softplus, "beta", "threshold"),
    F.hardtanh: _elementwise(F.hardtanh, "min_val", "max_val"),
    torch.clamp: _elementwise(torch.clamp, "min", "max"),
    torch.clip: _elementwise(torch.clamp, "min", "max"),
    torch.clamp_min: _elementwise(torch.clamp_min, "min"),
    torch.pow: _elementwise(torch.pow, "exponent"),
    operator.pow: _elementwise(torch.pow, "exponent"),
    F.max_pool2d: _max_pool, F.adaptive_max_pool2d: _adaptive_max_pool,
    F.layer_norm: lambda normalized_shape, weight=None, bias=None, eps=1e-5:
        FunctionalLayerNorm(normalized_shape, weight, bias, eps),
    F.group_norm: lambda num_groups, weight=None, bias=None, eps=1e-5:
        FunctionalGroupNorm(num_groups, weight, bias, eps),
}
#: tensor method -> the function whose factory rewrites it
METHOD_FUNCTIONS: dict[str, Any] = {
    "relu": torch.relu, "relu_": torch.relu, "sigmoid": torch.sigmoid,
    "sigmoid_": torch.sigmoid, "tanh": torch.tanh, "tanh_": torch.tanh, "exp": torch.exp,
    "exp_": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt,
    "reciprocal": torch.reciprocal, "abs": torch.abs, "square": torch.square,
    "erf": torch.erf, "clamp": torch.clamp, "clamp_": torch.clamp, "clip": torch.clamp,
    "clamp_min": torch.clamp_min, "clamp_min_": torch.clamp_min, "pow": torch.pow,
    "pow_": torch.pow,
}
#: linear in every signal argument (the gradient is the multiplier)
LINEAR_FUNCTIONS: set[Any] = {
    operator.add, operator.sub, operator.neg, operator.pos, operator.getitem, torch.add,
    torch.sub, torch.subtract, torch.neg, torch.cat, torch.concat, torch.concatenate,
    torch.stack, torch.hstack, torch.vstack, torch.flatten, torch.reshape, torch.squeeze,
    torch.unsqueeze, torch.transpose, torch.swapaxes, torch.permute, torch.movedim,
    torch.chunk, torch.split, torch.tensor_split, torch.unbind, torch.mean, torch.sum,
    torch.narrow, torch.roll, torch.flip, torch.select, torch.index_select,
    torch.channel_shuffle, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.pad, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d,
    F.batch_norm, F.interpolate, F.upsample, F.pixel_shuffle, F.pixel_unshuffle,
    F.channel_shuffle,
}
LINEAR_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute",
    "transpose", "swapaxes", "movedim", "contiguous", "mean", "sum", "squeeze", "unsqueeze",
    "add", "sub", "neg", "expand", "expand_as", "chunk", "split", "tensor_split", "unbind",
    "float", "double", "to", "type_as", "clone", "narrow", "flip", "roll", "repeat",
    "repeat_interleave", "__getitem__", "t", "select", "index_select", "masked_fill",
}
SHAPE_METHODS = {"size", "dim", "numel", "nelement", "get_device", "is_contiguous"}
SHAPE_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}
#: in-place forms rewritten out of place (saved reference activations must not change)
INPLACE = {operator.iadd: operator.add, operator.isub: operator.sub,
           operator.imul: operator.mul, operator.itruediv: operator.truediv}
INPLACE_METHODS = {"add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div",
                   "masked_fill_": "masked_fill"}
#: library functions that are the identity in eval mode: qualified name -> position of their
#: `training` argument (torchvision wraps stochastic_depth as an fx leaf function)
EVAL_IDENTITY = {"torchvision.ops.stochastic_depth.stochastic_depth": 3}
MULTIPLY = {operator.mul, torch.mul, torch.multiply}
DIVIDE = {operator.truediv, torch.div, torch.divide, torch.true_divide}
BILINEAR = {operator.matmul, torch.matmul, torch.mm, torch.bmm}


@dataclass
class Canonical:
    """A rewritten, parameter-sharing trace of a model.

    module:  torch.fx GraphModule; its leaves are the model's own modules.
    layers:  call target -> the model's Conv2d/Linear module name (two targets point at
             one name when the layer is called twice; their contributions add up).
    rules:   call target -> Rule, one target per call of a rule-bearing module.
    origin:  call target -> "path (Type)" of the module the user wrote, for messages.
    heads:   nonlinearity target -> (layer target, eval BatchNorm targets between): a
             Conv2d/Linear feeding it straight, for RevealCancel.
    after_activation: max-pool targets fed straight by an elementwise nonlinearity
             (maxpool=captum leaves those unwrapped, reproducing Captum's hook order).
    shape:   None, or the input shape (C, H, W) the trace is specialised to (the model
             branches on sizes; traced on an example of that shape).
    input_cut: the Conv2d/Linear calls every path from the input crosses first (a clean
             cut: nothing else reads what lies before them), e.g. {"conv1"}; empty when
             there is none. Their contributions add up to the input's, so the backward
             pass can stop there when input-space maps are not wanted.
    """

    module: fx.GraphModule
    layers: dict[str, str]
    rules: dict[str, Rule] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    heads: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    after_activation: set[str] = field(default_factory=set)
    input_cut: set[str] = field(default_factory=set)
    shape: tuple[int, ...] | None = None  # the input shape a size-specialised trace fits

    @property
    def names(self) -> dict[str, str]:
        return self.layers


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (rule_for(m) is not None or isinstance(m, PRUNABLE)
                or super().is_leaf_module(m, qualname))


def _innermost(stack: Any, model: nn.Module) -> str:
    """'path (Type)' of the innermost module in an fx module stack (or the model)."""
    if stack:
        path, typ = list(stack.values())[-1]
        name = getattr(typ, "__name__", str(typ))
        return f"{path} ({name})" if path else f"{type(model).__name__}.forward"
    return f"{type(model).__name__}.forward"


class _ShapeTracer(_Tracer):
    """A tracer that also runs the model on an example input, so Python control flow on
    *sizes* (`if x.shape[-1] < 7:` in timm's ConvMlp) takes the example's branch. Control
    flow on values stays an error. The graph is specialised to the example's shape."""

    def __init__(self, example: torch.Tensor) -> None:
        super().__init__()
        self.example = example
        self.values: dict[fx.Node, Any] = {}
        self.sizes: set[fx.Node] = set()  # nodes computed from sizes only
        self.eager = False  # computing an example value: no proxies for attributes

    def _value(self, a: Any) -> Any:
        return self.values[a.node] if isinstance(a, fx.Proxy) else a

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, *rest: Any,
                     **kw: Any) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **kw)
        node = proxy.node
        a = fx.node.map_aggregate(args, self._value)
        k = fx.node.map_aggregate(kwargs, self._value)
        proxies = _proxies((args, kwargs))
        self.eager = True
        try:
            self.values[node] = self._run(kind, target, a, k)
        finally:
            self.eager = False
        if (kind == "call_method" and target in SHAPE_METHODS) or (
                kind == "call_function" and target is getattr and args[1] in SHAPE_ATTRIBUTES) \
                or (proxies and all(p.node in self.sizes for p in proxies)):
            self.sizes.add(node)
        return proxy

    def _run(self, kind: str, target: Any, a: Any, k: Any) -> Any:
        """The example value of one node (module attributes read as themselves)."""
        with torch.no_grad():
            if kind == "placeholder":
                value = self.example if not self.values else (a[0] if a else None)
            elif kind == "get_attr":
                value = functools.reduce(getattr, target.split("."), self.root)
            elif kind == "call_module":
                value = self.root.get_submodule(target).forward(*a, **k)
            elif kind == "call_method":
                value = getattr(a[0], target)(*a[1:], **k)
            else:
                value = target(*a, **k)
        return value

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        return attr_val if self.eager else super().getattr(attr, attr_val,
                                                           parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if not _proxies((args, kwargs)):  # computing an example value: run it eagerly
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def to_bool(self, obj: fx.Proxy) -> bool:
        if obj.node in self.sizes:
            return bool(self.values[obj.node])
        return super().to_bool(obj)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapeProxy(node, self)

    def iter(self, obj: fx.Proxy) -> Any:
        value = self.values.get(obj.node)
        if isinstance(value, (tuple, list, torch.Size)):
            return iter([obj[i] for i in range(len(value))])
        return super().iter(obj)


class _ShapeProxy(fx.Proxy):
    """A proxy whose device and dtype are the example's (`torch.autocast(x.device.type)`)."""

    def __getattr__(self, k: str) -> Any:
        if k in ("device", "dtype", "is_cuda"):
            value = getattr(self.tracer, "values", {}).get(self.node)
            if isinstance(value, torch.Tensor):
                return getattr(value, k)
        return super().__getattr__(k)


def _proxies(tree: Any) -> list[fx.Proxy]:
    found: list[fx.Proxy] = []

    def visit(a: Any) -> Any:
        if isinstance(a, fx.Proxy):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                visit(b)
        elif isinstance(a, dict):
            for b in a.values():
                visit(b)
        return a

    visit(tree)
    return found


def trace(model: nn.Module, example: torch.Tensor | None = None
          ) -> tuple[fx.GraphModule, tuple[int, ...] | None]:
    """Trace `model` in eval mode; the GraphModule shares its modules and parameters.

    When symbolic tracing fails and an `example` input (1, C, H, W) is given, the model is
    traced again running on it (`_ShapeTracer`): control flow on sizes then follows the
    example. Returns (GraphModule, the input shape (C, H, W) it is specialised to or None).
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    tracer: _Tracer = _Tracer()
    shape = None
    try:
        try:
            graph = tracer.trace(model)
        except Exception:  # fx raises many types; all mean "this forward is not traceable"
            if example is None:
                raise
            tracer = _ShapeTracer(example.detach())
            graph = tracer.trace(model)
            shape = tuple(example.shape[1:])
    except Exception as exc:
        where = _innermost(tracer.module_stack, model)
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise XaiCompressError(
            f"model {type(model).__name__}: {where} cannot be traced by torch.fx for "
            f"attribution ({type(exc).__name__}: {first}); {_hint(tracer.module_stack)}"
        ) from exc
    finally:
        for m, f in flags:
            m.training = f
    return fx.GraphModule(model, graph, class_name=type(model).__name__), shape


class _Rewriter:
    """One pass over the traced graph: classify every node, rewrite or refuse it."""

    def __init__(self, gm: fx.GraphModule, model: nn.Module) -> None:
        self.gm, self.model = gm, model
        self.kind: dict[fx.Node, int] = {}
        self.canon = Canonical(gm, {})
        self.calls: dict[str, int] = {}
        self.counter = 0

    # ---------------------------------------------------------------- helpers
    def kind_of(self, arg: Any) -> int:
        found = CONST

        def visit(a: Any) -> Any:
            nonlocal found
            if isinstance(a, fx.Node):
                found = max(found, self.kind.get(a, CONST))
            return a

        fx.node.map_aggregate(arg, visit)
        return found

    def signals(self, node: fx.Node) -> list[Any]:
        return [a for a in (*node.args, *node.kwargs.values()) if self.kind_of(a) == SIGNAL]

    def where(self, node: fx.Node) -> str:
        return _innermost(node.meta.get("nn_module_stack"), self.model)

    def refuse(self, node: fx.Node, what: str) -> XaiCompressError:
        return XaiCompressError(f"model {type(self.model).__name__}: {self.where(node)}: "
                                f"{what} has no DeepLIFT rule; "
                                f"{_hint(node.meta.get('nn_module_stack'))}")

    def fresh(self, label: str) -> str:
        self.counter += 1
        return f"_xc_{label}_{self.counter}"

    def add_rule_call(self, node: fx.Node, module: nn.Module, args: tuple, label: str,
                      origin: str) -> None:
        """Turn `node` into a call of `module` (with its rule) on `args`."""
        rule = rule_for(module)
        if rule is None:  # a factory built a module the table does not know: a bug
            raise RuntimeError(f"no rule for canonical module {type(module).__name__}")
        target = self.fresh(label)
        self.gm.add_submodule(target, module)
        node.op, node.target, node.args, node.kwargs = "call_module", target, args, {}
        if not isinstance(rule, PassThrough):
            self.canon.rules[target] = rule
            self.canon.origin[target] = origin

    def constant(self, node: fx.Node, arg: Any) -> Any:
        """A constant argument's value: literals as is, parameters/buffers by get_attr."""
        if isinstance(arg, fx.Node):
            if arg.op == "get_attr":
                return functools.reduce(getattr, arg.target.split("."), self.gm)
            raise self.refuse(node, f"{_describe(node)} with an argument computed in "
                                    "forward")
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.constant(node, a) for a in arg)
        return arg

    # ---------------------------------------------------------------- dispatch
    def run(self) -> Canonical:
        first = True
        for node in list(self.gm.graph.nodes):
            if node.op == "placeholder":
                self.kind[node] = SIGNAL if first else CONST
                first = False
            elif node.op in ("get_attr", "output"):
                self.kind[node] = CONST
            else:
                self.kind[node] = self.visit(node)
        _find_heads(self.canon)
        self.canon.input_cut = self.input_cut()
        self.gm.graph.lint()
        self.gm.recompile()
        return self.canon

    def input_cut(self) -> set[str]:
        """Layer calls that separate the input from everything else (see Canonical)."""
        pure: set[fx.Node] = set()
        frontier: set[str] = set()
        for node in self.gm.graph.nodes:
            if self.kind.get(node) != SIGNAL:
                continue
            sources = [a for a in node.all_input_nodes if self.kind.get(a) == SIGNAL]
            if node.op == "placeholder" or (node.target not in self.canon.layers and sources
                                            and all(a in pure for a in sources)):
                pure.add(node)
            elif node.op == "call_module" and node.target in self.canon.layers and all(
                    a in pure for a in sources):
                frontier.add(node.target)
            elif any(a in pure for a in sources):
                return set()  # something else reads the input side: no clean cut
        outputs = [n for n in self.gm.graph.nodes if n.op == "output"]
        if not frontier or any(a in pure for n in outputs for a in n.all_input_nodes):
            return set()
        return frontier

    def visit(self, node: fx.Node) -> int:
        k = self.kind_of((node.args, node.kwargs))
        if k != SIGNAL:
            return k  # constants, and arithmetic on sizes (shape bookkeeping)
        if node.op == "call_module":
            self.module_call(node)
            return SIGNAL
        if node.op == "call_method":
            return self.method_call(node)
        return self.function_call(node, node.target)

    def module_call(self, node: fx.Node) -> None:
        m = self.gm.get_submodule(node.target)
        path = node.target
        n = self.calls.get(path, 0) + 1
        self.calls[path] = n
        if isinstance(m, PRUNABLE):
            if n > 1:  # one call site per call; contributions map back to one name
                node.target = f"{path}__use{n}"
                self.gm.add_submodule(node.target, m)
            self.canon.layers[node.target] = path
            self.canon.origin[node.target] = f"{path} ({type(m).__name__})"
            return
        rule = rule_for(m)
        if rule is None:
            raise self.refuse(node, f"module type {type(m).__name__}")
        if getattr(m, "return_indices", False):
            raise self.refuse(node, f"{type(m).__name__}(return_indices=True)")
        if isinstance(rule, PassThrough):
            return
        if getattr(m, "inplace", False):  # a private out-of-place copy; the user's is kept
            m = _private_copy(m)
            m.inplace = False
        self.add_rule_call(node, m, node.args, type(m).__name__.lower(),
                           f"{path} ({type(m).__name__})")

    def function_call(self, node: fx.Node, fn: Any) -> int:
        if fn in INPLACE:
            fn = node.target = INPLACE[fn]
        if fn in FUNCTION_MODULES:
            self.functional_module(node, fn)
        elif fn in MULTIPLY or fn in BILINEAR or fn is torch.einsum:
            self.product(node, fn)
        elif fn in DIVIDE:
            self.division(node, fn)
        elif fn is getattr:
            return SHAPE if node.args[1] in SHAPE_ATTRIBUTES else self.linear_attr(node)
        elif fn in LINEAR_FUNCTIONS:
            self.check_linear(node, fn)
        elif _qualname(fn) in EVAL_IDENTITY:
            self.check_eval_identity(node, EVAL_IDENTITY[_qualname(fn)])
        else:
            raise self.refuse(node, _describe(node))
        return SIGNAL

    def method_call(self, node: fx.Node) -> int:
        name = node.target
        if name in SHAPE_METHODS:
            return SHAPE
        if name in INPLACE_METHODS:
            name = node.target = INPLACE_METHODS[name]
        if name in METHOD_FUNCTIONS:
            self.functional_module(node, METHOD_FUNCTIONS[name])
        elif name in ("mul", "matmul"):
            self.product(node, torch.mul if name == "mul" else torch.matmul)
        elif name == "div":
            self.division(node, torch.div)
        elif name not in LINEAR_METHODS:
            raise self.refuse(node, f"tensor method .{name}()")
        return SIGNAL

    # ---------------------------------------------------------------- rewrites
    def functional_module(self, node: fx.Node, fn: Any) -> None:
        x, *rest = node.args
        if self.kind_of(x) != SIGNAL or any(self.kind_of(a) == SIGNAL for a in
                                            (*rest, *node.kwargs.values())):
            raise self.refuse(node, f"{_describe(node)} with a signal in a constant argument")
        args = [self.constant(node, a) for a in rest]
        kwargs = {k: self.constant(node, v) for k, v in node.kwargs.items()
                  if k not in ("input", "inplace")}
        try:
            module = FUNCTION_MODULES[fn](*args, **kwargs)
        except (TypeError, ValueError) as exc:
            raise self.refuse(node, f"{_describe(node)} ({exc})") from exc
        self.add_rule_call(node, module, (x,), type(module).__name__.lower(),
                           f"{self.where(node)}: {_describe(node)}")

    def product(self, node: fx.Node, fn: Any) -> None:
        sig = self.signals(node)
        if len(sig) <= 1:
            return  # a signal times a constant: linear
        if node.kwargs or len(node.args) != (3 if fn is torch.einsum else 2):
            raise self.refuse(node, f"{_describe(node)} of more than two signals")
        if fn is torch.einsum:
            module: nn.Module = Bilinear(functools.partial(torch.einsum, node.args[0]))
            args = tuple(node.args[1:])
        else:
            module = Multiply() if fn in MULTIPLY else Bilinear(fn)
            args = tuple(node.args)
        self.add_rule_call(node, module, args, "product",
                           f"{self.where(node)}: {_describe(node)}")

    def division(self, node: fx.Node, fn: Any) -> None:
        if node.kwargs.get("rounding_mode") is not None:
            raise self.refuse(node, f"{_describe(node)} with rounding_mode")
        a, b = node.args[:2]
        if self.kind_of(b) != SIGNAL:
            node.target = operator.truediv  # a signal divided by a constant: linear
            return
        # a / b = a * (1 / b): Rescale on the reciprocal, then the product rule
        with self.gm.graph.inserting_before(node):
            recip = self.gm.graph.call_function(torch.reciprocal, (b,))
        recip.meta = dict(node.meta)
        self.kind[recip] = SIGNAL
        self.functional_module(recip, torch.reciprocal)
        node.op, node.target, node.args, node.kwargs = "call_function", operator.mul, (a,
                                                                                      recip), {}
        self.product(node, operator.mul)

    def linear_attr(self, node: fx.Node) -> int:
        if node.args[1] in ("T", "mT", "real"):
            return SIGNAL
        raise self.refuse(node, f"attribute .{node.args[1]}")

    def check_eval_identity(self, node: fx.Node, position: int) -> None:
        training = node.kwargs.get("training", node.args[position] if len(node.args) >
                                   position else False)
        if training is not False:
            raise self.refuse(node, f"{_describe(node)} in training mode")

    def check_linear(self, node: fx.Node, fn: Any) -> None:
        """Linear functions whose flags could make them nonlinear in training mode."""
        if fn is F.batch_norm and (node.kwargs.get("training") or (
                len(node.args) > 5 and node.args[5] is True)):
            raise self.refuse(node, "batch_norm in training mode")
        if fn is operator.getitem and any(self.kind_of(a) == SIGNAL for a in node.args[1:]):
            raise self.refuse(node, "indexing with a computed index")


def _private_copy(m: nn.Module) -> nn.Module:
    """A shallow copy (parameters shared) with hook tables of its own, so hooks put on the
    copy (or the original) do not fire for both."""
    new = copy.copy(m)
    for key, value in list(vars(new).items()):
        if "hooks" in key and isinstance(value, dict):
            vars(new)[key] = type(value)()
    return new


def _qualname(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}"


def _find_heads(canon: Canonical) -> None:
    """Record RevealCancel heads and max-pools fed straight by a nonlinearity."""
    gm = canon.module

    def module(target: str) -> nn.Module | None:
        try:
            return gm.get_submodule(target)
        except AttributeError:
            return None

    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in canon.rules:
            continue
        rule = canon.rules[node.target]
        src = node.args[0] if node.args else None
        if isinstance(rule, MaxPool) and isinstance(src, fx.Node) and len(src.users) == 1 \
                and isinstance(canon.rules.get(src.target), Rescale):
            canon.after_activation.add(node.target)
        if not isinstance(rule, Rescale):
            continue
        norms: list[str] = []
        while (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
               and type(module(src.target)) in (nn.BatchNorm1d, nn.BatchNorm2d)):
            norms.append(src.target)
            src = src.args[0]
        if (isinstance(src, fx.Node) and src.op == "call_module" and src.target in canon.layers
                and len(src.users) == 1 and RevealCancelHead.eligible(module(src.target))):
            canon.heads[node.target] = (src.target, norms[::-1])


def canonicalise(model: nn.Module, example: torch.Tensor | None = None) -> Canonical:
    """Rewrite a parameter-sharing trace of `model` so DeepLIFT attributes it exactly (see
    the module doc). Raises XaiCompressError naming the module path of the first operation
    that has no rule. The model itself is not modified. `example` (1, C, H, W): an input
    to trace a model whose forward branches on sizes (see `trace`)."""
    gm, shape = trace(model, example)
    canon = _Rewriter(gm, model).run()
    canon.shape = shape
    return canon


def _describe(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"tensor method .{t}()"
    if node.op == "call_module":
        return f"module {t}"
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)
    mod = getattr(t, "__module__", None)
    return f"{mod}.{name}" if mod and mod not in ("_operator", "builtins") else name
