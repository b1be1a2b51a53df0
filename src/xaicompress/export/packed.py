"""The packed model file (`.xcpk`): the model as a small-device runtime stores it.

One format for every model the project writes (plain, pruned, shared, quantized), specified
byte by byte in `docs/format.md`:

  prefix   b"XCPK", format version 3 (1 byte; version 2 is read too), header length
           (uint32 little-endian)
  header   zlib-compressed JSON: model spec, the widths that differ from the registered
           architecture (structured pruning), data spec, every tensor's shape, encoding and
           streams (role, coding, byte length), and the quantized activations
  payload  the streams of every tensor, tensors sorted by name, each stream byte-aligned
  trailer  CRC-32 of every byte before it (uint32 little-endian)

No run bookkeeping (history, metrics) goes in: the file's size depends on the model alone.
The bytes of each tensor are written and read by its encoding (`encoding.LayerEncoding.pack`
/ `unpack`, which dispatch to `Mask`, `Codebook`, `IntGrid` or `Dense`); this module only
assembles them. Reading checks the container first (`xcpk_reader.parse_container`: sizes
against the file and the caps, CRC, bounded inflate, header schema), then refuses model
factories the user did not name, compares every shape with the architecture built on the
meta device, and decodes. Writing verifies the file loads back to the same outputs before
it is renamed into place.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xaicompress.atomic import atomic_write_bytes
from xaicompress.checkpoint import (
    Checkpoint,
    ModelSpec,
    Trusted,
    check_finite_model,
    check_widths,
    layer_widths,
    load_checkpoint,
    rebuild_model,
    spec_for,
    verify_reload,
)
from xaicompress.encoding import ActQuant, CompressionState, LayerEncoding
from xaicompress.encoding.streams import Stream, Streams
from xaicompress.errors import XaiCompressError
from xaicompress.export.xcpk_reader import (
    MAGIC,
    MAX_FILE_BYTES,
    PREFIX,
    TRAILER,
    VERSION,
    Container,
    XcpkError,
    compress_header,
    parse_container,
)

__all__ = ["MAGIC", "VERSION", "PackedSize", "is_packed", "load_any", "load_packed",
           "packed_bytes", "packed_from_bytes", "packed_report", "write_packed"]


@dataclass
class PackedSize:
    """What a packed file is made of, in bytes (theoretical = exact payload bits / 8).

    parts_bits: exact bits by stream role ("values", "positions", "codebook", "indices",
    "scales") and "dense" for tensors that no layer encoding covers (biases, norms); a
    range-coded stream counts its whole bytes. tensor_bits: the same per tensor
    (state_dict name)."""

    file_bytes: int = 0
    header_bytes: int = 0
    payload_bytes: int = 0
    theoretical_bits: int = 0
    parts_bits: dict[str, int] = field(default_factory=dict)
    tensor_bits: dict[str, int] = field(default_factory=dict)

    @property
    def theoretical_bytes(self) -> float:
        return self.theoretical_bits / 8

    @property
    def payload_overhead(self) -> float:
        """Payload bytes over the theoretical bit count (byte alignment), as a fraction."""
        return self.payload_bytes / max(self.theoretical_bytes, 1e-9) - 1

    @property
    def file_overhead(self) -> float:
        """Whole file (header and checksum included) over the theoretical bit count."""
        return self.file_bytes / max(self.theoretical_bytes, 1e-9) - 1

    def as_dict(self) -> dict[str, Any]:
        return {"file_bytes": self.file_bytes, "header_bytes": self.header_bytes,
                "payload_bytes": self.payload_bytes,
                "theoretical_bytes": self.theoretical_bytes,
                "payload_overhead": self.payload_overhead, "file_overhead": self.file_overhead,
                "parts_bits": dict(self.parts_bits), "tensor_bits": dict(self.tensor_bits)}


# ---------------------------------------------------------------------- write
def _changed_widths(ckpt: Checkpoint) -> dict[str, dict[str, int]]:
    """Widths that differ from the registered architecture (built on the meta device, so
    measuring the file allocates no second model)."""
    try:
        with torch.device("meta"):
            default = layer_widths(ckpt.spec.build())
    except XaiCompressError:  # a user factory that cannot run on the meta device
        default = layer_widths(ckpt.spec.build())
    return {n: w for n, w in layer_widths(ckpt.model).items() if default.get(n) != w}


def _tensor_records(ckpt: Checkpoint
                    ) -> tuple[dict[str, Any], list[Stream], dict[str, int], dict[str, int]]:
    """Header records, streams in payload order, exact bits per part and per tensor."""
    sd = ckpt.model.state_dict()
    encoded = {f"{n}.weight": lc for n, lc in ckpt.state.layers.items()
               if lc.mask is not None or lc.weights is not None}
    records: dict[str, Any] = {}
    streams: list[Stream] = []
    parts: dict[str, int] = {}
    per_tensor: dict[str, int] = {}
    plain = LayerEncoding()
    # Sorted keys: parametrisations (codebook fine-tuning) re-register a weight after its
    # bias, so the state_dict order of equal models can differ.
    for key in sorted(sd):
        t = sd[key].detach().cpu()
        lc = encoded.get(key, plain)
        fields, ts = lc.pack(t)
        records[key] = {"shape": list(t.shape), **fields, "streams": [s.record() for s in ts]}
        for s in ts:
            part = s.role if lc is not plain else "dense"
            parts[part] = parts.get(part, 0) + s.bits
        streams += ts
        per_tensor[key] = sum(s.bits for s in ts)
    return records, streams, parts, per_tensor


def _pack(ckpt: Checkpoint) -> tuple[bytes, PackedSize]:
    records, streams, parts, per_tensor = _tensor_records(ckpt)
    header = {"model": ckpt.spec.to_meta(), "widths": _changed_widths(ckpt),
              "data": ckpt.data, "tensors": records,
              "activations": {n: aq.header() for n, aq in ckpt.state.activations().items()}}
    hdr = compress_header(json.dumps(header, separators=(",", ":")).encode("utf-8"))
    payload = b"".join(s.data for s in streams)
    body = PREFIX.pack(MAGIC, VERSION, len(hdr)) + hdr + payload
    raw = body + TRAILER.pack(zlib.crc32(body))
    size = PackedSize(len(raw), PREFIX.size + len(hdr), len(payload), sum(parts.values()),
                      parts, per_tensor)
    return raw, size


def packed_bytes(ckpt: Checkpoint) -> bytes:
    """The packed file's bytes (what `write_packed` writes)."""
    return _pack(ckpt)[0]


def packed_report(ckpt: Checkpoint) -> PackedSize:
    """Sizes of the packed file: total, header, payload and the theoretical bit count. The
    one size computation: `evaluate`'s size_bytes and the quantizer's size budget use it."""
    return _pack(ckpt)[1]


def write_packed(ckpt: Checkpoint, path: str | os.PathLike[str]) -> Path:
    """Write the packed file atomically, after verifying it loads back to the same outputs."""
    check_finite_model(ckpt, path)
    atomic_write_bytes(path, packed_bytes(ckpt), verify=verify_reload(
        ckpt, lambda tmp: load_packed(tmp, model=ckpt.spec.loader_model), path))
    return Path(path)


# ----------------------------------------------------------------------- read
def is_packed(path: str | os.PathLike[str]) -> bool:
    """Whether the file starts with the packed-file magic bytes."""
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def load_packed(path: str | os.PathLike[str], *, model: Trusted = None) -> Checkpoint:
    """Load a packed file into a Checkpoint (model in eval mode, compression state restored;
    no history or metrics: the file has none).

    model: the user's trusted factory, as for `load_checkpoint`."""
    p = Path(path)
    if not p.is_file():
        raise XaiCompressError(f"{p}: packed model file does not exist")
    size = p.stat().st_size
    if size > MAX_FILE_BYTES:
        raise XaiCompressError(f"{p}: {size} bytes, more than the {MAX_FILE_BYTES}-byte cap "
                               "of a packed file")
    return packed_from_bytes(p.read_bytes(), str(p), model=model)


def load_any(path: str | os.PathLike[str], *, model: Trusted = None) -> Checkpoint:
    """Load a packed file or a safetensors checkpoint, told apart by the magic bytes."""
    p = Path(path)
    if p.is_file() and is_packed(p):
        return load_packed(p, model=model)
    return load_checkpoint(p, model=model)


def packed_from_bytes(raw: bytes, source: str = "packed file", *,
                      model: Trusted = None) -> Checkpoint:
    try:
        container = parse_container(raw, source)
    except XcpkError as exc:
        raise XaiCompressError(str(exc)) from None
    h = container.header
    spec, model = spec_for(ModelSpec.from_meta(h["model"], source), model)
    widths = check_widths(h.get("widths"), source)
    data = h.get("data")
    if data is not None and not isinstance(data, str):
        raise XaiCompressError(f"{source}: data spec must be a string")
    shapes = {r.name: r.shape for r in container.records}
    net = rebuild_model(spec, widths, shapes, source, model)
    state = _decode_into(net, container, source)
    state.install_hooks(net)
    return Checkpoint(net, spec, data, state)


def _decode_into(net: nn.Module, container: Container, source: str) -> CompressionState:
    """Decode every tensor into `net` (shapes already checked) and return the state."""
    expected = net.state_dict()
    layer_of = {f"{n}.weight": n for n, m in net.named_modules()
                if isinstance(getattr(m, "weight", None), Tensor)}
    state = CompressionState()
    tensors: dict[str, Tensor] = {}
    for rec in container.records:
        where = f"{source}: tensor {rec.name!r}"
        lc, tensors[rec.name] = LayerEncoding.unpack(rec.fields, Streams(rec.streams, where),
                                                     rec.shape, expected[rec.name].dtype)
        if lc.is_empty():
            continue
        if rec.name not in layer_of or not expected[rec.name].is_floating_point():
            raise XaiCompressError(f"{where}: only layer weights can be encoded, not "
                                   "stored dense")
        state.layers[layer_of[rec.name]] = lc
    acts = container.header.get("activations") or {}
    if not isinstance(acts, dict):
        raise XaiCompressError(f"{source}: activations must be an object")
    for name, entry in acts.items():
        if f"{name}.weight" not in layer_of:
            raise XaiCompressError(f"{source}: activations name layer {name[:100]!r} that the "
                                   "model does not have")
        state.get(name).activation = ActQuant.from_header(entry, f"{source}: layer {name!r}")
    state.validate(net, source)
    net.load_state_dict(tensors, strict=True)
    net.eval()
    return state
