"""A fingerprint of a dataset's content, for the pipeline's stage cache.

The cache must notice when the files behind `idx:DIR`, `cifar10:DIR` or `folder:DIR`
change, not only when the spec string does. The fingerprint is sha256 over the data's kind
and options and, for every file the loader read (sorted by its path relative to the data
folder): that path, its size and the sha256 of its content. Embedded data (mnist5k,
digits) ships with the installed packages and is fingerprinted by kind and options.

Hashing is cheap next to loading (a few hundred MB/s; CIFAR-10 in well under a second),
and a memo (`memo=`, a JSON file the pipeline keeps in OUT/cache) maps each file's path,
size, mtime, ctime and inode to its hash, so a rerun over an unchanged large image folder
stats the files instead of reading them. Any write to a file changes its ctime (which,
unlike the mtime, cannot be set back), so a changed file is always re-read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from xaicompress.data.bundle import DatasetBundle
from xaicompress.data.spec import parse_data_spec
from xaicompress.errors import XaiCompressError

_BLOCK = 1 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def _load_memo(memo: Path | None) -> dict[str, Any]:
    if memo is None or not memo.is_file():
        return {}
    try:
        data = json.loads(memo.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a damaged memo only costs a re-hash
    return data if isinstance(data, dict) else {}


def _save_memo(memo: Path, entries: dict[str, Any]) -> None:
    from xaicompress.atomic import atomic_write_text

    try:
        atomic_write_text(memo, json.dumps(entries, sort_keys=True) + "\n")
    except XaiCompressError:
        pass  # the memo is an optimisation; the fingerprint itself is already computed


def data_fingerprint(bundle: DatasetBundle, *, memo: Path | None = None) -> str:
    """sha256 hex of the data behind `bundle` (see module docstring)."""
    spec = parse_data_spec(bundle.spec)
    h = hashlib.sha256(json.dumps({"kind": spec.kind, "options": spec.options},
                                  sort_keys=True).encode())
    if not bundle.files:
        return h.hexdigest()
    old = _load_memo(memo)
    new: dict[str, Any] = {}
    root = bundle.root
    rows = []
    for path in bundle.files:
        try:
            st = os.stat(path)
            key = os.fsencode(os.path.abspath(path)).hex()
            stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
            cached = old.get(key)
            digest = cached[1] if isinstance(cached, list) and len(cached) == 2 and \
                cached[0] == stamp else file_sha256(path)
        except OSError as exc:
            raise XaiCompressError(f"{bundle.spec}: {path}: cannot read "
                                   f"({exc.strerror or exc})") from exc
        new[key] = [stamp, digest]
        rel = os.path.relpath(path, root) if root is not None else os.path.basename(path)
        rows.append((os.fsencode(rel).hex(), st.st_size, digest))
    for row in sorted(rows):
        h.update(json.dumps(row).encode())
    if memo is not None and new != {k: old.get(k) for k in new}:
        _save_memo(memo, new)
    return h.hexdigest()
