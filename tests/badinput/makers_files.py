"""Writers of bad model files (checkpoints, packed files, cache entries) for `cases_files`.

Each maker takes (a good checkpoint, a folder) and returns the path of the bad file it
wrote. A checksum only catches accidental damage (whoever edits a file can recompute it),
so the makers of *hostile* files re-sign what they change (`write_checkpoint(sign=True)`,
`write_xcpk(crc=True)`): the deeper checks must hold on their own.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from xaicompress.checkpoint import (
    Checkpoint,
    _digest,
    _tensor_bytes,
    load_checkpoint,
    save_checkpoint,
)
from xaicompress.encoding import ActQuant, Codebook, IntGrid, Mask
from xaicompress.export.packed import write_packed
from xaicompress.export.xcpk_reader import (
    HEADER_DICT,
    MAGIC,
    PREFIX,
    TRAILER,
    VERSION,
    compress_header,
)

MARKER = "PAYLOAD_RAN"
_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
             torch.bool: "BOOL", torch.int8: "I8", torch.int16: "I16",
             torch.float8_e4m3fn: "F8_E4M3"}


# ------------------------------------------------------------------ checkpoints
def checkpoint_parts(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["xaicompress"])
    return load_file(str(path)), meta


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], *,
                     sign: bool = True) -> Path:
    """Save `tensors` with xaicompress metadata `meta`, with a valid checksum if `sign`."""
    meta = {k: v for k, v in meta.items() if k != "checksum"}
    if sign:
        meta["checksum"] = _digest(json.loads(json.dumps(meta)), (
            (k, _ST_NAMES[v.dtype], list(v.shape), _tensor_bytes(v)) for k, v in tensors.items()))
    save_file(tensors, str(path), metadata={"xaicompress": json.dumps(meta)})
    return path


def edit_checkpoint(good: Path, d: Path, name: str, *, tensors_fn=None, meta_fn=None,
                    sign: bool = True) -> Path:
    tensors, meta = checkpoint_parts(good)
    if tensors_fn:
        tensors = tensors_fn(tensors) or tensors
    if meta_fn:
        meta = meta_fn(meta) or meta
    return write_checkpoint(d / name, tensors, meta, sign=sign)


def payload_checkpoint(factory: str):
    """A (re-signed) checkpoint whose metadata names `factory` with marker arguments."""
    def make(good: Path, d: Path) -> Path:
        victim(d)

        def meta_fn(m):
            m["model"]["name"] = factory
            m["model"]["kwargs"] = marker_kwargs(d, factory)
        return edit_checkpoint(good, d, f"{factory.replace(':', '_')}.safetensors",
                               meta_fn=meta_fn)
    return make


#: factories a hostile file could name, each with arguments that would really create the
#: marker file (or delete the victim folder) if the loader ever called it; `test_files`
#: checks that they would, by calling them on purpose
PAYLOADS = ("os:system", "subprocess:getoutput", "builtins:open", "os:makedirs",
            "shutil:copyfile", "shutil:rmtree")


def marker_kwargs(d: Path, factory: str) -> dict[str, Any]:
    m = str(d / MARKER)
    return {"os:system": {"command": f"touch {m}"},
            "subprocess:getoutput": {"cmd": f"touch {m}"},
            "builtins:open": {"file": m, "mode": "w"},
            "os:makedirs": {"name": m},
            "shutil:copyfile": {"src": str(d / "victim" / "keep.txt"), "dst": m},
            "shutil:rmtree": {"path": str(d / "victim")}}[factory]


def victim(d: Path) -> None:
    """The folder `shutil:rmtree` payloads aim at (the harness sees it vanish)."""
    (d / "victim").mkdir(exist_ok=True)
    (d / "victim" / "keep.txt").write_text("not yours to delete\n")


def raw_edit_case(name: str, fn):
    """A copy of the good checkpoint with its bytes changed by `fn(bytes) -> bytes`."""
    def make(good: Path, d: Path) -> Path:
        p = d / name
        p.write_bytes(fn(good.read_bytes()))
        return p
    return make


def edit_case(name: str, *, tensors_fn=None, meta_fn=None, sign: bool = True):
    """`edit_checkpoint` of the good checkpoint, as a maker."""
    def make(good: Path, d: Path) -> Path:
        return edit_checkpoint(good, d, name, tensors_fn=tensors_fn, meta_fn=meta_fn, sign=sign)
    return make


def st_data_start(raw: bytes) -> int:
    return 8 + struct.unpack("<Q", raw[:8])[0]


# ---------------------------------------------------------------- packed files
def packed_of(good: Path, d: Path) -> Path:
    """A valid packed file of the good checkpoint (the starting point of every bad one)."""
    p = d / "good.xcpk"
    if not p.exists():
        write_packed(load_checkpoint(good), p)
    return p


def xcpk_parts(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    _, _, hlen = PREFIX.unpack_from(raw)
    header = json.loads(zlib.decompressobj(zdict=HEADER_DICT).decompress(
        raw[PREFIX.size:PREFIX.size + hlen]))
    return header, raw[PREFIX.size + hlen:len(raw) - TRAILER.size]


def write_xcpk(path: Path, header: Any, payload: bytes, *, version: int = VERSION,
               crc: bool = True, compressed: bytes | None = None) -> Path:
    """Assemble a packed file (valid CRC unless crc=False)."""
    hdr = compressed if compressed is not None else compress_header(
        json.dumps(header).encode("utf-8"))
    body = PREFIX.pack(MAGIC, version, len(hdr)) + hdr + payload
    tail = TRAILER.pack(zlib.crc32(body) if crc else (zlib.crc32(body) ^ 1))
    path.write_bytes(body + tail)
    return path


def edit_xcpk(name: str, header_fn=None, payload_fn=None, **kw):
    def make(good: Path, d: Path) -> Path:
        header, payload = xcpk_parts(packed_of(good, d))
        if header_fn:
            header = header_fn(header) or header
        if payload_fn:
            payload = payload_fn(payload)
        return write_xcpk(d / name, header, payload, **kw)
    return make


def first_encoded(header: dict[str, Any], encoding: str) -> dict[str, Any]:
    return next(r for r in header["tensors"].values() if r["encoding"] == encoding)


def zlib_bomb(total: int = 3 << 30, chunk: int = 8 << 20) -> bytes:
    """A valid zlib stream of `total` zero bytes (~1000x smaller), built in a fraction of a
    second: after a full flush deflate forgets its history, so every further chunk of zeros
    compresses to the same bytes, repeated; the Adler-32 of n zeros is (n mod 65521) << 16 | 1.
    """
    assert total % chunk == 0
    c = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, HEADER_DICT)
    zeros = b"\x00" * chunk
    first = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    end = c.flush(zlib.Z_FINISH)[:-4]  # the final empty block, without its Adler-32
    body = first + again * (total // chunk - 1) + end
    return body + struct.pack(">I", ((total % 65521) << 16) | 1)


# ------------------------------------------------------- files with every encoding
def rich_checkpoint(good: Path) -> Checkpoint:
    """The good model with every encoding: conv1 an integer grid (4 bits) with 8-bit input
    activations, fc1 pruned (mask) and shared (8-entry fp16 codebook)."""
    ck = load_checkpoint(good)
    w = ck.model.fc1.weight.detach()
    ck.state.get("fc1").mask = Mask(w.abs() > w.abs().median())
    values = torch.linspace(float(w.min()), float(w.max()), 8).half().float()
    ck.state.get("fc1").weights = Codebook(values, (w[..., None] - values).abs().argmin(-1))
    w1 = ck.model.conv1.weight.detach()
    ck.state.get("conv1").weights = IntGrid(4, w1.reshape(w1.shape[0], -1).abs().amax(1) / 7)
    ck.state.get("conv1").activation = ActQuant(8, 0.02)
    ck.state.apply(ck.model)
    ck.state.install_hooks(ck.model)
    return ck


def rich_paths(good: Path, d: Path) -> tuple[Path, Path]:
    """(checkpoint, packed file) of `rich_checkpoint`, written once per folder."""
    ck_path, xc_path = d / "rich.safetensors", d / "rich.xcpk"
    if not ck_path.exists():
        ck = rich_checkpoint(good)
        save_checkpoint(ck, ck_path)
        write_packed(ck, xc_path)
    return ck_path, xc_path


def edit_rich_checkpoint(name: str, tensors_fn=None, meta_fn=None):
    def make(good: Path, d: Path) -> Path:
        return edit_checkpoint(rich_paths(good, d)[0], d, name, tensors_fn=tensors_fn,
                               meta_fn=meta_fn)
    return make


def st_header_edit(name: str, fn, *, source: str = "good"):
    """A checkpoint whose safetensors header JSON `fn` changed (data left as it was)."""
    def make(good: Path, d: Path) -> Path:
        raw = good.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        fn(header)
        text = json.dumps(header).encode()
        p = d / name
        p.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
        return p
    return make


def st_metadata_text(name: str, text: str):
    """A checkpoint whose xaicompress metadata string is `text` (not valid for a loader)."""
    def make(good: Path, d: Path) -> Path:
        tensors, _ = checkpoint_parts(good)
        p = d / name
        save_file(tensors, str(p), metadata={"xaicompress": text})
        return p
    return make


def sparse_padded(size: int):
    """A valid checkpoint padded (sparsely: no disk used) to `size` bytes."""
    def make(good: Path, d: Path) -> Path:
        p = d / f"sparse_{size >> 30}GiB.safetensors"
        p.write_bytes(good.read_bytes())
        with open(p, "r+b") as f:
            f.truncate(size)
        return p
    return make


def flip_bit(name: str, where, *, source: str = "ckpt"):
    """A copy with one bit flipped at byte `where(raw)` (of the checkpoint or packed file)."""
    def make(good: Path, d: Path) -> Path:
        src = good if source == "ckpt" else rich_paths(good, d)[1]
        raw = bytearray(src.read_bytes())
        raw[where(bytes(raw))] ^= 0x04
        p = d / name
        p.write_bytes(bytes(raw))
        return p
    return make


def cut(name: str, where, *, source: str = "ckpt"):
    def make(good: Path, d: Path) -> Path:
        src = good if source == "ckpt" else rich_paths(good, d)[1]
        raw = src.read_bytes()
        p = d / name
        p.write_bytes(raw[:where(raw)])
        return p
    return make


def xcpk_header_len(raw: bytes) -> int:
    return PREFIX.unpack_from(raw)[2]


def edit_rich_xcpk(name: str, header_fn=None, payload_fn=None, **kw):
    """The rich packed file with its header and/or payload edited, the CRC recomputed."""
    def make(good: Path, d: Path) -> Path:
        header, payload = xcpk_parts(rich_paths(good, d)[1])
        if header_fn:
            header = header_fn(header) or header
        if payload_fn:
            payload = payload_fn(header, bytearray(payload))
        return write_xcpk(d / name, header, bytes(payload), **kw)
    return make


def stream_span(header: dict[str, Any], tensor: str, role: str) -> tuple[int, int]:
    """(offset, length) in the payload of stream `role` of `tensor`."""
    pos = 0
    for name in sorted(header["tensors"]):
        for s in header["tensors"][name]["streams"]:
            if name == tensor and s["role"] == role:
                return pos, s["bytes"]
            pos += s["bytes"]
    raise KeyError((tensor, role))


def overwrite_stream(tensor: str, role: str, data: bytes):
    def fn(header: dict[str, Any], payload: bytearray) -> bytearray:
        off, _ = stream_span(header, tensor, role)
        payload[off:off + len(data)] = data
        return payload
    return fn


def payload_xcpk(factory: str):
    def make(good: Path, d: Path) -> Path:
        victim(d)

        def header_fn(h):
            h["model"]["name"] = factory
            h["model"]["kwargs"] = marker_kwargs(d, factory)
        return edit_rich_xcpk(f"{factory.replace(':', '_')}.xcpk", header_fn)(good, d)
    return make


def raw_xcpk(name: str, header_text: str, payload: bytes = b""):
    def make(good: Path, d: Path) -> Path:
        return write_xcpk(d / name, None, payload,
                          compressed=compress_header(header_text.encode()))
    return make


def xcpk_bomb(good: Path, d: Path) -> Path:
    return write_xcpk(d / "bomb.xcpk", None, b"", compressed=zlib_bomb(3 << 30))


def nested_json(depth: int = 100_000) -> str:
    return "[" * depth + "]" * depth


def xcpk_prefix_claims(name: str, header_length: int):
    """The rich packed file with a prefix claiming a header of `header_length` bytes."""
    def make(good: Path, d: Path) -> Path:
        raw = bytearray(rich_paths(good, d)[1].read_bytes())
        struct.pack_into("<I", raw, 5, header_length)
        p = d / name
        p.write_bytes(bytes(raw))
        return p
    return make


def xcpk_scale_wrong_length(good: Path, d: Path) -> Path:
    """conv1's scales stream holds 3 scales for 6 output channels (the CRC is valid)."""
    header, payload = xcpk_parts(rich_paths(good, d)[1])
    off, n = stream_span(header, "conv1.weight", "scales")
    next(s for s in header["tensors"]["conv1.weight"]["streams"]
         if s["role"] == "scales")["bytes"] = n // 2
    return write_xcpk(d / "scale_len.xcpk", header, payload[:off + n // 2] + payload[off + n:])


# ------------------------------------------------------------- import (state dicts)
class _ImportPayload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def state_dict_file(name: str, edit=None, *, legacy: bool = False):
    """A `torch.save` file of the good checkpoint's state dict, edited by `edit(sd, d)`
    (which may return another object to save)."""
    def make(good: Path, d: Path) -> Path:
        sd = {k: v for k, v in load_file(str(good)).items() if not k.startswith("__xc__")}
        obj = edit(sd, d) if edit else None
        p = d / name
        torch.save(sd if obj is None else obj, p,
                   _use_new_zipfile_serialization=not legacy)
        return p
    return make


def with_payload(sd: dict, d: Path) -> dict:
    return {"state_dict": {**sd, "evil": _ImportPayload(d / MARKER)}}


def other_architecture(sd: dict, d: Path) -> dict:
    from xaicompress.models.registry import create_model

    return create_model("lenet300", (1, 28, 28), 10).state_dict()


def without_fc3(sd: dict, d: Path) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith("fc3.")}


def nan_weight(sd: dict, d: Path) -> dict:
    sd["conv1.weight"] = sd["conv1.weight"].clone()
    sd["conv1.weight"].view(-1)[3] = float("nan")
    return sd


def pickled_model(sd: dict, d: Path) -> Any:
    from xaicompress.models.registry import create_model

    return create_model("lenet5", (1, 28, 28), 10)
