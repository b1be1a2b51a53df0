"""The packed model file: the model as a small-device runtime stores it.

One format for every model the project writes (plain, pruned, shared, quantized):

  magic   b"XCPK" + format version (1 byte) + header length (uint32 little-endian)
  header  zlib-compressed JSON: model spec, the widths that differ from the registered
          architecture (structured pruning), data spec, history, metrics, and the encoding
          of every tensor that is not plain fp32; integer buffers (BatchNorm batch counts)
  payload the model's state_dict tensors sorted by name, each byte-aligned:
          dense    fp32 values (biases, BatchNorm, unconstrained weights)
          sparse   positions (`prune.sparse.encode_positions`) + fp32 kept values
          codebook codebook (fp16 when its values are exactly fp16, else fp32) +
                   positions if pruned + indices of the kept weights at ceil(log2 k) bits
          int      per-output-channel fp32 scales + positions if pruned + q + qmax of the
                   kept weights at b bits (offset binary, q in [-qmax, qmax])

Shapes are not stored: loading rebuilds the architecture from the spec and widths and reads
every tensor at the shape the model expects, then writes the weights a runtime would
reconstruct (`state.effective_weight`), so outputs equal the in-memory model's exactly.
Nothing is ever unpickled; any damage is an XaiCompressError naming the file.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from xaicompress.atomic import atomic_write_bytes
from xaicompress.checkpoint import (
    Checkpoint,
    ModelSpec,
    apply_widths,
    layer_widths,
    load_checkpoint,
)
from xaicompress.errors import XaiCompressError
from xaicompress.models.registry import check_trusted
from xaicompress.quant.packing import index_bits, pack_bits, packed_length, unpack_bits
from xaicompress.state import CompressionState, LayerCompression, effective_weight

MAGIC = b"XCPK"
VERSION = 1
FORMAT = "xaicompress-packed"
_PREFIX = struct.Struct("<4sBI")  # magic, version, header length
_CODEBOOK_NP = {"fp16": np.float16, "fp32": np.float32}


# ----------------------------------------------------------------- positions
def _encode_positions(mask: Tensor) -> tuple[str, bytes]:
    """(kind, payload) of a bool mask's kept positions, by the sparse-format module."""
    try:
        from xaicompress.prune.sparse import encode_positions
    except ImportError:
        return "bitmap", np.packbits(mask.reshape(-1).numpy().astype(np.uint8),
                                     bitorder="little").tobytes()
    kind, payload = encode_positions(mask)
    return str(kind), bytes(payload)


def _decode_positions(kind: str, payload: bytes, numel: int) -> np.ndarray:
    """Flat bool (numel,) mask from `_encode_positions` output."""
    try:
        from xaicompress.prune.sparse import decode_positions
    except ImportError:
        decode_positions = None
    if decode_positions is not None:
        out = decode_positions(kind, payload, numel)
        arr = out.numpy() if isinstance(out, Tensor) else np.asarray(out)
        if arr.dtype == bool:
            return arr.reshape(-1)
        mask = np.zeros(numel, dtype=bool)  # integer positions of the kept weights
        mask[arr.reshape(-1).astype(np.int64)] = True
        return mask
    if kind != "bitmap":
        raise XaiCompressError(f"unknown position encoding {kind!r}")
    if len(payload) != packed_length(numel, 1):
        raise XaiCompressError(f"bitmap of {len(payload)} bytes for {numel} weights")
    return np.unpackbits(np.frombuffer(payload, np.uint8), count=numel,
                         bitorder="little").astype(bool)


# ---------------------------------------------------------------------- write
@dataclass
class PackedSize:
    """What a packed file is made of, in bytes (theoretical = exact payload bits / 8)."""

    file_bytes: int = 0
    header_bytes: int = 0
    payload_bytes: int = 0
    theoretical_bits: int = 0
    parts_bits: dict[str, int] = field(default_factory=dict)

    @property
    def theoretical_bytes(self) -> float:
        return self.theoretical_bits / 8

    @property
    def payload_overhead(self) -> float:
        """Payload bytes over the theoretical bit count (byte alignment), as a fraction."""
        return self.payload_bytes / max(self.theoretical_bytes, 1e-9) - 1

    @property
    def file_overhead(self) -> float:
        """Whole file (header included) over the theoretical bit count, as a fraction."""
        return self.file_bytes / max(self.theoretical_bytes, 1e-9) - 1

    def as_dict(self) -> dict[str, Any]:
        return {"file_bytes": self.file_bytes, "header_bytes": self.header_bytes,
                "payload_bytes": self.payload_bytes,
                "theoretical_bytes": self.theoretical_bytes,
                "payload_overhead": self.payload_overhead, "file_overhead": self.file_overhead,
                "parts_bits": dict(self.parts_bits)}


def _float_bytes(t: Tensor) -> bytes:
    return t.detach().to(torch.float32).contiguous().reshape(-1).numpy().tobytes()


def _pack(ckpt: Checkpoint) -> tuple[bytes, PackedSize]:
    model = ckpt.model
    sd = model.state_dict()
    weight_of = {f"{n}.weight": n for n in ckpt.state.layers}
    encodings: dict[str, dict[str, Any]] = {}
    ints: dict[str, list[int]] = {}
    chunks: list[bytes] = []
    size = PackedSize()
    parts = {"dense": 0, "values": 0, "indices": 0, "codebooks": 0, "scales": 0,
             "positions": 0}

    def emit(part: str, data: bytes, bits: int) -> None:
        chunks.append(data)
        parts[part] += bits

    # Sorted keys: parametrisations (codebook fine-tuning) re-register a weight after its
    # bias, so the state_dict order of equal models can differ.
    for key in sorted(sd):
        t = sd[key].detach().cpu()
        if not t.is_floating_point():
            ints[key] = [int(v) for v in t.reshape(-1).tolist()]
            continue
        lc = ckpt.state.layers.get(weight_of[key]) if key in weight_of else None
        if lc is None or lc.is_empty() or (lc.mask is None and lc.codebook is None
                                           and lc.bits is None):
            emit("dense", _float_bytes(t), 32 * t.numel())
            continue
        enc: dict[str, Any] = {}
        keep = (lc.mask.reshape(-1).bool() if lc.mask is not None
                else torch.ones(t.numel(), dtype=torch.bool))
        nkeep = int(keep.sum())
        if lc.codebook is not None and lc.indices is not None:
            from xaicompress.quant.codebook import codebook_dtype_of

            cdt = codebook_dtype_of(lc.codebook)
            k = int(lc.codebook.numel())
            enc.update(e="cb", k=k, cd=cdt)
            emit("codebooks", lc.codebook.numpy().astype(_CODEBOOK_NP[cdt]).tobytes(),
                 k * (16 if cdt == "fp16" else 32))
            _emit_positions(lc, keep, enc, emit)
            b = index_bits(k)
            idx = lc.indices.reshape(-1)[keep].numpy()
            if b:
                emit("indices", pack_bits(idx, b), b * nkeep)
        elif lc.bits is not None and lc.scale is not None:
            b = int(lc.bits)
            qmax = 2 ** (b - 1) - 1
            s = lc.scale.detach().float().reshape(-1)
            enc.update(e="int", b=b)
            emit("scales", _float_bytes(s), 32 * s.numel())
            _emit_positions(lc, keep, enc, emit)
            sb = s.reshape(-1, *([1] * (t.dim() - 1)))
            q = torch.clamp(torch.round(t.float() / sb), -qmax, qmax).to(torch.int64)
            emit("values", pack_bits((q.reshape(-1)[keep] + qmax).numpy(), b), b * nkeep)
        else:
            enc.update(e="sparse")
            _emit_positions(lc, keep, enc, emit)
            emit("values", _float_bytes(t.reshape(-1)[keep]), 32 * nkeep)
        encodings[key] = enc

    state_meta: dict[str, dict[str, Any]] = {}
    for name, lc in ckpt.state.layers.items():
        if lc.act_bits is not None or lc.act_scale is not None:
            state_meta[name] = {"ab": lc.act_bits}
            if lc.act_scale is not None:
                state_meta[name]["as"] = [float(v) for v in lc.act_scale.float().reshape(-1)]
                state_meta[name]["ass"] = list(lc.act_scale.shape)
        if lc.codebook is not None and lc.bits is not None:
            state_meta.setdefault(name, {})["cbits"] = lc.bits  # kept for the record only
    default_widths = layer_widths(ckpt.spec.build())
    widths = {n: w for n, w in layer_widths(model).items() if default_widths.get(n) != w}
    header = {
        "format": FORMAT,
        "model": {"name": ckpt.spec.name, "input_shape": list(ckpt.spec.input_shape),
                  "num_classes": ckpt.spec.num_classes, "kwargs": ckpt.spec.kwargs},
        "widths": widths, "data": ckpt.data, "t": encodings, "ints": ints,
        "state": state_meta, "history": ckpt.history, "metrics": ckpt.metrics,
    }
    from xaicompress.checkpoint import _json_default

    hdr = zlib.compress(json.dumps(header, separators=(",", ":"),
                                   default=_json_default).encode(), 9)
    payload = b"".join(chunks)
    raw = _PREFIX.pack(MAGIC, VERSION, len(hdr)) + hdr + payload
    size.file_bytes = len(raw)
    size.header_bytes = _PREFIX.size + len(hdr)
    size.payload_bytes = len(payload)
    size.parts_bits = parts
    size.theoretical_bits = sum(parts.values())
    return raw, size


def _emit_positions(lc: LayerCompression, keep: Tensor, enc: dict[str, Any], emit: Any) -> None:
    if lc.mask is None:
        return
    if bool(keep.all()):
        enc["p"] = "all"  # a mask with nothing pruned: no positions to store
        return
    kind, payload = _encode_positions(lc.mask.bool())
    enc["p"], enc["pl"] = kind, len(payload)
    emit("positions", payload, 8 * len(payload))


def packed_bytes(ckpt: Checkpoint) -> bytes:
    """The packed file's bytes (what `write_packed` writes and `evaluate` counts)."""
    return _pack(ckpt)[0]


def packed_report(ckpt: Checkpoint) -> PackedSize:
    """Sizes of the packed file: total, header, payload and the theoretical bit count."""
    return _pack(ckpt)[1]


def write_packed(ckpt: Checkpoint, path: str | os.PathLike[str]) -> Path:
    """Write the packed file atomically."""
    atomic_write_bytes(path, packed_bytes(ckpt))
    return Path(path)


# ----------------------------------------------------------------------- read
class _Reader:
    def __init__(self, data: bytes, pos: int, source: str):
        self.data, self.pos, self.source = data, pos, source

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise XaiCompressError(f"{self.source}: packed file is truncated (reading {what})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def floats(self, n: int, what: str, dtype: type = np.float32) -> Tensor:
        raw = self.take(n * np.dtype(dtype).itemsize, what)
        arr = np.frombuffer(raw, dtype=dtype).astype(np.float32)
        if not np.isfinite(arr).all():
            raise XaiCompressError(f"{self.source}: {what} contains NaN or Inf values")
        return torch.from_numpy(arr.copy())


def is_packed(path: str | os.PathLike[str]) -> bool:
    """Whether the file starts with the packed-file magic bytes."""
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def load_packed(path: str | os.PathLike[str], *, model: str | None = None) -> Checkpoint:
    """Load a packed file into a Checkpoint (model in eval mode, compression state restored).

    model: the user's trusted factory, as for `load_checkpoint`."""
    p = Path(path)
    if not p.is_file():
        raise XaiCompressError(f"{p}: packed model file does not exist")
    return packed_from_bytes(p.read_bytes(), str(p), model=model)


def load_any(path: str | os.PathLike[str], *, model: str | None = None) -> Checkpoint:
    """Load a packed file or a safetensors checkpoint, told apart by the magic bytes."""
    p = Path(path)
    if p.is_file() and is_packed(p):
        return load_packed(p, model=model)
    return load_checkpoint(p, model=model)


def packed_from_bytes(raw: bytes, source: str = "packed file", *,
                      model: str | None = None) -> Checkpoint:
    if len(raw) < _PREFIX.size or raw[:len(MAGIC)] != MAGIC:
        raise XaiCompressError(f"{source}: not an xaicompress packed model file (expected it "
                               f"to start with {MAGIC!r})")
    _, version, hlen = _PREFIX.unpack_from(raw)
    if version > VERSION:
        raise XaiCompressError(f"{source}: packed format version {version} is newer than this "
                               f"xaicompress (supports {VERSION})")
    reader = _Reader(raw, _PREFIX.size, source)
    try:
        header = json.loads(zlib.decompress(reader.take(hlen, "header")))
        if header.get("format") != FORMAT:
            raise ValueError("format")
        ms = header["model"]
        spec = ModelSpec(str(ms["name"]), tuple(int(v) for v in ms["input_shape"]),
                         int(ms["num_classes"]), dict(ms.get("kwargs") or {}))
        if len(spec.input_shape) != 3:
            raise ValueError("input_shape")
        encodings = dict(header.get("t") or {})
        ints = dict(header.get("ints") or {})
    except (zlib.error, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise XaiCompressError(f"{source}: corrupt packed file header ({exc})") from exc
    check_trusted(spec.name, model, source)
    try:
        net = spec.build()
    except XaiCompressError as exc:
        raise XaiCompressError(f"{source}: {exc}") from exc
    return _read_into(net, spec, header, reader, encodings, ints, raw, source)


def _read_into(model: nn.Module, spec: ModelSpec, header: dict[str, Any], reader: _Reader,
               encodings: dict[str, Any], ints: dict[str, Any], raw: bytes,
               source: str) -> Checkpoint:
    apply_widths(model, header.get("widths") or {}, source)
    try:
        state, tensors = _read_tensors(model, reader, encodings, ints, header, source)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise XaiCompressError(f"{source}: corrupt packed file ({type(exc).__name__}: "
                               f"{exc})") from exc
    if reader.pos != len(raw):
        raise XaiCompressError(f"{source}: {len(raw) - reader.pos} unexpected bytes after the "
                               "last tensor (corrupt packed file)")
    model.load_state_dict(tensors, strict=True)
    model.eval()
    state.install_hooks(model)
    return Checkpoint(model, spec, header.get("data"), state,
                      list(header.get("history") or []), dict(header.get("metrics") or {}))


def _read_tensors(model: nn.Module, reader: _Reader, encodings: dict[str, Any],
                  ints: dict[str, Any], header: dict[str, Any], source: str
                  ) -> tuple[CompressionState, dict[str, Tensor]]:
    state = CompressionState()
    tensors: dict[str, Tensor] = {}
    expected = model.state_dict()
    unknown = sorted((set(encodings) | set(ints)) - set(expected))
    if unknown:
        raise XaiCompressError(f"{source}: packed file names tensors {unknown[:3]} that model "
                               f"{header['model']['name']!r} does not have")
    for key in sorted(expected):
        ref = expected[key]
        shape, n = tuple(ref.shape), ref.numel()
        if not ref.is_floating_point():
            vals = ints.get(key)
            if vals is None or len(vals) != n:
                raise XaiCompressError(f"{source}: integer tensor {key!r} missing or of wrong "
                                       "size")
            tensors[key] = torch.tensor(vals, dtype=ref.dtype).reshape(shape)
            continue
        enc = encodings.get(key)
        if enc is None:
            tensors[key] = reader.floats(n, key).reshape(shape).to(ref.dtype)
            continue
        layer = key[:-len(".weight")] if key.endswith(".weight") else None
        if layer is None:
            raise XaiCompressError(f"{source}: tensor {key!r} is not a layer weight")
        lc = state.get(layer)
        kind = enc["e"]
        if kind == "cb":
            k = int(enc["k"])
            if not 1 <= k <= 1 << 16 or enc["cd"] not in _CODEBOOK_NP:
                raise ValueError(f"codebook of {key!r}")
            lc.codebook = reader.floats(k, f"{key} codebook", _CODEBOOK_NP[enc["cd"]])
            keep = _read_mask(reader, enc, n, key, lc, shape)
            b = index_bits(k)
            nkeep = int(keep.sum())
            idx = (unpack_bits(reader.take(packed_length(nkeep, b), f"{key} indices"), b, nkeep)
                   if b else np.zeros(nkeep, dtype=np.int64))
            if nkeep and int(idx.max()) >= k:
                raise XaiCompressError(f"{source}: {key} has a codebook index out of range")
            full = np.zeros(n, dtype=np.int64)
            full[keep] = idx
            lc.indices = torch.from_numpy(full).reshape(shape)
            tensors[key] = effective_weight(torch.zeros(shape), lc).to(ref.dtype)
        elif kind == "int":
            b = int(enc["b"])
            if not 1 <= b <= 16:
                raise ValueError(f"bits of {key!r}")
            lc.bits = b
            lc.scale = reader.floats(shape[0], f"{key} scales")
            keep = _read_mask(reader, enc, n, key, lc, shape)
            nkeep = int(keep.sum())
            qmax = 2 ** (b - 1) - 1
            q = unpack_bits(reader.take(packed_length(nkeep, b), f"{key} values"), b, nkeep)
            if nkeep and int(q.max()) > 2 * qmax:
                raise XaiCompressError(f"{source}: {key} has an integer value out of range")
            full = np.zeros(n, dtype=np.float32)
            full[keep] = (q - qmax).astype(np.float32)
            s = lc.scale.reshape(-1, *([1] * (len(shape) - 1)))
            w = torch.from_numpy(full).reshape(shape) * s
            tensors[key] = effective_weight(w, lc).to(ref.dtype)
        elif kind == "sparse":
            keep = _read_mask(reader, enc, n, key, lc, shape)
            vals = reader.floats(int(keep.sum()), f"{key} values")
            full = torch.zeros(n)
            full[torch.from_numpy(keep)] = vals
            tensors[key] = full.reshape(shape).to(ref.dtype)
        else:
            raise XaiCompressError(f"{source}: unknown encoding {kind!r} of tensor {key!r}")
    for name, extra in (header.get("state") or {}).items():
        if name not in dict(model.named_modules()):
            raise XaiCompressError(f"{source}: state names unknown layer {name!r}")
        lc = state.get(name)
        if extra.get("ab") is not None:
            lc.act_bits = int(extra["ab"])
        if extra.get("as") is not None:
            lc.act_scale = torch.tensor(extra["as"], dtype=torch.float32).reshape(
                [int(v) for v in extra.get("ass", [-1])])
        if extra.get("cbits") is not None:
            lc.bits = int(extra["cbits"])
    return state, tensors


def _read_mask(reader: _Reader, enc: dict[str, Any], n: int, key: str, lc: LayerCompression,
               shape: tuple[int, ...]) -> np.ndarray:
    """Flat bool (n,) kept positions; sets lc.mask when the layer was pruned."""
    p = enc.get("p")
    if p is None:
        return np.ones(n, dtype=bool)
    if p == "all":
        keep = np.ones(n, dtype=bool)
    else:
        payload = reader.take(int(enc["pl"]), f"{key} positions")
        try:
            keep = _decode_positions(str(p), payload, n)
        except XaiCompressError as exc:
            raise XaiCompressError(f"{reader.source}: {key} positions: {exc}") from exc
        if keep.size != n:
            raise XaiCompressError(f"{reader.source}: {key} positions decode to {keep.size} "
                                   f"entries, the weight has {n}")
    lc.mask = torch.from_numpy(keep.copy()).reshape(shape)
    return keep
