"""Checkpoints: one safetensors file, self-describing, never a pickle.

Layout of a checkpoint file (`.safetensors`, format version 2):
  tensors   the model's state_dict, plus compression tensors under `__xc__/<layer>/<field>`
            (`encoding.CompressionState.to_checkpoint`)
  metadata  `xaicompress` -> JSON: format, version, model spec (registry name or
            `package.module:factory`, constructor kwargs, input shape, classes), the width
            of every Conv/Linear/BatchNorm (so pruned architectures rebuild exactly),
            compression ints, dataset spec, history of stages, metrics, and `checksum`:
            "sha256:<hex>" over the metadata without it and every tensor (`_digest`).

Loading reads the 8-byte prefix and the header first and checks the header length and
every tensor's dtype, shape and offsets against the real file size and the caps below,
so a damaged or hostile file is refused before its data is read. Then it checks the
checksum, refuses model factories the user did not name (`check_trusted`), builds the
architecture on the meta device to compare every tensor's shape before anything is
allocated, loads the tensors (float tensors converted explicitly to the model's dtype,
then checked for NaN/Inf) and re-applies the compression state; outputs are bit-identical
to the saved model. Version 1 files (no checksum) are still read, with every other check.

Writing verifies before the rename: the temporary file is loaded back and must give
exactly the in-memory model's outputs on a fixed probe batch (`verify_reload`); a model
with NaN/Inf weights is refused with a message naming the output.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from xaicompress.atomic import atomic_write_bytes
from xaicompress.data.preprocess import Preprocess
from xaicompress.encoding import CompressionState
from xaicompress.encoding.checks import FLOAT_DTYPES
from xaicompress.errors import XaiCompressError
from xaicompress.models.registry import check_model_kwargs, check_trusted, create_model

FORMAT = "xaicompress-checkpoint"
VERSION = 2
_META_KEY = "xaicompress"
_XC_PREFIX = CompressionState.PREFIX + "/"

# Caps (docs/format.md): checked before anything of that size is read or allocated.
MAX_FILE_BYTES = 1 << 32  # 4 GiB
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
MAX_TENSORS = 100_000
MAX_NDIM = 8
MAX_DIM = (1 << 31) - 1
MAX_CHANNELS = 4096  # input channels of the model
MAX_IMAGE = 16384  # input height / width
MAX_CLASSES = 1_000_000
MAX_WIDTH = 1 << 20  # channels / features of one resized layer
#: safetensors dtype -> (torch dtype, bytes per value); float8 and others are refused
ST_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "F64": (torch.float64, 8), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1)}
_ST_NAME = {dt: name for name, (dt, _) in ST_DTYPES.items()}
#: the fixed probe batch writers compare outputs on (docs/format.md, "verify")
PROBE_BATCH, PROBE_SEED = 4, 0


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class ModelSpec:
    """How to rebuild the model before loading weights."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: how pixels become this model's inputs (normalisation, size, resize); None in files
    #: written before it was recorded (their data's own statistics then apply)
    preprocess: Preprocess | None = None
    #: the Python API's models (`xaicompress.api`): the user's own module, whose copy is the
    #: architecture (resized to the file's widths on loading); never written to a file
    template: nn.Module | None = field(default=None, compare=False, repr=False)

    def build(self) -> nn.Module:
        if self.template is not None:
            return copy.deepcopy(self.template)
        return create_model(self.name, tuple(self.input_shape), self.num_classes, **self.kwargs)

    @property
    def loader_model(self) -> str | nn.Module:
        """What a loader's `model=` needs to rebuild this spec (writers verify with it)."""
        return self.template if self.template is not None else self.name

    def with_template(self, template: nn.Module | None) -> ModelSpec:
        """This spec built from a copy of `template` (None: from its name)."""
        from dataclasses import replace

        return replace(self, template=template)

    def to_meta(self) -> dict[str, Any]:
        meta = {"name": self.name, "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "kwargs": self.kwargs}
        if self.preprocess is not None:
            meta["preprocess"] = self.preprocess.to_meta()
        return meta

    @classmethod
    def from_meta(cls, ms: Any, source: str) -> ModelSpec:
        """The spec a file's metadata gives, every field type- and range-checked."""
        if not isinstance(ms, dict):
            raise XaiCompressError(f"{source}: model spec must be an object")
        name, shape, classes = ms.get("name"), ms.get("input_shape"), ms.get("num_classes")
        if not isinstance(name, str) or not 0 < len(name) <= 200:
            raise XaiCompressError(f"{source}: model name {str(name)[:60]!r} is not a string "
                                   "of 1 to 200 characters")
        limits = (MAX_CHANNELS, MAX_IMAGE, MAX_IMAGE)
        if not (isinstance(shape, list) and len(shape) == 3 and all(
                _is_int(v) and 1 <= v <= lim for v, lim in zip(shape, limits, strict=True))):
            raise XaiCompressError(f"{source}: input_shape {str(shape)[:60]} is not [C, H, W] "
                                   f"with C <= {MAX_CHANNELS} and H, W <= {MAX_IMAGE}")
        if not _is_int(classes) or not 1 <= classes <= MAX_CLASSES:
            raise XaiCompressError(f"{source}: num_classes {classes!r} is not an integer "
                                   f"from 1 to {MAX_CLASSES}")
        kwargs = ms.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise XaiCompressError(f"{source}: model kwargs must be an object")
        unknown = sorted(set(ms) - {"name", "input_shape", "num_classes", "kwargs",
                                    "preprocess"})
        if unknown:
            raise XaiCompressError(f"{source}: model spec has unknown keys {unknown[:3]}")
        pre = None
        if ms.get("preprocess") is not None:
            pre = Preprocess.from_meta(ms["preprocess"], source)
            if (pre.channels not in (None, shape[0])
                    or pre.size not in (None, shape[1]) or shape[1] != shape[2]):
                raise XaiCompressError(f"{source}: preprocess ({pre.describe()}) does not fit "
                                       f"input_shape {shape}")
        return cls(name, (shape[0], shape[1], shape[2]), classes, dict(kwargs), pre)


@dataclass
class Checkpoint:
    model: nn.Module
    spec: ModelSpec
    data: str | None = None
    state: CompressionState = field(default_factory=CompressionState)
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def copy(self) -> Checkpoint:
        return Checkpoint(copy.deepcopy(self.model), self.spec, self.data, self.state.copy(),
                          copy.deepcopy(self.history), copy.deepcopy(self.metrics))


# --------------------------------------------------------------------- widths
# Structured pruning shrinks layers in place (Torch-Pruning resizes their tensors and their
# size attributes). A file records the width of every layer of these kinds; reloading
# builds the architecture and resizes the same modules *in place* (`resize_layer`), so a
# subclass keeps everything else it holds: timm's BatchNormAct2d keeps its fused activation,
# which re-creating the layer by its type would lose.
_CONV = nn.modules.conv._ConvNd
_BATCHNORM = nn.modules.batchnorm._BatchNorm
_RESIZABLE = (_CONV, nn.Linear, _BATCHNORM, nn.LayerNorm, nn.GroupNorm, nn.PReLU)


def _width_of(m: nn.Module) -> dict[str, int] | None:
    """The recorded width of one layer ({"in", "out", "groups"} as it applies), None for
    modules of other kinds (and LayerNorms over more than one dimension)."""
    if isinstance(m, _CONV) and not m.transposed:
        return {"in": m.in_channels, "out": m.out_channels, "groups": m.groups}
    if isinstance(m, nn.Linear):
        return {"in": m.in_features, "out": m.out_features}
    if isinstance(m, _BATCHNORM):
        return {"out": m.num_features}
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        return {"out": m.normalized_shape[0]}
    if isinstance(m, nn.GroupNorm):
        return {"out": m.num_channels, "groups": m.num_groups}
    if isinstance(m, nn.PReLU):
        return {"out": m.num_parameters}
    return None


def layer_widths(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per-layer widths (in/out channels or features, groups) of every resizable layer:
    Conv, Linear, BatchNorm (subclasses included), LayerNorm, GroupNorm, PReLU."""
    out: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        w = _width_of(m)
        if w is not None:
            out[name] = w
    return out


def check_widths(widths: Any, source: str) -> dict[str, dict[str, int]]:
    """A file's widths: layer -> {"in", "out", "groups"} of integers from 1 to MAX_WIDTH,
    checked before any layer is resized."""
    if widths is None:
        return {}
    if not isinstance(widths, dict) or len(widths) > MAX_TENSORS:
        raise XaiCompressError(f"{source}: widths must be an object mapping layer names to "
                               "widths")
    for name, w in widths.items():
        if not (isinstance(w, dict) and w and set(w) <= {"in", "out", "groups"} and all(
                _is_int(v) and 1 <= v <= MAX_WIDTH for v in w.values())):
            raise XaiCompressError(f"{source}: bad width for layer {name[:100]!r}: "
                                   f"{str(w)[:80]} (expected in/out/groups from 1 to "
                                   f"{MAX_WIDTH})")
    return widths


def _set_tensor(m: nn.Module, name: str, shape: tuple[int, ...]) -> None:
    """Give `m.<name>` (a parameter or buffer, possibly None) the shape `shape`: a new
    tensor of the same dtype and device holding the old values' leading block (zeros where
    it grew); a loader then replaces the values with the file's."""
    old = getattr(m, name, None)
    if old is None or tuple(old.shape) == tuple(shape):
        return
    new = torch.zeros(shape, dtype=old.dtype, device=old.device)
    if len(shape) == old.dim():
        block = tuple(slice(0, min(a, b)) for a, b in zip(shape, old.shape, strict=True))
        with torch.no_grad():
            new[block] = old.detach()[block]
    if isinstance(old, nn.Parameter):
        setattr(m, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        m._buffers[name] = new


def resize_layer(m: nn.Module, w: dict[str, int]) -> None:
    """Resize layer `m` in place to width `w`: its size attributes and the shapes of its
    own parameters and buffers, nothing else (its class, submodules and options stay)."""
    out = w["out"]
    if isinstance(m, _CONV):
        cin, groups = w["in"], w.get("groups", m.groups)
        if cin % groups or out % groups:
            raise ValueError("channels not divisible by groups")
        m.in_channels, m.out_channels, m.groups = cin, out, groups
        _set_tensor(m, "weight", (out, cin // groups, *m.kernel_size))
        _set_tensor(m, "bias", (out,))
    elif isinstance(m, nn.Linear):
        m.in_features, m.out_features = w["in"], out
        _set_tensor(m, "weight", (out, w["in"]))
        _set_tensor(m, "bias", (out,))
    elif isinstance(m, (_BATCHNORM, nn.LayerNorm, nn.GroupNorm, nn.PReLU)):
        if isinstance(m, _BATCHNORM):
            m.num_features = out
        elif isinstance(m, nn.LayerNorm):
            m.normalized_shape = (out,)
        elif isinstance(m, nn.GroupNorm):
            m.num_channels, m.num_groups = out, w.get("groups", m.num_groups)
            if out % m.num_groups:
                raise ValueError("channels not divisible by groups")
        else:
            m.num_parameters = out
        for t in ("weight", "bias", "running_mean", "running_var"):
            _set_tensor(m, t, (out,))
    else:
        raise TypeError(type(m).__name__)


def apply_widths(model: nn.Module, widths: dict[str, dict[str, int]], source: str) -> None:
    """Resize, in place, every layer whose width differs from `widths`."""
    modules = dict(model.named_modules())
    for name, w in widths.items():
        m = modules.get(name)
        if m is None or _width_of(m) is None:
            raise XaiCompressError(f"{source}: metadata names layer {name[:100]!r} that the "
                                   "model does not have")
        try:
            if _width_of(m) != w:
                resize_layer(m, w)
        except (KeyError, TypeError, ValueError) as exc:
            raise XaiCompressError(f"{source}: bad width for layer {name!r}: {w}") from exc


def shrink_other_tensors(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """Give the parameters and buffers of modules that are not resizable layers (e.g. a
    layer scale Torch-Pruning pruned as an unwrapped parameter) the shape the file holds,
    when it is the built shape shrunk along some dimensions (structured pruning only ever
    removes); anything else is left for the shape check to report."""
    for mod_name, m in model.named_modules():
        if _width_of(m) is not None:
            continue
        prefix = f"{mod_name}." if mod_name else ""
        for t_name, t in [*m._parameters.items(), *m._buffers.items()]:
            want = shapes.get(prefix + t_name)
            if t is None or want is None or tuple(want) == tuple(t.shape):
                continue
            if len(want) == t.dim() and all(0 < a <= b for a, b in zip(want, t.shape,
                                                                        strict=True)):
                _set_tensor(m, t_name, tuple(want))


def layer_widths_of(m: nn.Module) -> dict[str, int]:
    w = _width_of(m)
    if w is None:
        raise TypeError(type(m).__name__)
    return w


# ------------------------------------------------------------------ rebuilding
def _check_shapes(model: nn.Module, shapes: dict[str, tuple[int, ...]], spec: ModelSpec,
                  source: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise XaiCompressError(f"{source}: tensors do not match model {spec.name!r} "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, shape in shapes.items():
        if tuple(shape) != expected[k]:
            raise XaiCompressError(f"{source}: tensor {k!r} has shape {tuple(shape)}, model "
                                   f"{spec.name!r} expects {expected[k]}")


#: what a loader's `model=` may be: the factory name the user trusts, or their own module
Trusted = str | nn.Module | None


def spec_for(spec: ModelSpec, trusted: Trusted) -> tuple[ModelSpec, str | None]:
    """A file's spec as the user's `model=` rebuilds it: from a copy of their own module
    when they gave one (the trusted name is then irrelevant), else from its name."""
    if isinstance(trusted, nn.Module):
        return spec.with_template(trusted), None
    return spec, trusted


def rebuild_model(spec: ModelSpec, widths: dict[str, dict[str, int]],
                  shapes: dict[str, tuple[int, ...]], source: str,
                  trusted: str | None) -> nn.Module:
    """The architecture a file names, with its layer widths, once every tensor shape the
    file holds (`shapes`) matches it. Nothing large is allocated before that: the check
    runs on a meta-device copy (no memory), so neither kwargs such as width=1e9 nor widths
    of 10^6 channels allocate anything."""
    if spec.template is None:  # the user's own module is trusted as it is
        check_trusted(spec.name, trusted, source)
        check_model_kwargs(spec.name, spec.kwargs, source)
    try:
        with torch.device("meta"):
            skeleton: nn.Module | None = spec.build()
            apply_widths(skeleton, widths, source)
            shrink_other_tensors(skeleton, shapes)
    except XaiCompressError as exc:
        if ":" not in spec.name and spec.template is None:
            raise XaiCompressError(f"{source}: cannot rebuild the model it names: {exc}") from None
        skeleton = None  # a user factory that cannot run on the meta device: checked below
    if skeleton is not None:
        _check_shapes(skeleton, shapes, spec, source)
    try:
        model = spec.build()
    except XaiCompressError as exc:
        raise XaiCompressError(f"{source}: cannot rebuild the model it names: {exc}") from None
    apply_widths(model, widths, source)
    shrink_other_tensors(model, shapes)
    if skeleton is None:
        _check_shapes(model, shapes, spec, source)
    return model


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load `tensors` (names and shapes already checked) into `model`: float tensors are
    converted to the model's dtype first and refused when any value is NaN or Inf after
    that (a float64 1e300 becomes inf in float32); other tensors must have its dtype."""
    expected = model.state_dict()
    converted = {}
    for k, v in tensors.items():
        want = expected[k].dtype
        if want.is_floating_point:
            if v.dtype not in FLOAT_DTYPES:
                raise XaiCompressError(f"{source}: tensor {k!r} has dtype {v.dtype}, expected "
                                       f"a float tensor for the model's {want}")
            v = v.to(want)
            if not torch.isfinite(v).all():
                raise XaiCompressError(f"{source}: tensor {k!r} contains NaN or Inf values "
                                       f"(as {want})")
        elif v.dtype != want:
            raise XaiCompressError(f"{source}: tensor {k!r} has dtype {v.dtype}, the model "
                                   f"expects {want}")
        converted[k] = v
    model.load_state_dict(converted, strict=True)
    model.eval()


# ---------------------------------------------------------------- verifying
def probe_batch(input_shape: tuple[int, ...]) -> torch.Tensor:
    """The fixed inputs (PROBE_BATCH, C, H, W), standard normal, seed PROBE_SEED, on which
    every writer compares the file it wrote with the in-memory model."""
    g = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randn(PROBE_BATCH, *input_shape, generator=g)


def probe_outputs(model: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    """The model's outputs (eval mode, no gradients) on `probe_batch`, computed on a CPU copy
    of a GPU model: files are loaded back on the CPU, and the comparison must be exact."""
    from xaicompress.device import cpu_copy

    model = cpu_copy(model)
    x = probe_batch(input_shape)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.train(was)


def check_finite_model(ckpt: Checkpoint, out: str | os.PathLike[str]) -> None:
    """Refuse to write a model the loader would refuse: NaN/Inf weights or encodings."""
    for k, v in ckpt.model.state_dict().items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise XaiCompressError(f"{out}: not written: the model's weights contain NaN or "
                                   f"Inf (tensor {k!r}); training diverged, lower the "
                                   "learning rate")
    ckpt.state.validate(ckpt.model, f"{out}: not written")


def check_same_structure(model: nn.Module, back: nn.Module,
                         out: str | os.PathLike[str]) -> None:
    """The reloaded model has the in-memory model's module classes and layer widths under
    every name both have (a layer rebuilt as another class, e.g. a fused BatchNorm +
    activation turned into a plain BatchNorm, may agree on the 4 probe images by chance).
    Names only one side has are wrapper modules (parametrizations, export wrappers)."""
    from torch.nn.utils.parametrize import type_before_parametrizations as cls

    mine = dict(model.named_modules())
    for name, m in back.named_modules():
        other = mine.get(name)
        if other is None:
            continue
        if cls(other) is not cls(m) or _width_of(other) != _width_of(m):
            raise XaiCompressError(
                f"{out}: not written: reloaded, layer {name!r} is a {type(m).__name__} "
                f"{_width_of(m) or ''}, the model's is a {type(other).__name__} "
                f"{_width_of(other) or ''}; please report this bug")


def verify_reload(ckpt: Checkpoint, load: Callable[[Path], Checkpoint],
                  out: str | os.PathLike[str]) -> Callable[[Path], None]:
    """An `atomic_write_bytes` verify hook: the temporary file, loaded with `load`, must give
    exactly the in-memory model's outputs on the probe batch."""
    def verify(tmp: Path) -> None:
        try:
            back = load(tmp)
        except XaiCompressError as exc:
            msg = str(exc).replace(str(tmp), str(out))
            raise XaiCompressError(f"{out}: not written: it would not load back ({msg})") \
                from None
        check_same_structure(ckpt.model, back.model, out)
        want = probe_outputs(ckpt.model, ckpt.spec.input_shape)
        got = probe_outputs(back.model, ckpt.spec.input_shape)
        if not torch.equal(want, got):
            diff = float((want - got).abs().max())
            raise XaiCompressError(f"{out}: not written: reloaded, it gives other outputs "
                                   f"than the model (max difference {diff:.3g}); please "
                                   "report this bug")
    return verify


# ---------------------------------------------------------------------- save
def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _canonical(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _digest(meta: dict[str, Any],
            tensors: Iterable[tuple[str, str, list[int], memoryview]]) -> str:
    """"sha256:<hex>" of the canonical metadata JSON (sorted keys, no spaces, without the
    checksum) followed, for every tensor in name order, by the JSON [name, dtype, shape]
    and the tensor's raw little-endian bytes."""
    h = hashlib.sha256(_canonical(meta))
    for name, dtype, shape, data in sorted(tensors, key=lambda t: t[0]):
        h.update(json.dumps([name, dtype, shape]).encode("utf-8"))
        h.update(data)
    return "sha256:" + h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def checkpoint_bytes(ckpt: Checkpoint) -> bytes:
    """Serialise to safetensors bytes (what `save_checkpoint` writes)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in ckpt.model.state_dict().items()}
    extra, comp_meta = ckpt.state.to_checkpoint()
    tensors.update(extra)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": ckpt.spec.to_meta(),
        "widths": layer_widths(ckpt.model),
        "compression": comp_meta,
        "data": ckpt.data,
        "history": ckpt.history,
        "metrics": ckpt.metrics,
    }
    # through JSON once, so the checksum covers exactly what a loader parses
    meta = json.loads(json.dumps(meta, default=_json_default))
    meta["checksum"] = _digest(meta, ((k, _ST_NAME[v.dtype], list(v.shape), _tensor_bytes(v))
                                      for k, v in tensors.items()))
    return st_save(tensors, metadata={_META_KEY: json.dumps(meta)})


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike[str]) -> Path:
    """Write atomically, after checking the model is finite and verifying that the file
    loads back to the same outputs; an interrupted or refused save leaves no file."""
    check_finite_model(ckpt, path)
    atomic_write_bytes(path, checkpoint_bytes(ckpt), verify=verify_reload(
        ckpt, lambda tmp: load_checkpoint(tmp, model=ckpt.spec.loader_model), path))
    return Path(path)


# ---------------------------------------------------------------------- load
@dataclass
class _Header:
    """The checked safetensors header: tensor entries, the metadata string, data start."""

    entries: dict[str, dict[str, Any]]
    meta_raw: str | None
    data_start: int


def _refuse_pickle(first: bytes, source: str) -> None:
    if first[8:9] != b"{" and (first[:1] == b"\x80" or first[:2] == b"PK"):
        raise XaiCompressError(f"{source}: is a pickle/torch.save file; refusing to unpickle, "
                               "expected an xaicompress safetensors checkpoint (a state dict "
                               "of your own model: xaicompress import FILE --model SPEC "
                               "--data SPEC)")


def _bad(source: str, why: str) -> XaiCompressError:
    return XaiCompressError(f"{source}: not a valid safetensors checkpoint (truncated or "
                            f"corrupt: {why})")


def _header_length(first8: bytes, size: int, source: str) -> int:
    if size < 8 or len(first8) < 8:
        raise _bad(source, f"{size} bytes")
    if size > MAX_FILE_BYTES:
        raise XaiCompressError(f"{source}: {size} bytes, more than the {MAX_FILE_BYTES}-byte "
                               "cap of a checkpoint")
    (n,) = struct.unpack("<Q", first8[:8])
    if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
        raise _bad(source, f"header length {n} for a file of {size} bytes")
    return n


def _entry_ok(e: Any, data_len: int) -> bool:
    if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"} or \
            not isinstance(e["dtype"], str) or e["dtype"] not in ST_DTYPES:
        return False
    shape, off = e["shape"], e["data_offsets"]
    if not (isinstance(shape, list) and len(shape) <= MAX_NDIM
            and all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape)):
        return False
    if not (isinstance(off, list) and len(off) == 2 and all(_is_int(v) for v in off)):
        return False
    return (0 <= off[0] <= off[1] <= data_len
            and off[1] - off[0] == math.prod(shape) * ST_DTYPES[e["dtype"]][1])


def _parse_header(text: bytes, size: int, source: str) -> _Header:
    """Check every entry's dtype, shape and offsets against the file size, and that the
    entries cover the data exactly (a file padded to 10 GB is refused here, unread)."""
    try:
        header = json.loads(text.decode("utf-8"))
    except RecursionError:
        raise _bad(source, "header JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(source, str(exc)[:120]) from None
    if not isinstance(header, dict) or len(header) > MAX_TENSORS + 1:
        raise _bad(source, "header is not an object of tensors")
    meta = header.pop("__metadata__", None) or {}
    data_len = size - 8 - len(text)
    for name, e in header.items():
        dtype = e.get("dtype") if isinstance(e, dict) else None
        if isinstance(dtype, str) and dtype not in ST_DTYPES:
            raise XaiCompressError(f"{source}: tensor {name[:100]!r} has dtype {dtype}; "
                                   f"checkpoints hold only {', '.join(ST_DTYPES)} tensors")
        if not _entry_ok(e, data_len):
            raise _bad(source, f"entry of tensor {name[:100]!r} does not fit the file")
    spans = sorted(tuple(e["data_offsets"]) for e in header.values())
    end = 0
    for a, b in spans:
        if a != end:
            raise _bad(source, "tensor data overlaps or leaves gaps")
        end = b
    if end != data_len:
        raise _bad(source, f"the header describes {end} bytes of tensors, the file holds "
                           f"{data_len}")
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _bad(source, "metadata is not a map of strings")
    return _Header(header, meta.get(_META_KEY), 8 + len(text))


def _read_header(f: BinaryIO, size: int, source: str) -> _Header:
    first = f.read(9)
    _refuse_pickle(first, source)
    n = _header_length(first, size, source)
    f.seek(8)
    return _parse_header(f.read(n), size, source)


def load_checkpoint(path: str | os.PathLike[str], *, model: Trusted = None) -> Checkpoint:
    """Load a checkpoint; any problem is a one-line `XaiCompressError` naming the file.

    model: the model factory the user trusts (`package.module:factory`, as given with
    --model); a checkpoint naming any other unregistered factory is refused unrun. Or the
    user's own `nn.Module` (Python API): a copy of it is the architecture, whatever the
    file names (`ModelSpec.template`).
    """
    p = Path(path)
    if not p.is_file():
        raise XaiCompressError(f"{p}: checkpoint file does not exist")
    with open(p, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = _read_header(f, size, str(p))
        f.seek(0)
        raw = f.read()
    if len(raw) != size:
        raise XaiCompressError(f"{p}: changed size while being read")
    return _checkpoint_from(raw, head, str(p), model)


def checkpoint_from_bytes(raw: bytes, source: str = "checkpoint", *,
                          model: Trusted = None) -> Checkpoint:
    _refuse_pickle(raw[:9], source)
    n = _header_length(raw[:8], len(raw), source)
    head = _parse_header(raw[8:8 + n], len(raw), source)
    return _checkpoint_from(raw, head, source, model)


def _parse_meta(head: _Header, raw: bytes, source: str) -> dict[str, Any]:
    if head.meta_raw is None:
        raise XaiCompressError(f"{source}: safetensors file without xaicompress metadata; "
                               "expected a checkpoint written by xaicompress (a state dict of "
                               "your own model: xaicompress import FILE --model SPEC --data "
                               "SPEC)")
    try:
        meta = json.loads(head.meta_raw)
    except RecursionError:
        raise XaiCompressError(f"{source}: xaicompress metadata nested too deeply") from None
    except ValueError as exc:
        raise XaiCompressError(f"{source}: bad xaicompress metadata ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise XaiCompressError(f"{source}: bad xaicompress metadata (format is not {FORMAT!r})")
    version = meta.get("version")
    if not _is_int(version) or version < 1:
        raise XaiCompressError(f"{source}: checkpoint format version {repr(version)[:20]}: "
                               "expected an integer")
    if version > VERSION:
        raise XaiCompressError(f"{source}: checkpoint format version {version} is newer than "
                               f"this xaicompress (supports {VERSION})")
    if version >= 2:
        stored = meta.pop("checksum", None)
        body = memoryview(raw)[head.data_start:]
        actual = _digest(meta, ((k, e["dtype"], e["shape"],
                                 body[e["data_offsets"][0]:e["data_offsets"][1]])
                                for k, e in head.entries.items()))
        if stored != actual:
            raise XaiCompressError(f"{source}: checksum mismatch: the file is damaged (or was "
                                   "edited)")
    return meta


def _checkpoint_from(raw: bytes, head: _Header, source: str, trusted: Trusted
                     ) -> Checkpoint:
    meta = _parse_meta(head, raw, source)
    spec, trusted = spec_for(ModelSpec.from_meta(meta.get("model"), source), trusted)
    widths = check_widths(meta.get("widths"), source)
    history, metrics = meta.get("history") or [], meta.get("metrics") or {}
    if not isinstance(history, list) or not isinstance(metrics, dict):
        raise XaiCompressError(f"{source}: history must be a list and metrics an object")
    data = meta.get("data")
    if data is not None and not isinstance(data, str):
        raise XaiCompressError(f"{source}: data spec must be a string")
    shapes = {k: tuple(e["shape"]) for k, e in head.entries.items()
              if not k.startswith(_XC_PREFIX)}
    model = rebuild_model(spec, widths, shapes, source, trusted)
    try:
        tensors = st_load(raw)
    except (SafetensorError, ValueError) as exc:
        raise _bad(source, str(exc).splitlines()[0][:120]) from None
    load_weights(model, {k: v for k, v in tensors.items() if k in shapes}, source)
    state = CompressionState.from_checkpoint(
        {k: v for k, v in tensors.items() if k not in shapes}, meta.get("compression") or {},
        model, source)
    state.apply(model)
    state.install_hooks(model)
    return Checkpoint(model, spec, data, state, list(history), dict(metrics))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    return int(sum(int((p != 0).sum()) for p in model.parameters()))


def fp32_bytes(model: nn.Module) -> int:
    return 4 * count_params(model)


def check_data_fits(ckpt: Checkpoint, input_shape: tuple[int, ...], num_classes: int,
                    data_spec: str) -> None:
    """Refuse data whose images or classes do not fit the checkpoint's model."""
    if tuple(input_shape) != tuple(ckpt.spec.input_shape):
        raise XaiCompressError(f"--data {data_spec}: images of shape {tuple(input_shape)} do not "
                               f"fit the model, which expects {tuple(ckpt.spec.input_shape)}")
    if num_classes > ckpt.spec.num_classes:
        raise XaiCompressError(f"--data {data_spec}: {num_classes} classes, the model has only "
                               f"{ckpt.spec.num_classes} outputs")
