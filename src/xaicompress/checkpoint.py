"""Checkpoints: one safetensors file, self-describing, never a pickle.

Layout of a checkpoint file (`.safetensors`):
  tensors   the model's state_dict, plus compression tensors under `__xc__/<layer>/<field>`
  metadata  `xaicompress` -> JSON: format version, model spec (registry name or
            `package.module:factory`, constructor kwargs, input shape, classes), the width
            of every Conv/Linear/BatchNorm (so pruned architectures rebuild exactly),
            compression ints, dataset spec, history of stages, metrics.

Loading builds the registered architecture, resizes every layer whose recorded width
differs (structured pruning changed it), loads the tensors strictly and re-applies the
compression state; outputs are bit-identical to the saved model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from xaicompress.atomic import atomic_write_bytes
from xaicompress.errors import XaiCompressError
from xaicompress.models.registry import check_trusted, create_model
from xaicompress.state import CompressionState

FORMAT = "xaicompress-checkpoint"
VERSION = 1
_META_KEY = "xaicompress"


@dataclass
class ModelSpec:
    """How to rebuild the model before loading weights."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        return create_model(self.name, tuple(self.input_shape), self.num_classes, **self.kwargs)


@dataclass
class Checkpoint:
    model: nn.Module
    spec: ModelSpec
    data: str | None = None
    state: CompressionState = field(default_factory=CompressionState)
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def copy(self) -> Checkpoint:
        import copy

        return Checkpoint(copy.deepcopy(self.model), self.spec, self.data, self.state.copy(),
                          copy.deepcopy(self.history), copy.deepcopy(self.metrics))


# --------------------------------------------------------------------- widths
_RESIZABLE = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)


def layer_widths(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per-layer widths (in/out channels or features) of every resizable layer."""
    out: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = {"in": m.in_channels, "out": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.Linear):
            out[name] = {"in": m.in_features, "out": m.out_features}
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            out[name] = {"out": m.num_features}
    return out


def _resized(m: nn.Module, w: dict[str, int]) -> nn.Module:
    if isinstance(m, nn.Conv2d):
        return nn.Conv2d(w["in"], w["out"], m.kernel_size, m.stride, m.padding, m.dilation,
                         w.get("groups", m.groups), m.bias is not None, m.padding_mode)
    if isinstance(m, nn.Linear):
        return nn.Linear(w["in"], w["out"], m.bias is not None)
    if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
        return type(m)(w["out"], m.eps, m.momentum, m.affine, m.track_running_stats)
    raise TypeError(type(m).__name__)


def apply_widths(model: nn.Module, widths: dict[str, dict[str, int]], source: str) -> None:
    """Replace every layer whose width differs from `widths` by one of the recorded width."""
    modules = dict(model.named_modules())
    for name, w in widths.items():
        m = modules.get(name)
        if m is None or not isinstance(m, _RESIZABLE):
            raise XaiCompressError(f"{source}: metadata names layer {name!r} that the model "
                                   "does not have")
        try:
            if layer_widths_of(m) == w:
                continue
            new = _resized(m, w)
        except (KeyError, TypeError, ValueError) as exc:
            raise XaiCompressError(f"{source}: bad width for layer {name!r}: {w}") from exc
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, attr, new)


def layer_widths_of(m: nn.Module) -> dict[str, int]:
    tmp = nn.Module()
    tmp.add_module("m", m)
    return layer_widths(tmp)["m"]


# ---------------------------------------------------------------------- save
def checkpoint_bytes(ckpt: Checkpoint) -> bytes:
    """Serialise to safetensors bytes (what `save_checkpoint` writes)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in ckpt.model.state_dict().items()}
    extra, comp_meta = ckpt.state.to_tensors()
    tensors.update(extra)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": {"name": ckpt.spec.name, "input_shape": list(ckpt.spec.input_shape),
                  "num_classes": ckpt.spec.num_classes, "kwargs": ckpt.spec.kwargs},
        "widths": layer_widths(ckpt.model),
        "compression": comp_meta,
        "data": ckpt.data,
        "history": ckpt.history,
        "metrics": ckpt.metrics,
    }
    return st_save(tensors, metadata={_META_KEY: json.dumps(meta, default=_json_default)})


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike[str]) -> Path:
    """Write atomically; an interrupted save never leaves a partial file."""
    atomic_write_bytes(path, checkpoint_bytes(ckpt))
    return Path(path)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---------------------------------------------------------------------- load
def load_checkpoint(path: str | os.PathLike[str], *, model: str | None = None) -> Checkpoint:
    """Load a checkpoint; any problem is a one-line `XaiCompressError` naming the file.

    model: the model factory the user trusts (`package.module:factory`, as given with
    --model); a checkpoint naming any other unregistered factory is refused unrun.
    """
    p = Path(path)
    if not p.is_file():
        raise XaiCompressError(f"{p}: checkpoint file does not exist")
    raw = p.read_bytes()
    return checkpoint_from_bytes(raw, str(p), model=model)


def checkpoint_from_bytes(raw: bytes, source: str = "checkpoint", *,
                          model: str | None = None) -> Checkpoint:
    looks_safetensors = raw[8:9] == b"{"
    if not looks_safetensors and (raw[:1] == b"\x80" or raw[:2] == b"PK"):
        raise XaiCompressError(f"{source}: is a pickle/torch.save file; refusing to unpickle, "
                               "expected an xaicompress safetensors checkpoint")
    try:
        tensors = st_load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + header_len])
    except (SafetensorError, ValueError, UnicodeDecodeError, OverflowError) as exc:
        raise XaiCompressError(f"{source}: not a valid safetensors checkpoint "
                               f"(truncated or corrupt: {str(exc).splitlines()[0][:120]})") from exc
    meta_raw = (header.get("__metadata__") or {}).get(_META_KEY)
    if meta_raw is None:
        raise XaiCompressError(f"{source}: safetensors file without xaicompress metadata; "
                               "expected a checkpoint written by xaicompress")
    try:
        meta = json.loads(meta_raw)
        if meta.get("format") != FORMAT:
            raise ValueError("format")
        ms = meta["model"]
        spec = ModelSpec(str(ms["name"]), tuple(int(v) for v in ms["input_shape"]),
                         int(ms["num_classes"]), dict(ms.get("kwargs") or {}))
        if len(spec.input_shape) != 3:
            raise ValueError("input_shape")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise XaiCompressError(f"{source}: bad xaicompress metadata ({exc})") from exc
    if int(meta.get("version", 0)) > VERSION:
        raise XaiCompressError(f"{source}: checkpoint format version {meta.get('version')} is "
                               f"newer than this xaicompress (supports {VERSION})")

    check_trusted(spec.name, model, source)
    try:
        net = spec.build()
    except XaiCompressError as exc:
        raise XaiCompressError(f"{source}: cannot rebuild the model it names: {exc}") from exc
    return _load_into(net, spec, meta, tensors, source)


def _load_into(model: nn.Module, spec: ModelSpec, meta: dict[str, Any],
               tensors: dict[str, torch.Tensor], source: str) -> Checkpoint:
    apply_widths(model, meta.get("widths") or {}, source)
    comp = {k: v for k, v in tensors.items() if k.startswith("__xc__/")}
    weights = {k: v for k, v in tensors.items() if not k.startswith("__xc__/")}
    for k, v in weights.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise XaiCompressError(f"{source}: tensor {k!r} contains NaN or Inf values")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise XaiCompressError(f"{source}: tensors do not match model {spec.name!r} "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise XaiCompressError(f"{source}: tensor {k!r} has shape {tuple(v.shape)}, model "
                                   f"{spec.name!r} expects {tuple(expected[k].shape)}")
    model.load_state_dict(weights, strict=True)
    model.eval()
    state = CompressionState.from_tensors(comp, meta.get("compression") or {}, source)
    mods = dict(model.named_modules())
    for name, lc in state.layers.items():
        w = getattr(mods.get(name), "weight", None)
        if w is None:
            raise XaiCompressError(f"{source}: compression state names unknown layer {name!r}")
        for f in ("mask", "indices"):
            t = getattr(lc, f)
            if t is not None and tuple(t.shape) != tuple(w.shape):
                raise XaiCompressError(f"{source}: {name}.{f} has shape {tuple(t.shape)}, "
                                       f"weight is {tuple(w.shape)}")
    state.install_hooks(model)
    return Checkpoint(model, spec, meta.get("data"), state, list(meta.get("history") or []),
                      dict(meta.get("metrics") or {}))


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
