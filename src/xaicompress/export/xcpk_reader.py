"""Standalone reader of xaicompress packed model files (`.xcpk`, format versions 2 and 3).

Needs numpy and the Python standard library only (plus `constriction` 0.5.0, imported only
for entropy-coded "range" streams): copy this one file into any project.
The format is specified byte by byte in xaicompress's `docs/format.md`.

    from xcpk_reader import read_xcpk

    f = read_xcpk("model.xcpk")
    f.tensors["fc1.weight"]      # numpy float32, the effective weight a runtime computes with
    f.encodings["fc1.weight"]    # how it is stored: {"encoding": "codebook", "codebook": ...,
                                 #  "indices": ..., "mask": ...}
    f.activations["fc1"]         # {"bits": 8, "scale": 0.0123}: quantized layer inputs
    f.model, f.widths, f.data    # the architecture the weights belong to

Every problem is an `XcpkError` (a ValueError) with a one-line message naming the file. The
checks run before anything is allocated: the declared sizes against the real file length
and the caps below, the CRC-32 of the whole file, the header's inflated size; so a damaged
or hostile file is refused quickly and in little memory. xaicompress itself parses the
container with `parse_container` (one implementation of the checks) and decodes the
tensors with its own encoding classes; a test checks both decoders agree bit for bit.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAGIC = b"XCPK"
#: the version writers write; READ_VERSIONS are read (a version 2 file differs only by its
#: header dictionary and has none of version 3's value codings)
VERSION = 3
READ_VERSIONS = (2, 3)
#: magic, format version, length of the compressed header (little-endian)
PREFIX = struct.Struct("<4sBI")
#: CRC-32 (zlib.crc32) of every byte before it, little-endian
TRAILER = struct.Struct("<I")

# Caps: a file beyond them is refused before anything is allocated (docs/format.md).
MAX_FILE_BYTES = 1 << 32  # 4 GiB
MAX_HEADER_BYTES = 16 << 20  # the compressed header
MAX_HEADER_JSON = 16 << 20  # the header once inflated (a zlib bomb stops here)
MAX_TENSORS = 100_000
MAX_NAME = 1024  # characters of a tensor or layer name
MAX_NDIM = 8
MAX_DIM = (1 << 31) - 1
MAX_STREAMS = 8  # per tensor
#: all tensors together hold at most MAX_FREE_WEIGHTS + WEIGHTS_PER_BYTE * payload bytes
#: values (at least 1/16 bit per weight on average beyond the first 16M): a tiny file cannot
#: make the reader allocate gigabytes of zeros
MAX_FREE_WEIGHTS = 1 << 24
WEIGHTS_PER_BYTE = 128
MAX_K = 1 << 16  # codebook entries
INT_BITS = (2, 16)  # integer grid widths
ACT_BITS = (2, 8)  # activation widths

#: the preset zlib dictionary of version 2 headers (RFC 1950 FDICT), read only
HEADER_DICT_V2 = (
    b'{"model":{"name":"","input_shape":[3,32,32],"num_classes":10,"kwargs":{}},"data":null,'
    b'"widths":{"in":,"out":,"groups":1}},"activations":{"bits":8,"scale":0.0},'
    b'"tensors":{"layer1.0.downsample.features.classifier.bn1.conv1.fc1.running_mean":'
    b'{"shape":[],"encoding":"dense","streams":[{"role":"values","coding":"float32","bytes":}]},'
    b'"running_var":{"shape":[],"encoding":"dense","streams":[{"role":"values","coding":'
    b'"float32","bytes":}]},"num_batches_tracked":{"shape":[],"encoding":"dense","streams":'
    b'[{"role":"values","coding":"int64","bytes":8}]},{"shape":[],"encoding":"intgrid",'
    b'"bits":,"masked":true,"streams":[{"role":"positions","coding":"bitmap","bytes":},'
    b'{"role":"scales","coding":"float32","bytes":},{"role":"values","coding":"uint'
    b'{"shape":[],"encoding":"codebook","k":,"masked":true,"streams":[{"role":"positions",'
    b'"coding":"relidx","bytes":},{"role":"codebook","coding":"float16","bytes":},'
    b'{"role":"indices","coding":"uint.weight":{"shape":[],"encoding":"dense","streams":'
    b'[{"role":"values","coding":"float32","bytes":}]},.bias":{"shape":[],"encoding":"dense",'
    b'"streams":[{"role":"values","coding":"float32","bytes":}]},')
#: the preset zlib dictionary of version 3 headers (RFC 1950 FDICT): the key names, stream
#: descriptions and model names headers repeat, the most frequent last (the nearest for
#: deflate), so they cost almost nothing (the demo's header takes 281 bytes with it, 332 with
#: version 2's, 488 without); docs/format.md lists it byte by byte
HEADER_DICT = (
    b'{"model":{"name":"resnet20","input_shape":[3,32,32],"num_classes":1000,"kwargs":'
    b'{},"preprocess":{"mean":[0.485,0.456,0.406],"std":[0.229,0.224,0.225],"size":224'
    b',"resize":256}},"data":null,"activations":{"bits":8,"scale":0.0},"widths":{"feat'
    b'ures.classifier.downsample.layer1.0.layers.0.shortcut.0.bn1":{"in":1,"out":1,"gr'
    b'oups":1},{"shape":[],"encoding":"intgrid","bits":,"masked":true,"streams":[{"rol'
    b'e":"positions","coding":"relidx","bytes":},{"role":"scales","coding":"float32","'
    b'bytes":},{"role":"values","coding":"uint{"role":"values","coding":"range","bytes'
    b'":}]},"num_batches_tracked":{"shape":[],"encoding":"dense","streams":[{"role":"v'
    b'alues","coding":"int64","bytes":8}]},"running_mean":{"shape":[],"encoding":"dens'
    b'e","streams":[{"role":"values","coding":"float32","bytes":}]},"running_var":{"sh'
    b'ape":[],"encoding":"dense","streams":[{"role":"values","coding":"float32","bytes'
    b'":}]},"num_batches_tracked":{"shape":[],"encoding":"dense","streams":[{"role":"v'
    b'alues","coding":"int8","bytes":1}]},"running_mean":{"shape":[],"encoding":"dense'
    b'","streams":[{"role":"values","coding":"fill16","bytes":2}]},"running_var":{"sha'
    b'pe":[],"encoding":"dense","streams":[{"role":"values","coding":"fill16","bytes":'
    b'2}]},.weight":{"shape":[],"encoding":"dense","streams":[{"role":"values","coding'
    b'":"float16","bytes":}]},"encoding":"codebook","k":,"masked":true,"streams":[{"ro'
    b'le":"positions","coding":"bitmap","bytes":},{"role":"codebook","coding":"float16'
    b'","bytes":},{"role":"indices","coding":"uint"encoding":"codebook","k":,"masked":'
    b'true,"streams":[{"role":"positions","coding":"range","bytes":},{"role":"codebook'
    b'","coding":"float16","bytes":},{"role":"indices","coding":"range","bytes":}]},"e'
    b'ncoding":"codebook","k":,"masked":true,"streams":[{"role":"positions","coding":"'
    b'zerocluster","bytes":0},{"role":"codebook","coding":"float16","bytes":},{"role":'
    b'"indices","coding":"range","bytes":}]},.bias":{"shape":[],"encoding":"dense","st'
    b'reams":[{"role":"values","coding":"grid8","bytes":}]},"tensors":{"conv1.bias":{"'
    b'shape":[')
HEADER_DICTS = {2: HEADER_DICT_V2, 3: HEADER_DICT}
HEADER_KEYS = {"model", "widths", "data", "tensors", "activations"}
RECORD_KEYS = {"shape", "encoding", "streams", "masked", "k", "bits"}
STREAM_KEYS = {"role", "coding", "bytes"}
ARRAY_CODINGS = {"float32": "<f4", "float16": "<f2", "int64": "<i8", "int32": "<i4",
                 "int16": "<i2", "int8": "i1", "uint8": "u1", "bool": "u1"}
#: value codings of a dense tensor's float values besides float32 / float16 (version 3):
#: "fill16" / "fill32" one binary16 / binary32 value that every value equals; "grid8" a
#: binary16 scale s > 0, then one int8 q in -127..127 per value, value = float32(q) * s
FILL_CODINGS = {"fill16": "float16", "fill32": "float32"}
GRID8 = "grid8"
GRID8_QMAX = 127
POSITION_CODINGS = ("bitmap", "relidx", "range")

# Entropy coding ("range" streams, docs/format.md "Range coding"): constriction's range coder
# (`constriction.stream.queue`, 32-bit words, 24-bit probabilities) with a block-adaptive
# categorical model, so no probability table is stored: block j of the symbols is coded with
# the counts of every symbol before it plus a prior count alpha (the stream's first byte j
# names alpha = 2^-j). Blocks: [0, 16), [16, 32), [32, 64), ... doubling.
RANGE = "range"
#: prior count of every symbol, by the stream's first byte (the writer picks the smallest file)
RANGE_ALPHAS = tuple(2.0 ** -j for j in range(8))
RANGE_FIRST_BLOCK = 16
#: largest alphabet of a range-coded stream (16-bit integers, 65,536 codebook entries)
MAX_ALPHABET = 1 << 16
#: the positions coding of a codebook tensor whose pruned weights are its zero cluster: no
#: bytes; kept = the weights whose index is not the first codebook entry equal to 0
ZERO_CLUSTER = "zerocluster"


class XcpkError(ValueError):
    """A file that is not a valid packed model file (one line, naming the file)."""


@dataclass
class TensorRecord:
    """One tensor of the header, with the bytes of its streams (role, coding, bytes)."""

    name: str
    shape: tuple[int, ...]
    fields: dict[str, Any]
    streams: list[tuple[str, str, bytes]]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Container:
    """A checked file: its header (JSON) and its tensors in payload order (sorted names)."""

    header: dict[str, Any]
    records: list[TensorRecord]
    file_bytes: int = 0
    header_bytes: int = 0


@dataclass
class XcpkModel:
    """What `read_xcpk` returns (see the module docstring)."""

    model: dict[str, Any]
    widths: dict[str, Any]
    data: Any
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    encodings: dict[str, dict[str, Any]] = field(default_factory=dict)
    activations: dict[str, dict[str, Any]] = field(default_factory=dict)


# ------------------------------------------------------------------- container
def parse_container(raw: bytes, source: str = "packed file") -> Container:
    """Check the prefix, sizes, caps and CRC, inflate and check the header; no tensor is
    decoded yet."""
    payload_start, payload_end = _check_frame(raw, source)
    hlen = payload_start - PREFIX.size
    header = _inflate_json(raw[PREFIX.size:payload_start], source, raw[4])
    unknown = sorted(set(header) - HEADER_KEYS)
    if unknown:
        raise XcpkError(f"{source}: unknown header keys {unknown[:3]}")
    if not isinstance(header.get("model"), dict):
        raise XcpkError(f"{source}: header has no model object")
    records = _slice_payload(_records(header.get("tensors"), source), raw, payload_start,
                             payload_end, source)
    return Container(header, records, len(raw), PREFIX.size + hlen)


def _check_frame(raw: bytes, source: str) -> tuple[int, int]:
    """(payload start, payload end) after checking magic, version, lengths and CRC."""
    if len(raw) < PREFIX.size + TRAILER.size or raw[:len(MAGIC)] != MAGIC:
        raise XcpkError(f"{source}: not an xaicompress packed model file (expected it to "
                        f"start with {MAGIC!r})")
    _, version, hlen = PREFIX.unpack_from(raw)
    if version == 1:
        raise XcpkError(f"{source}: packed format version 1 is no longer read (it had no "
                        "checksum); export the model again from its .safetensors checkpoint")
    if version not in READ_VERSIONS:
        raise XcpkError(f"{source}: packed format version {version}, this reader supports "
                        f"{' and '.join(map(str, READ_VERSIONS))}")
    if len(raw) > MAX_FILE_BYTES:
        raise XcpkError(f"{source}: {len(raw)} bytes, more than the {MAX_FILE_BYTES}-byte cap")
    if hlen > MAX_HEADER_BYTES or PREFIX.size + hlen + TRAILER.size > len(raw):
        raise XcpkError(f"{source}: header length {hlen} does not fit the file of {len(raw)} "
                        "bytes (truncated or corrupt)")
    (crc,) = TRAILER.unpack_from(raw, len(raw) - TRAILER.size)
    if zlib.crc32(memoryview(raw)[:len(raw) - TRAILER.size]) != crc:
        raise XcpkError(f"{source}: checksum mismatch: the file is damaged or truncated")
    return PREFIX.size + hlen, len(raw) - TRAILER.size


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def compress_header(text: bytes) -> bytes:
    """The header's zlib stream (level 9, with `HEADER_DICT`), as writers make it."""
    c = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, HEADER_DICT)
    return c.compress(text) + c.flush()


def _inflate_json(data: bytes, source: str, version: int = VERSION) -> dict[str, Any]:
    """The header JSON, inflated to at most MAX_HEADER_JSON bytes."""
    zdict = HEADER_DICTS[version]
    # RFC 1950: FDICT (bit 5 of the second byte), then the dictionary's Adler-32
    if len(data) < 6 or not data[1] & 0x20 or \
            int.from_bytes(data[2:6], "big") != zlib.adler32(zdict):
        raise XcpkError(f"{source}: header is not a zlib stream with the version {version} "
                        "dictionary (corrupt packed file header)")
    d = zlib.decompressobj(zdict=zdict)
    try:
        text = d.decompress(data, MAX_HEADER_JSON)
        if d.unconsumed_tail or not d.eof:
            if len(text) >= MAX_HEADER_JSON:
                raise XcpkError(f"{source}: header inflates to more than {MAX_HEADER_JSON} "
                                "bytes (refusing a decompression bomb)")
            raise XcpkError(f"{source}: header is not a complete zlib stream")
        if d.unused_data:
            raise XcpkError(f"{source}: bytes after the header's zlib stream")
        header = json.loads(text.decode("utf-8"), parse_constant=_reject_constant)
    except zlib.error as exc:
        raise XcpkError(f"{source}: corrupt packed file header ({exc})") from None
    except RecursionError:
        raise XcpkError(f"{source}: header JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, XcpkError):
            raise
        raise XcpkError(f"{source}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise XcpkError(f"{source}: header is {type(header).__name__}, expected an object")
    return header


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_NDIM or not all(
            _is_int(d) and 0 <= d <= MAX_DIM for d in value):
        raise XcpkError(f"{where}: shape {str(value)[:80]} is not a list of at most "
                        f"{MAX_NDIM} sizes from 0 to {MAX_DIM}")
    return tuple(value)


def _streams(value: Any, where: str) -> list[tuple[str, str, int]]:
    if not isinstance(value, list) or len(value) > MAX_STREAMS:
        raise XcpkError(f"{where}: streams must be a list of at most {MAX_STREAMS} objects")
    out = []
    for s in value:
        if not isinstance(s, dict) or set(s) != STREAM_KEYS:
            raise XcpkError(f"{where}: a stream must be an object with keys "
                            f"{sorted(STREAM_KEYS)}")
        role, coding, n = s["role"], s["coding"], s["bytes"]
        if not (isinstance(role, str) and isinstance(coding, str) and len(role) <= 64
                and len(coding) <= 64 and _is_int(n) and 0 <= n <= MAX_FILE_BYTES):
            raise XcpkError(f"{where}: bad stream {str(s)[:80]}")
        out.append((role, coding, n))
    return out


_Entry = tuple[str, tuple[int, ...], dict[str, Any], list[tuple[str, str, int]]]


def _records(tensors: Any, source: str) -> list[_Entry]:
    """(name, shape, record, streams) of every tensor, sorted by name (the payload order)."""
    if not isinstance(tensors, dict) or len(tensors) > MAX_TENSORS:
        raise XcpkError(f"{source}: header tensors must be an object of at most {MAX_TENSORS} "
                        "entries")
    out = []
    for name in sorted(tensors):
        rec = tensors[name]
        where = f"{source}: tensor {name[:MAX_NAME]!r}"
        if len(name) > MAX_NAME or not isinstance(rec, dict):
            raise XcpkError(f"{where}: expected a name of at most {MAX_NAME} characters and "
                            "an object")
        unknown = sorted(set(rec) - RECORD_KEYS)
        if unknown or not isinstance(rec.get("encoding"), str):
            raise XcpkError(f"{where}: unknown keys {unknown[:3]} or no encoding name")
        out.append((name, _shape(rec.get("shape"), where), rec,
                    _streams(rec.get("streams"), where)))
    return out


def _slice_payload(entries: list[_Entry], raw: bytes, start: int, end: int,
                   source: str) -> list[TensorRecord]:
    """The records with their streams' bytes, after checking that the declared byte counts
    add up to the payload and that the tensors' sizes fit the caps."""
    declared = sum(n for *_, streams in entries for _, _, n in streams)
    if declared != end - start:
        raise XcpkError(f"{source}: header declares {declared} payload bytes, the file has "
                        f"{end - start} (truncated or corrupt)")
    total = sum(math.prod(shape) for _, shape, _, _ in entries)
    cap = MAX_FREE_WEIGHTS + WEIGHTS_PER_BYTE * (end - start)
    if total > cap:
        raise XcpkError(f"{source}: declares {total} values in {end - start} payload bytes, "
                        f"more than the cap of {cap}")
    out, pos = [], start
    for name, shape, rec, streams in entries:
        sliced = []
        for role, coding, n in streams:
            sliced.append((role, coding, raw[pos:pos + n]))
            pos += n
        out.append(TensorRecord(name, shape, rec, sliced))
    return out


# ----------------------------------------------------------------- decoding
def _array(stream: tuple[str, str, bytes], codings: tuple[str, ...], count: int,
           where: str) -> np.ndarray:
    role, coding, data = stream
    if coding not in codings:
        raise XcpkError(f"{where}: {role} stream has coding {coding!r}, expected "
                        f"{' or '.join(codings)}")
    dt = np.dtype(ARRAY_CODINGS[coding])
    if len(data) != count * dt.itemsize:
        raise XcpkError(f"{where}: {role} stream of {len(data)} bytes, expected {count} "
                        f"{coding} values")
    arr = np.frombuffer(data, dtype=dt, count=count)
    if coding.startswith("float"):
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise XcpkError(f"{where}: {role} stream holds NaN or Inf values")
    return arr


def decode_floats(stream: tuple[str, str, bytes], count: int, where: str) -> np.ndarray:
    """`count` float32 values of a dense tensor's "values" stream: float32, float16,
    fill16, fill32 or grid8 (finite; docs/format.md, "Stream codings")."""
    role, coding, data = stream
    if coding in FILL_CODINGS:
        if not count:
            raise XcpkError(f"{where}: {role} stream coded {coding} for a tensor of no value")
        one = _array((role, FILL_CODINGS[coding], data), (FILL_CODINGS[coding],), 1, where)
        return np.full(count, one[0], dtype=np.float32)
    if coding == GRID8:
        if len(data) != 2 + count:
            raise XcpkError(f"{where}: {role} stream coded {GRID8} of {len(data)} bytes, "
                            f"expected 2 + {count}")
        scale = np.frombuffer(data, "<f2", count=1).astype(np.float32)
        q = np.frombuffer(data, "i1", offset=2, count=count)
        if not (np.isfinite(scale[0]) and scale[0] > 0) or (
                count and int(np.abs(q.astype(np.int64)).max()) > GRID8_QMAX):
            raise XcpkError(f"{where}: {GRID8} stream needs a finite scale > 0 and integers "
                            f"in -{GRID8_QMAX}..{GRID8_QMAX}")
        return q.astype(np.float32) * scale[0]
    return _array(stream, ("float32", "float16"), count, where)


def unpack_uint(data: bytes, bits: int, count: int, where: str) -> np.ndarray:
    """`count` unsigned `bits`-bit integers, LSB first, value after value (int64)."""
    if len(data) != (count * bits + 7) // 8:
        raise XcpkError(f"{where}: {len(data)} bytes for {count} values of {bits} bits")
    raw = np.frombuffer(data, np.uint8)
    weights = np.int64(1) << np.arange(bits, dtype=np.int64)
    out = np.empty(count, dtype=np.int64)
    chunk = 1 << 20  # values per step (a multiple of 8: chunks start on whole bytes)
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        part = raw[start * bits // 8:(start * bits // 8) + (n * bits + 7) // 8]
        bitarr = np.unpackbits(part, count=n * bits, bitorder="little")
        out[start:start + n] = bitarr.reshape(n, bits).astype(np.int64) @ weights
    return out


def range_blocks(count: int) -> list[tuple[int, int]]:
    """[start, end) of the blocks of a range-coded stream of `count` symbols: 16, 16, 32,
    64, ... symbols (each block's model is learnt from every symbol before it)."""
    out, start, end = [], 0, min(count, RANGE_FIRST_BLOCK)
    while start < count:
        out.append((start, end))
        start, end = end, min(count, 2 * end)
    return out


def range_model(counts: np.ndarray, alpha: float) -> Any:
    """The categorical model of one block: probabilities proportional to counts + alpha
    (float64; constriction quantizes them to 24 bits, identically in writer and reader)."""
    import constriction  # lazily: only range-coded streams need it

    return constriction.stream.model.Categorical(counts.astype(np.float64) + alpha,
                                                 perfect=False)


def range_encode(symbols: np.ndarray, alphabet: int, prior: int) -> bytes:
    """The "range" stream of `symbols` (ints in [0, alphabet)) with prior byte `prior`
    (alpha = RANGE_ALPHAS[prior]): what xaicompress writes, and what `range_decode` checks a
    stream against (so a stream decodes only if it is exactly the writer's)."""
    import constriction  # lazily: only range-coded streams need it

    sym = np.ascontiguousarray(np.asarray(symbols).reshape(-1), dtype=np.int32)
    alpha = RANGE_ALPHAS[prior]
    counts = np.zeros(alphabet, dtype=np.int64)
    encoder = constriction.stream.queue.RangeEncoder()
    for start, end in range_blocks(sym.size):
        block = sym[start:end]
        encoder.encode(block, range_model(counts, alpha))
        counts += np.bincount(block, minlength=alphabet)
    words = np.asarray(encoder.get_compressed(), dtype="<u4")
    return bytes([prior]) + words.tobytes()


def range_decode(data: bytes, alphabet: int, count: int, where: str) -> np.ndarray:
    """`count` symbols (int64, each < `alphabet`) of a "range" stream."""
    if not 1 <= alphabet <= MAX_ALPHABET:
        raise XcpkError(f"{where}: range-coded alphabet of {alphabet} symbols, expected 1.."
                        f"{MAX_ALPHABET}")
    if len(data) < 1 or (len(data) - 1) % 4 or data[0] >= len(RANGE_ALPHAS):
        raise XcpkError(f"{where}: range-coded stream of {len(data)} bytes: expected a prior "
                        f"byte < {len(RANGE_ALPHAS)} and whole 32-bit words")
    try:
        import constriction
    except ImportError:
        raise XcpkError(f"{where}: range-coded streams need the constriction package "
                        "(pip install constriction)") from None
    alpha = RANGE_ALPHAS[data[0]]
    words = np.frombuffer(data, dtype="<u4", offset=1).astype(np.uint32)
    counts = np.zeros(alphabet, dtype=np.int64)
    out = np.empty(count, dtype=np.int64)
    try:
        decoder = constriction.stream.queue.RangeDecoder(words)
        for start, end in range_blocks(count):
            sym = np.asarray(decoder.decode(range_model(counts, alpha), end - start))
            out[start:end] = sym
            counts += np.bincount(sym, minlength=alphabet)[:alphabet]
        exhausted = decoder.maybe_exhausted()
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise XcpkError(f"{where}: corrupt range-coded stream ({exc})") from None
    # The coder cannot always tell where its data ends: a stream is valid only if it is
    # exactly what encoding its symbols gives (a second pass, as fast as the first).
    if not exhausted or (count and (int(out.min()) < 0 or int(out.max()) >= alphabet)) or \
            range_encode(out, alphabet, data[0]) != bytes(data):
        raise XcpkError(f"{where}: range-coded stream does not decode to exactly {count} "
                        f"symbols below {alphabet}")
    return out


def decode_positions(coding: str, data: bytes, numel: int, where: str) -> np.ndarray:
    """Flat bool (numel,) mask of a "bitmap", "relidx" or "range" positions stream."""
    if coding == RANGE:
        return range_decode(data, 2, numel, where).astype(bool)
    raw = np.frombuffer(data, np.uint8)
    if coding == "bitmap":
        if raw.size != (numel + 7) // 8:
            raise XcpkError(f"{where}: bitmap of {raw.size} bytes for {numel} weights")
        return np.unpackbits(raw, count=numel, bitorder="little").astype(bool)
    if raw.size < 5 or not 1 <= int(raw[0]) <= 16:
        raise XcpkError(f"{where}: relative-index positions need a 5-byte header, k 1..16")
    k, entries = int(raw[0]), int.from_bytes(raw[1:5].tobytes(), "little")
    if entries > numel or raw.size - 5 != (entries * k + 7) // 8:
        raise XcpkError(f"{where}: relative-index body does not match {entries} entries of "
                        f"{k} bits for {numel} weights")
    codes = unpack_uint(raw[5:].tobytes(), k, entries, where)
    advance = np.where(codes == 0, (1 << k) - 1, codes)
    kept = (np.cumsum(advance) - 1)[codes != 0]
    if kept.size and kept[-1] >= numel:
        raise XcpkError(f"{where}: relative indices reach beyond the {numel} weights")
    mask = np.zeros(numel, dtype=bool)
    mask[kept] = True
    return mask


def _index_bits(k: int) -> int:
    return (k - 1).bit_length()


def _int_field(rec: dict[str, Any], key: str, lo: int, hi: int, where: str) -> int:
    v = rec.get(key)
    if not _is_int(v) or not lo <= v <= hi:
        raise XcpkError(f"{where}: {key} is {v!r}, expected an integer from {lo} to {hi}")
    return v


def _take(streams: dict[str, tuple[str, str, bytes]], role: str, where: str
          ) -> tuple[str, str, bytes]:
    if role not in streams:
        raise XcpkError(f"{where}: missing its {role!r} stream")
    return streams.pop(role)


def _uint_stream(streams: dict[str, Any], role: str, bits: int, count: int,
                 where: str, alphabet: int) -> np.ndarray:
    """`count` symbols < `alphabet` of a "uint<bits>" or "range" stream."""
    _, coding, data = _take(streams, role, where)
    if coding == RANGE:
        return range_decode(data, alphabet, count, where)
    if coding != f"uint{bits}":
        raise XcpkError(f"{where}: {role} stream has coding {coding!r}, expected uint{bits} "
                        "or range")
    return unpack_uint(data, bits, count, where)


def _decode_codebook(rec: dict[str, Any], streams: dict[str, Any], shape: tuple[int, ...],
                     keep: np.ndarray | None, where: str) -> tuple[np.ndarray, dict[str, Any]]:
    k = _int_field(rec, "k", 1, MAX_K, where)
    book = _array(_take(streams, "codebook", where), ("float16", "float32"), k, where)
    implied = keep is None  # positions "zerocluster": every index stored, kept = not zero
    b = _index_bits(k)
    count = math.prod(shape) if keep is None else int(keep.sum())
    idx = (_uint_stream(streams, "indices", b, count, where, k) if b
           else np.zeros(count, np.int64))
    if count and int(idx.max()) >= k:
        raise XcpkError(f"{where}: codebook index out of range 0..{k - 1}")
    if implied:
        zeros = np.flatnonzero(book == 0)
        if not zeros.size:
            raise XcpkError(f"{where}: positions coded as the zero cluster, but no codebook "
                            "entry is 0")
        keep = idx != zeros[0]
        full = idx
    else:
        full = np.zeros(keep.size, dtype=np.int64)
        full[keep] = idx
    return book[full].reshape(shape), {"codebook": book, "indices": full.reshape(shape),
                                       "keep": keep}


def _decode_intgrid(rec: dict[str, Any], streams: dict[str, Any], shape: tuple[int, ...],
                    keep: np.ndarray, where: str) -> tuple[np.ndarray, dict[str, Any]]:
    bits = _int_field(rec, "bits", *INT_BITS, where)
    channels = shape[0] if shape else 1
    scales = _array(_take(streams, "scales", where), ("float32",), channels, where)
    if not (scales > 0).all():
        raise XcpkError(f"{where}: scales must be > 0")
    qmax = 2 ** (bits - 1) - 1
    u = _uint_stream(streams, "values", bits, int(keep.sum()), where, 2 * qmax + 1)
    if u.size and int(u.max()) > 2 * qmax:
        raise XcpkError(f"{where}: integer value out of range 0..{2 * qmax}")
    q = np.zeros(keep.size, dtype=np.float32)
    q[keep] = (u - qmax).astype(np.float32)
    q = q.reshape(shape)
    w = q * scales.reshape(-1, *([1] * (len(shape) - 1)))
    return w, {"bits": bits, "scales": scales, "q": q.astype(np.int64)}


def _decode_dense(rec: dict[str, Any], streams: dict[str, Any], shape: tuple[int, ...],
                  keep: np.ndarray, where: str) -> tuple[np.ndarray, dict[str, Any]]:
    del rec
    stream = _take(streams, "values", where)
    if stream[1] in FILL_CODINGS or stream[1] == GRID8:
        vals = decode_floats(stream, int(keep.sum()), where)
    else:
        vals = _array(stream, tuple(ARRAY_CODINGS), int(keep.sum()), where)
    if stream[1] == "bool":
        if vals.size and int(vals.max()) > 1:
            raise XcpkError(f"{where}: bool values other than 0 and 1")
        vals = vals.astype(bool)
    elif stream[1].startswith("int"):
        vals = vals.astype(np.int64)  # stored in the narrowest signed coding that holds them
    full = np.zeros(keep.size, dtype=vals.dtype)
    full[keep] = vals
    return full.reshape(shape), {}


DECODERS = {"dense": _decode_dense, "codebook": _decode_codebook, "intgrid": _decode_intgrid}


def decode_tensor(rec: TensorRecord, source: str = "packed file"
                  ) -> tuple[np.ndarray, dict[str, Any]]:
    """(effective values, raw encoding) of one tensor. Float tensors come out as float32
    (pruned weights 0), signed integer buffers as int64 (whatever coding stored them),
    uint8 and bool buffers as uint8 and bool."""
    where = f"{source}: tensor {rec.name!r}"
    decoder = DECODERS.get(rec.fields["encoding"])
    if decoder is None:
        raise XcpkError(f"{where}: unknown encoding {rec.fields['encoding']!r}")
    streams: dict[str, tuple[str, str, bytes]] = {}
    for s in rec.streams:
        if s[0] in streams:
            raise XcpkError(f"{where}: two streams with role {s[0]!r}")
        streams[s[0]] = s
    masked = rec.fields.get("masked", False)
    if not isinstance(masked, bool):
        raise XcpkError(f"{where}: masked is {masked!r}, expected true or false")
    keep: np.ndarray | None = np.ones(rec.numel, dtype=bool)
    if masked and "positions" in streams:
        _, coding, data = streams.pop("positions")
        if coding == ZERO_CLUSTER and decoder is _decode_codebook and not data:
            keep = None  # the indices say which weights are kept
        elif coding not in POSITION_CODINGS:
            raise XcpkError(f"{where}: positions coding {coding!r}, expected "
                            f"{', '.join(POSITION_CODINGS)} (or an empty {ZERO_CLUSTER} "
                            "stream of a codebook)")
        else:
            keep = decode_positions(coding, data, rec.numel, where)
    values, raw = decoder(rec.fields, streams, rec.shape, keep, where)
    keep = raw.pop("keep", keep)
    if streams:
        raise XcpkError(f"{where}: unexpected streams {sorted(streams)}")
    if masked:
        # the same arithmetic as xaicompress (w * mask), so pruned zeros carry its signs
        values = values * keep.reshape(rec.shape).astype(values.dtype)
        raw["mask"] = keep.reshape(rec.shape)
    if raw:
        raw["encoding"] = rec.fields["encoding"]
    return values, raw


def _activations(value: Any, source: str) -> dict[str, dict[str, Any]]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_TENSORS:
        raise XcpkError(f"{source}: activations must be an object")
    out = {}
    for name, entry in value.items():
        where = f"{source}: activations of {name[:MAX_NAME]!r}"
        if not isinstance(entry, dict) or set(entry) != {"bits", "scale"}:
            raise XcpkError(f"{where}: expected an object with bits and scale")
        bits = _int_field(entry, "bits", *ACT_BITS, where)
        scale = entry["scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (
                math.isfinite(scale) and scale > 0 and math.isfinite(np.float32(scale))):
            raise XcpkError(f"{where}: scale {scale!r} is not a finite float32 > 0")
        out[name] = {"bits": bits, "scale": float(np.float32(scale))}
    return out


def decode_xcpk(raw: bytes, source: str = "packed file") -> XcpkModel:
    """Decode a whole packed file held in memory."""
    c = parse_container(raw, source)
    h = c.header
    out = XcpkModel(h["model"], h.get("widths") or {}, h.get("data"),
                    activations=_activations(h.get("activations"), source))
    for rec in c.records:
        values, enc = decode_tensor(rec, source)
        out.tensors[rec.name] = values
        if enc:
            out.encodings[rec.name] = enc
    return out


def read_xcpk(path: str) -> XcpkModel:
    """Decode the packed file at `path` (its size is checked before it is read)."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        if size > MAX_FILE_BYTES:
            raise XcpkError(f"{path}: {size} bytes, more than the {MAX_FILE_BYTES}-byte cap")
        f.seek(0)
        raw = f.read()
    return decode_xcpk(raw, str(path))
