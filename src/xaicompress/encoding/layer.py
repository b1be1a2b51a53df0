"""A layer's compression (`LayerEncoding`) and the whole model's (`CompressionState`).

A layer's weight is an optional `Mask` (which weights are kept) plus at most one weight
encoding, `Codebook` (shared values) or `IntGrid` (integers per channel), None meaning
plain float32 values; independently, its input activations may be quantized (`ActQuant`).

The in-memory model always holds the *effective* float weights (pruned = 0, shared = its
centroid, quantized = scale * q); the state keeps what is needed to re-impose them while
fine-tuning (`apply`) and to store the weights as a runtime would (`pack` / `unpack`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from xaicompress.encoding.activation import ActQuant, install_activation_quant
from xaicompress.encoding.codebook import Codebook
from xaicompress.encoding.dense import DENSE, Dense
from xaicompress.encoding.intgrid import IntGrid
from xaicompress.encoding.mask import Mask
from xaicompress.encoding.streams import Stream, Streams
from xaicompress.errors import XaiCompressError
from xaicompress.export.xcpk_reader import ZERO_CLUSTER

WeightEncoding = Codebook | IntGrid
#: weight encodings by the name the packed header gives them ("encoding" of a tensor)
WEIGHT_ENCODINGS: dict[str, type[Dense] | type[Codebook] | type[IntGrid]] = {
    Dense.kind: Dense, Codebook.kind: Codebook, IntGrid.kind: IntGrid}
#: checkpoint field -> the class that owns it (each field name belongs to one class)
_FIELD_OWNER: dict[str, type] = {f: cls for cls in (Mask, Codebook, IntGrid, ActQuant)
                                 for f in (*cls.TENSORS, *cls.META)}
CHECKPOINT_TENSORS = tuple(f for cls in (Mask, Codebook, IntGrid, ActQuant) for f in cls.TENSORS)
CHECKPOINT_META = tuple(f for cls in (Mask, Codebook, IntGrid, ActQuant) for f in cls.META)


@dataclass
class LayerEncoding:
    """The compression of one layer (keyed by module name in `CompressionState`)."""

    mask: Mask | None = None
    weights: WeightEncoding | None = None
    activation: ActQuant | None = None

    @property
    def codebook(self) -> Codebook | None:
        return self.weights if isinstance(self.weights, Codebook) else None

    @property
    def grid(self) -> IntGrid | None:
        return self.weights if isinstance(self.weights, IntGrid) else None

    @property
    def value_bits(self) -> int:
        """Bits per stored weight value (32 for plain float32)."""
        return (self.weights or DENSE).value_bits

    def is_empty(self) -> bool:
        return self.mask is None and self.weights is None and self.activation is None

    def copy(self) -> LayerEncoding:
        return LayerEncoding(*(None if p is None else p.copy()
                               for p in (self.mask, self.weights, self.activation)))

    def effective(self, w: Tensor) -> Tensor:
        """The float weight a runtime reconstructs (w used where the encoding is silent)."""
        out = self.weights.effective(w) if self.weights is not None else w
        return self.mask.apply(out) if self.mask is not None else out

    def validate(self, shape: tuple[int, ...], where: str) -> None:
        for part in (self.mask, self.weights):
            if part is not None:
                part.validate(shape, where)
        if self.activation is not None:
            self.activation.validate(where)

    # ---------------------------------------------------------------- packed file
    def pack(self, w: Tensor) -> tuple[dict[str, Any], list[Stream]]:
        """(header fields, streams) of weight `w` (the effective weight) under this encoding.

        A masked codebook whose pruned weights are exactly its zero cluster may be stored
        without positions (coding "zerocluster": every weight's index, the mask implied);
        the smaller of the two layouts is written."""
        codec = self.weights or DENSE
        keep = self.mask.keep.reshape(-1) if self.mask is not None else None
        params, streams = codec.encode(w, keep)
        fields: dict[str, Any] = {"encoding": codec.kind, **params}
        if self.mask is None:
            return fields, streams
        fields["masked"] = True
        streams = self.mask.encode() + streams
        if self._mask_is_zero_cluster():
            _, whole = codec.encode(w, None)
            whole = [Stream("positions", ZERO_CLUSTER, b"", 0), *whole]
            if sum(len(s.data) for s in whole) < sum(len(s.data) for s in streams):
                streams = whole
        return fields, streams

    def _mask_is_zero_cluster(self) -> bool:
        """Whether the mask is exactly 'index != the codebook's zero entry'."""
        cb = self.codebook
        if cb is None or self.mask is None or bool(self.mask.keep.all()):
            return False
        z = cb.zero_entry()
        return z is not None and bool(torch.equal(cb.indices != z, self.mask.keep))

    @classmethod
    def unpack(cls, fields: dict[str, Any], streams: Streams, shape: tuple[int, ...],
               dtype: torch.dtype) -> tuple[LayerEncoding, Tensor]:
        """Inverse of `pack`: the layer's encoding (its weight part) and effective weight."""
        where = streams.where
        kind = fields.get("encoding")
        codec = WEIGHT_ENCODINGS.get(kind) if isinstance(kind, str) else None
        if codec is None:
            raise XaiCompressError(f"{where}: unknown encoding {kind!r}, expected one of "
                                   f"{', '.join(WEIGHT_ENCODINGS)}")
        unknown = sorted(set(fields) - {"shape", "encoding", "streams", "masked", *codec.PARAMS})
        if unknown:
            raise XaiCompressError(f"{where}: {kind} encoding has no field {unknown[0]!r}")
        masked = fields.get("masked", False)
        if not isinstance(masked, bool):
            raise XaiCompressError(f"{where}: masked is {masked!r}, expected true or false")
        if masked and codec is Codebook and streams.has("positions") and \
                streams.coding("positions") == ZERO_CLUSTER:
            return cls._unpack_zero_cluster(fields, streams, shape, dtype)
        mask = Mask.decode(streams, shape) if masked else None
        keep = mask.keep.reshape(-1) if mask is not None else None
        weights, w = codec.decode(fields, streams, shape, keep, dtype)
        streams.done()
        return cls(mask, weights), mask.apply(w) if mask is not None else w

    @classmethod
    def _unpack_zero_cluster(cls, fields: dict[str, Any], streams: Streams,
                             shape: tuple[int, ...], dtype: torch.dtype
                             ) -> tuple[LayerEncoding, Tensor]:
        """A codebook stored with every index; kept = index is not the zero entry."""
        _, data = streams.take("positions", (ZERO_CLUSTER,))
        if data:
            raise XaiCompressError(f"{streams.where}: a {ZERO_CLUSTER} positions stream holds "
                                   "no bytes")
        cb, w = Codebook.decode(fields, streams, shape, None, dtype)
        streams.done()
        z = cb.zero_entry()
        if z is None:
            raise XaiCompressError(f"{streams.where}: positions coded as the zero cluster, but "
                                   "no codebook entry is 0")
        mask = Mask(cb.indices != z)
        return cls(mask, cb), mask.apply(w)

    # ----------------------------------------------------------------- checkpoint
    def to_checkpoint(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors: dict[str, Tensor] = {}
        meta: dict[str, Any] = {}
        for part in (self.mask, self.weights, self.activation):
            if part is not None:
                t, m = part.to_checkpoint()
                tensors.update(t)
                meta.update(m)
        return tensors, meta

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, Tensor], meta: dict[str, Any],
                        shape: tuple[int, ...], where: str) -> LayerEncoding:
        owners: dict[type, None] = {}
        for f in (*tensors, *meta):
            if f not in _FIELD_OWNER:
                raise XaiCompressError(f"{where}: unknown compression field {f!r}")
            owners[_FIELD_OWNER[f]] = None
        if Codebook in owners and IntGrid in owners:
            raise XaiCompressError(f"{where}: has both a codebook and an integer grid; a layer "
                                   "has at most one weight encoding")
        parts = {c: c.from_checkpoint(tensors, meta, shape, where) for c in owners}
        weights = parts.get(Codebook) or parts.get(IntGrid)
        return cls(parts.get(Mask), weights, parts.get(ActQuant))


@dataclass
class CompressionState:
    """Layer name -> its `LayerEncoding`."""

    layers: dict[str, LayerEncoding] = field(default_factory=dict)

    def get(self, name: str) -> LayerEncoding:
        """The entry for module `name`, created empty if absent."""
        return self.layers.setdefault(name, LayerEncoding())

    def __contains__(self, name: str) -> bool:
        return name in self.layers and not self.layers[name].is_empty()

    def items(self) -> Iterator[tuple[str, LayerEncoding]]:
        """(name, encoding) of every non-empty layer."""
        return ((n, lc) for n, lc in self.layers.items() if not lc.is_empty())

    def copy(self) -> CompressionState:
        return CompressionState({n: lc.copy() for n, lc in self.layers.items()})

    def any(self, kind: type) -> bool:
        """Whether some layer has a part of `kind` (Mask, Codebook, IntGrid or ActQuant)."""
        return any(isinstance(p, kind) for lc in self.layers.values()
                   for p in (lc.mask, lc.weights, lc.activation))

    def activations(self) -> dict[str, ActQuant]:
        return {n: lc.activation for n, lc in self.layers.items() if lc.activation is not None}

    def install_hooks(self, model: nn.Module) -> None:
        """(Re-)create what lives in forward hooks rather than weights (quantized
        activations) on `model`; hooks of an earlier state are removed. Every loader calls
        this."""
        install_activation_quant(model, self.activations())

    def validate(self, model: nn.Module, source: str) -> None:
        """Every layer exists, has a weight, and its encoding fits it."""
        modules = dict(model.named_modules())
        for name, lc in self.items():
            w = getattr(modules.get(name), "weight", None)
            if not isinstance(w, Tensor):
                raise XaiCompressError(f"{source}: compression state names layer {name!r}, "
                                       "which the model does not have (or has no weight)")
            lc.validate(tuple(w.shape), f"{source}: layer {name!r}")

    def apply(self, model: nn.Module) -> None:
        """Write the effective weights implied by the state into `model`, in place."""
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, lc in self.items():
                if lc.mask is None and lc.weights is None:
                    continue
                w = getattr(modules.get(name), "weight", None)
                if not isinstance(w, Tensor):
                    raise XaiCompressError(f"compression state names unknown layer {name!r}")
                w.copy_(lc.effective(w.detach()))

    # ----------------------------------------------------------------- checkpoint
    PREFIX = "__xc__"

    def to_checkpoint(self) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
        """Tensors under "__xc__/<layer>/<field>" and JSON metadata <layer> -> {field: int}."""
        tensors: dict[str, Tensor] = {}
        meta: dict[str, dict[str, Any]] = {}
        for name, lc in self.items():
            t, m = lc.to_checkpoint()
            tensors.update({f"{self.PREFIX}/{name}/{f}": v for f, v in t.items()})
            meta[name] = m
        return tensors, meta

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, Tensor], meta: Any, model: nn.Module,
                        source: str) -> CompressionState:
        """Inverse of `to_checkpoint` for the layers of `model` (validated)."""
        if not isinstance(meta, dict) or not all(isinstance(v, dict) for v in meta.values()):
            raise XaiCompressError(f"{source}: compression metadata must map layer names to "
                                   "objects")
        by_layer: dict[str, dict[str, Tensor]] = {}
        for key, t in tensors.items():
            prefix, _, rest = key.partition("/")
            name, _, f = rest.rpartition("/")
            if prefix != cls.PREFIX or not f:
                raise XaiCompressError(f"{source}: unexpected compression tensor {key!r}")
            by_layer.setdefault(name, {})[f] = t
        modules = dict(model.named_modules())
        state = cls()
        for name in sorted(set(by_layer) | set(meta)):
            w = getattr(modules.get(name), "weight", None)
            if not isinstance(w, Tensor):
                raise XaiCompressError(f"{source}: compression state names layer {name!r}, "
                                       "which the model does not have (or has no weight)")
            state.layers[name] = LayerEncoding.from_checkpoint(
                by_layer.get(name, {}), meta.get(name, {}), tuple(w.shape),
                f"{source}: layer {name!r}")
        return state
