"""A user's trained weights: a state dict saved with `torch.save` (`.pt`, `.pth`, `.bin`) or
safetensors, read without ever running code from the file.

- `torch.save` files are read with `torch.load(weights_only=True, mmap=True)`: PyTorch's
  restricted unpickler accepts tensors and plain containers only, so a pickle payload
  (a `__reduce__` naming `os.system`, a whole pickled model object) is refused unrun, and
  the tensors are mapped from the file, so a storage the file claims but does not hold is
  an error, not an allocation. Files in the pre-1.6 (non-zip) `torch.save` format are
  refused: their storages are sized by the pickle alone.
- `.safetensors` files are read by safetensors (offsets checked against the file).

The state dict may sit at the top level or under `state_dict`, `model` or
`model_state_dict` (training checkpoints); DataParallel / DDP's `module.` and
`torch.compile`'s `_orig_mod.` prefixes are removed. `match_state_dict` compares it with a
model and reports missing / unexpected keys and shape mismatches in one line.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xaicompress.errors import XaiCompressError

MAX_FILE_BYTES = 1 << 32  # 4 GiB, as for checkpoints
STATE_KEYS = ("state_dict", "model", "model_state_dict")
PREFIXES = ("module.", "_orig_mod.")
SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
_SHOWN = 3  # keys listed in a one-line error


def file_kind(path: str | os.PathLike[str]) -> str:
    """"xcpk" (packed file), "checkpoint" (xaicompress safetensors), "safetensors" (a plain
    safetensors state dict), "torch" (a torch.save zip or pickle) or "unknown", from the
    first bytes (and, for safetensors, the header's metadata)."""
    with open(path, "rb") as f:
        head = f.read(9)
        if head[:4] == b"XCPK":
            return "xcpk"
        if head[:2] == b"PK" or head[:1] == b"\x80":
            return "torch"
        if len(head) == 9 and head[8:9] == b"{":
            (n,) = struct.unpack("<Q", head[:8])
            if n <= 100_000_000:
                f.seek(8)
                try:
                    meta = json.loads(f.read(n)).get("__metadata__") or {}
                except (ValueError, AttributeError):
                    return "unknown"
                return "checkpoint" if isinstance(meta, dict) and "xaicompress" in meta \
                    else "safetensors"
    return "unknown"


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The state dict in `path` (see module docstring); one-line errors naming the file."""
    p = Path(path)
    if not p.is_file():
        raise XaiCompressError(f"{p}: weights file does not exist")
    size = p.stat().st_size
    if size > MAX_FILE_BYTES:
        raise XaiCompressError(f"{p}: {size} bytes, more than the {MAX_FILE_BYTES}-byte cap")
    kind = file_kind(p)
    if kind in ("checkpoint", "xcpk"):
        what = "checkpoint" if kind == "checkpoint" else "packed file"
        raise XaiCompressError(f"{p}: is already an xaicompress {what}; use it directly "
                               "(import reads a state dict)")
    if kind == "safetensors":
        obj: Any = _read_safetensors(p)
    elif kind == "torch":
        obj = _torch_load(p)
    else:
        raise XaiCompressError(f"{p}: not a state dict file; expected torch.save output "
                               f"({', '.join(SUFFIXES[:3])}) or .safetensors")
    return _strip_prefixes(_find_state_dict(obj, str(p)))


def _read_safetensors(p: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(p))
    except (SafetensorError, ValueError, OSError) as exc:
        raise XaiCompressError(f"{p}: not a valid safetensors file "
                               f"({str(exc).splitlines()[0][:120]})") from None


def _torch_load(p: Path) -> Any:
    if not zipfile.is_zipfile(p):
        raise XaiCompressError(f"{p}: a torch.save file in the legacy (pre-1.6, non-zip) "
                               "format, whose sizes cannot be checked before reading; save it "
                               "again with a current PyTorch (torch.save(model.state_dict()))")
    try:
        return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        first = _refused_global(str(exc))
        raise XaiCompressError(
            f"{p}: holds Python objects other than tensors, refused unrun (torch.load "
            f"weights_only: {first}); save model.state_dict(), not the model object") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, zipfile.BadZipFile,
            TypeError, AttributeError, IndexError) as exc:
        raise XaiCompressError(f"{p}: not a readable torch.save file ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:120] if str(exc) else ''})") from None


def _refused_global(text: str) -> str:
    """The line of torch's weights_only message that names what it refused."""
    import re

    m = re.search(r"(?:Unsupported global|unsupported GLOBAL|Unsupported operand)[^\n]*", text)
    return m.group(0)[:160] if m else "not tensors"


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _find_state_dict(obj: Any, source: str) -> dict[str, Tensor]:
    if not isinstance(obj, Mapping):
        raise XaiCompressError(f"{source}: holds a {type(obj).__name__}, not a state dict "
                               "(a dict of tensor names to tensors)")
    if _is_tensor_dict(obj):
        return dict(obj)
    for key in STATE_KEYS:
        if _is_tensor_dict(obj.get(key)):
            return dict(obj[key])
    keys = [str(k)[:40] for k in list(obj)[:_SHOWN]]
    bad = next(((k, v) for k, v in obj.items() if not isinstance(v, Tensor)), None)
    what = f"; {str(bad[0])[:40]!r} is a {type(bad[1]).__name__}" if bad else ""
    raise XaiCompressError(f"{source}: no state dict found: the dict (keys {keys}"
                           f"{', ...' if len(obj) > _SHOWN else ''}) is not one of tensors{what}"
                           f", and has none under {', '.join(STATE_KEYS)}")


def _strip_prefixes(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def match_state_dict(model: nn.Module, sd: dict[str, Tensor], source: str,
                     spec: str) -> dict[str, Tensor]:
    """`sd` restricted to what `model` holds, after checking names and shapes: missing or
    unexpected keys and shape mismatches are one line listing the first few. A missing
    BatchNorm `num_batches_tracked` counter (older PyTorch) is taken from the model."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} {tuple(sd[k].shape)} (model: {tuple(v.shape)})"
              for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatch", shapes)):
            if items:
                more = f", ... ({len(items)} in all)" if len(items) > _SHOWN else ""
                parts.append(f"{label}: {', '.join(items[:_SHOWN])}{more}")
        raise XaiCompressError(f"{source}: does not fit --model {spec} ({'; '.join(parts)})")
    out = {k: sd.get(k, v) for k, v in expected.items()}
    return out
