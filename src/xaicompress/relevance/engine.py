"""The DeepLIFT engine: a reference pass, then one forward and one backward pass per batch
give the contributions of every Conv2d/Linear of a model at once.

1. The model is canonicalised (relevance/canonical.py) and instrumented: every call of a
   rule-bearing module is wrapped by a `RuleModule`, every Conv2d/Linear call by a
   `LayerProbe`. The instrumented trace is cached per model and reused across calls; it
   is rebuilt when the model's structure changes (a module or parameter replaced or
   resized), and the reference pass is rerun when a weight or the reference changes.
2. The no-grad *reference pass* records what every rule needs (its input and output on the
   reference). A constant reference (zeros, mean, samples:N) is a batch of 1..K images run
   once; a per-sample reference (blur) runs once per batch.
3. The *input pass* runs a batch forward with gradients for the input only; the probes put
   a tensor hook on every layer output, which receives the multiplier during the single
   backward pass and hands a `LayerPass` to a callback that aggregates and drops it, so
   memory does not grow with the number of batches.

Because every rule gives the input and the reference the same multiplier, only the input
half needs a backward pass; the reference's activations are all the rules need from it.
The engine is not re-entrant: one pass at a time per model.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xaicompress.device import to_model_device
from xaicompress.errors import XaiCompressError
from xaicompress.relevance.canonical import Canonical, canonicalise
from xaicompress.relevance.options import choice
from xaicompress.relevance.rules import (
    EPS,
    LAYERNORM_RULES,
    RULES,
    Rescale,
    RevealCancelHead,
    Rule,
    RuleOptions,
    head_forward,
    match_rows,
)


@dataclass
class LayerPass:
    """What one Conv2d/Linear call gave in one backward pass; tensors are (R, ...) rows.

    x, x_ref: layer input and reference input (x_ref may broadcast: one row);
    z, z_ref: layer output and reference output; m: the multiplier of the output;
    split:    under RevealCancel (Δz⁺, Δz⁻, m⁺, m⁻): the output delta split into its
              positive and negative input terms, each with its own multiplier; else None.
    """

    name: str
    layer: nn.Module
    x: Tensor
    x_ref: Tensor
    z: Tensor
    z_ref: Tensor
    m: Tensor
    split: tuple[Tensor, Tensor, Tensor, Tensor] | None = None


LayerCallback = Callable[[LayerPass], None]


class _State:
    """Shared by every wrapper of one instrumented model."""

    def __init__(self) -> None:
        self.mode = "off"  # off | ref | input
        self.opts = RuleOptions()
        self.captum_pools = False
        self.callback: LayerCallback | None = None
        self.ref_rows = 1
        self.cut = False  # stop the backward pass at the input cut (no input maps)
        self.cut_total: Tensor | None = None  # (R,) contributions summed at the cut

    def add_cut(self, p: LayerPass) -> None:
        """Add a cut layer's contributions, per row, to the input-side total."""
        if p.split is not None:
            dzp, dzn, mp, mn = p.split
            c = dzp * mp + dzn * mn
        else:
            c = (p.z - p.z_ref) * p.m
        total = c.flatten(1).sum(1)
        self.cut_total = total if self.cut_total is None else self.cut_total + total

    def rows(self, memo: tuple, n: int) -> tuple:
        """Reference memo for n input rows: as is when it broadcasts (1 row) or matches,
        tiled along dim 0 for K references per input (batch-first tensors)."""
        if self.ref_rows in (1, n):
            return memo
        return tuple(match_rows(t, n) if isinstance(t, Tensor) and t.dim() > 0
                     and t.shape[0] == self.ref_rows else t for t in memo)


class RuleModule(nn.Module):
    """One call site of a rule-bearing module: records the reference, applies the rule."""

    def __init__(self, inner: nn.Module, rule: Rule, state: _State, label: str) -> None:
        super().__init__()
        self.inner, self.rule, self.state, self.label = inner, rule, state, label
        self.memo: tuple | None = None
        self.head: RevealCancelHead | None = None
        self.captum_plain = False

    def forward(self, *inputs: Any) -> Tensor:
        st = self.state
        if st.mode == "ref":
            y, self.memo = self.rule.reference(self.inner, inputs)
            return y
        if st.mode != "input" or (self.captum_plain and st.captum_pools):
            return self.inner(*inputs)
        if self.memo is None:
            raise RuntimeError(f"{self.label}: no reference pass recorded")
        memo = st.rows(self.memo, inputs[0].shape[0])
        if self.head is not None:
            return self.rule.forward(self.inner, inputs, memo, st.opts, head=self.head)
        return self.rule.forward(self.inner, inputs, memo, st.opts)


class LayerProbe(nn.Module):
    """One call site of a Conv2d/Linear: records the reference, hooks the multiplier."""

    def __init__(self, layer: nn.Module, state: _State, name: str) -> None:
        super().__init__()
        self.layer, self.state, self.name = layer, state, name
        self.memo: tuple[Tensor, Tensor] | None = None
        self.head: RevealCancelHead | None = None
        self.at_cut = False

    def forward(self, x: Tensor) -> Tensor:
        st = self.state
        if st.mode == "ref":
            z = self.layer(x)
            self.memo = (x.detach(), z.detach())
            return z
        if st.mode != "input":
            return self.layer(x)
        if self.memo is None:
            raise RuntimeError(f"{self.name}: no reference pass recorded")
        x_ref, z_ref = st.rows(self.memo, x.shape[0])
        head = self.head if st.opts.rule == "revealcancel" else None
        z = head_forward(self.layer, x, x_ref, head) if head is not None else self.layer(x)
        cut = st.cut and self.at_cut
        if cut:  # the backward pass ends here: the input's gradient is not needed
            z = z.detach().requires_grad_(True)
        cb = st.callback
        if (cb is not None or cut) and z.requires_grad:
            xd, zd, layer, name = x.detach(), z.detach(), self.layer, self.name

            def on_grad(m: Tensor) -> None:
                p = LayerPass(name, layer, xd, x_ref, zd, z_ref, m,
                              head.split() if head is not None else None)
                if cut:
                    st.add_cut(p)
                if cb is not None:
                    cb(p)

            z.register_hook(on_grad)
        return z


def structure_key(model: nn.Module) -> tuple:
    """Changes when a module or a parameter/buffer is replaced or resized."""
    mods = tuple((n, id(m), type(m)) for n, m in model.named_modules(remove_duplicate=False))
    tensors = tuple((n, id(t), tuple(t.shape), t.device) for n, t in (
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False)))
    return mods + tensors


def weights_key(model: nn.Module) -> tuple:
    """Changes when any parameter or buffer value changes (storage, version counter and an
    xor hash of the bits, which also catches writes through `.data`)."""
    return tuple((t.data_ptr(), t._version, t.dtype,
                  int(torch.hash_tensor(t.detach()).view(torch.int64)))
                 for t in (*model.parameters(), *model.buffers()) if t.numel())


class _Instrumented:
    """A model's canonical trace with wrappers installed (cached per model)."""

    def __init__(self, model: nn.Module, structure: tuple,
                 example: Tensor | None = None) -> None:
        self.structure = structure
        self.canon: Canonical = canonicalise(model, example)
        self.gm = self.canon.module
        self.state = _State()
        self.ref_weights: tuple | None = None
        self.ref_x: Tensor | None = None
        self.ref_out: Tensor | None = None
        self.reference_passes = 0
        self._install()

    def _replace(self, target: str, new: nn.Module) -> nn.Module:
        parent, _, attr = target.rpartition(".")
        owner = self.gm.get_submodule(parent) if parent else self.gm
        old = getattr(owner, attr)
        setattr(owner, attr, new)
        return old

    def _install(self) -> None:
        canon, st = self.canon, self.state
        rule_mods: dict[str, RuleModule] = {}
        for target, rule in canon.rules.items():
            inner = self.gm.get_submodule(target)
            rule_mods[target] = RuleModule(inner, rule, st, canon.origin.get(target, target))
            self._replace(target, rule_mods[target])
        probes: dict[str, LayerProbe] = {}
        for target, name in canon.layers.items():
            probes[target] = LayerProbe(self.gm.get_submodule(target), st, name)
            self._replace(target, probes[target])
        for act, (layer_target, norms) in canon.heads.items():
            if type(rule_mods[act].rule).forward is not Rescale.forward:
                continue  # a user's subclass with its own forward: no RevealCancel
            head = RevealCancelHead(probes[layer_target].layer,
                                    [self.gm.get_submodule(b) for b in norms])
            probes[layer_target].head = head
            rule_mods[act].head = head
        for target in canon.after_activation:
            rule_mods[target].captum_plain = True
        for target in canon.input_cut:
            probes[target].at_cut = True
        self.layer_names = {t: p.name for t, p in probes.items()}

    @contextmanager
    def session(self, model: nn.Module, mode: str, opts: RuleOptions, captum: bool,
                callback: LayerCallback | None) -> Iterator[_State]:
        """Eval mode and no parameter gradients for the duration of one pass."""
        flags = [(m, m.training) for m in model.modules()]
        grads = [(p, p.requires_grad) for p in model.parameters()]
        for m, _ in flags:
            m.training = False
        for p, _ in grads:
            p.requires_grad_(False)  # only input gradients are needed: skips weight GEMMs
        st = self.state
        st.mode, st.opts, st.captum_pools, st.callback = mode, opts, captum, callback
        try:
            yield st
        finally:
            st.mode, st.callback = "off", None
            for m, f in flags:
                m.training = f
            for p, f in grads:
                p.requires_grad_(f)


_CACHE: weakref.WeakKeyDictionary[nn.Module, _Instrumented] = weakref.WeakKeyDictionary()


def instrumented(model: nn.Module, example: Tensor | None = None) -> _Instrumented:
    """The cached instrumented trace of `model`, rebuilt when its structure changed (or,
    for a trace specialised to an input size, when `example` has another size)."""
    key = structure_key(model)
    inst = _CACHE.get(model)
    fits = inst is not None and (inst.canon.shape is None or example is None
                                 or inst.canon.shape == tuple(example.shape[1:]))
    if inst is None or inst.structure != key or not fits:
        inst = _Instrumented(model, key, example)
        _CACHE[model] = inst
    return inst


@dataclass
class BatchAttribution:
    """What one batch of R rows gave.

    inputs:  (R, C, H, W) input-space contributions (x - x_ref) * m_x (None when not asked)
    logits:  (R, K) model outputs on the inputs
    delta_f: (R,) f_t(x) - f_t(x_ref) of the target (sum over classes for target "all")
    delta:   (R,) sum of `inputs` minus delta_f: the convergence delta (0 in exact maths)
    """

    inputs: Tensor | None
    logits: Tensor
    delta_f: Tensor
    delta: Tensor


class DeepLiftEngine:
    """DeepLIFT for every Conv2d/Linear of a model at once.

    `set_reference(ref)` runs the reference pass on ref (K, C, H, W) (K = 1 for a constant
    reference, or one row per input row; skipped when neither the reference nor a weight
    changed since the last one); `attribute(x, target, on_layer)` runs the input pass over
    rows x (R, C, H, W) and one backward pass, calling `on_layer(LayerPass)` per layer call.

    Options: eps (Rescale 0/0 guard), maxpool = rescale | captum, rule = rescale |
    revealcancel, layernorm = decompose | constant (see docs/relevance.md).
    """

    def __init__(self, model: nn.Module, *, eps: float = EPS, maxpool: str = "rescale",
                 rule: str = "rescale", layernorm: str = "decompose") -> None:
        self.maxpool = choice("maxpool", maxpool, ("rescale", "captum"))
        self.opts = RuleOptions(float(eps), choice("rule", rule, RULES),
                                choice("layernorm", layernorm, LAYERNORM_RULES))
        self.model = model
        self._inst: _Instrumented | None = None
        try:
            self._inst = instrumented(model)
        except XaiCompressError:
            pass  # may trace with an example input (a forward that branches on sizes):
            # set_reference retries with the reference and raises if that fails too

    @property
    def inst(self) -> _Instrumented:
        if self._inst is None:
            raise RuntimeError("set_reference must run first (the model traces only on an "
                               "example input)")
        return self._inst

    def _instrument(self, example: Tensor) -> _Instrumented:
        inst = self._inst
        if inst is None or (inst.canon.shape is not None
                            and inst.canon.shape != tuple(example.shape[1:])):
            self._inst = instrumented(self.model, example[:1])
        return self.inst

    @property
    def names(self) -> dict[str, str]:
        """Call target -> the model's Conv2d/Linear name."""
        return self.inst.layer_names

    @property
    def classes(self) -> int:
        """The model's outputs per row, from the reference pass (set_reference first)."""
        if self.inst.ref_out is None:
            raise RuntimeError("set_reference must run before the classes are known")
        return int(self.inst.ref_out.shape[1])

    @property
    def heads(self) -> int:
        """How many nonlinearities can take RevealCancel (the rest use Rescale)."""
        return len(self.inst.canon.heads)

    def set_reference(self, ref: Tensor) -> Tensor:
        """Run the reference pass on ref (K, C, H, W); returns its logits (K, classes)."""
        ref = to_model_device(ref.detach(), self.model)  # a CPU reference for a GPU model
        inst = self._instrument(ref)
        wkey = weights_key(self.model)
        if (inst.ref_x is not None and inst.ref_out is not None and inst.ref_weights == wkey
                and inst.ref_x.shape == ref.shape and inst.ref_x.dtype == ref.dtype
                and inst.ref_x.device == ref.device
                and torch.equal(inst.ref_x, ref)):
            return inst.ref_out
        with inst.session(self.model, "ref", self.opts, False, None), torch.no_grad():
            out = _logits(inst.gm(ref))
        inst.ref_x, inst.ref_out, inst.ref_weights = ref, out, wkey
        inst.state.ref_rows = ref.shape[0]
        inst.reference_passes += 1
        return out

    def attribute(self, x: Tensor, target: Tensor | str,
                  on_layer: LayerCallback | None = None, *,
                  inputs: bool = True) -> BatchAttribution:
        """Input pass and one backward pass over rows x (R, C, H, W).

        target: class index per row (R,) int64, "pred" (argmax per row) or "all" (the sum
        of all class outputs, by linearity the sum of every class's contributions).
        inputs=False: no input-space maps are wanted (`inputs` is None then); where the
        model has an input cut (`Canonical.input_cut`, e.g. its first conv) the backward
        pass stops there and the convergence delta is taken at the cut, whose
        contributions sum to the input's (the first convolution's input gradient, often
        the most expensive one, is skipped).
        """
        x = to_model_device(x, self.model)
        inst = self.inst
        if inst.ref_x is None or inst.ref_out is None:
            raise RuntimeError("set_reference must run before attribute")
        if inst.canon.shape is not None and tuple(x.shape[1:]) != inst.canon.shape:
            raise XaiCompressError(f"input shape {tuple(x.shape[1:])}: the model was traced "
                                   f"for {inst.canon.shape} (its forward branches on sizes)")
        n = x.shape[0]
        cut = not inputs and bool(inst.canon.input_cut)
        xr = x.detach() if cut else x.detach().requires_grad_(True)
        with inst.session(self.model, "input", self.opts, self.maxpool == "captum",
                          on_layer) as st, torch.enable_grad():
            st.cut, st.cut_total = cut, None
            out = _logits(inst.gm(xr))
            st.mode = "off"
            grad_out = _target_grad(out, target)
            delta_f = ((out.detach() - match_rows(inst.ref_out, n)) * grad_out).sum(1)
            out.backward(grad_out)
            total = st.cut_total
            st.cut, st.cut_total = False, None
        if cut:
            total = total if total is not None else torch.zeros_like(delta_f)
            return BatchAttribution(None, out.detach(), delta_f, total.detach() - delta_f)
        grad = xr.grad if xr.grad is not None else torch.zeros_like(xr)
        contrib = (xr.detach() - match_rows(inst.ref_x, n)) * grad
        delta = contrib.flatten(1).sum(1) - delta_f
        return BatchAttribution(contrib.detach(), out.detach(), delta_f, delta)


def _logits(out: Any) -> Tensor:
    if isinstance(out, Tensor) and out.dim() == 2:
        return out
    raise XaiCompressError(f"model output {type(out).__name__} "
                           f"{tuple(out.shape) if isinstance(out, Tensor) else ''}: expected "
                           "logits (N, classes)")


def _target_grad(out: Tensor, target: Tensor | str) -> Tensor:
    """(R, classes) one-hot rows of the target (ones for "all")."""
    if isinstance(target, str):
        if target == "all":
            return torch.ones_like(out)
        if target != "pred":
            raise XaiCompressError(f"target={target!r}: expected true, pred, all or a class")
        target = out.detach().argmax(1)
    target = torch.as_tensor(target, dtype=torch.long, device=out.device).reshape(-1)
    if target.numel() == 1 and out.shape[0] != 1:
        target = target.expand(out.shape[0])
    if target.numel() != out.shape[0]:
        raise XaiCompressError(f"target: {target.numel()} classes for {out.shape[0]} inputs")
    if (target < 0).any() or (target >= out.shape[1]).any():
        raise XaiCompressError(f"target: class indices must be in [0, {out.shape[1]})")
    return F.one_hot(target, out.shape[1]).to(out.dtype)


def layer_attributions(model: nn.Module, x: Tensor, reference: Tensor, target: Tensor | str,
                       **options: Any) -> tuple[dict[str, Tensor], BatchAttribution]:
    """Per-sample DeepLIFT contributions of every Conv2d/Linear output, unaggregated.

    x (N, C, H, W); reference (1 or N, C, H, W); target (N,) class indices, "pred" or "all";
    options: those of `DeepLiftEngine`. Returns ({layer: (z - z_ref) * m shaped like the
    layer output (N, O, ...)}, the batch's input attribution). The same quantity as
    Captum's `LayerDeepLift(model, layer)` with `attribute_to_layer_input=False`, for all
    layers from one backward pass.
    """
    engine = DeepLiftEngine(model, **options)
    engine.set_reference(reference)
    out: dict[str, Tensor] = {}

    def keep(p: LayerPass) -> None:
        if p.split is not None:
            dzp, dzn, mp, mn = p.split
            c = dzp * mp + dzn * mn
        else:
            c = (p.z - p.z_ref) * p.m
        out[p.name] = out[p.name] + c if p.name in out else c

    res = engine.attribute(x, target, keep)
    return out, res
