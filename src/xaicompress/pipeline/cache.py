"""The stage cache: every finished stage's checkpoint kept under OUT/cache/, keyed by what
produced it, so a rerun skips finished stages and an interrupted run resumes.

Key of stage i = sha256(key of stage i-1, the config of stage i and the report settings its
stored measurements depend on, its seed, the package version); key of the baseline =
sha256(model or input-checkpoint bytes, the data spec and a fingerprint of the data's
content (`xaicompress.data.fingerprint`: every file behind idx:DIR, cifar10:DIR or
folder:DIR, so changed files are noticed), training options, seed, package version). A key
thus covers the config of the stage and of every stage before it, and the input. Entries
are written atomically (a killed run leaves either the whole file or none) and carry their
measurements, so a cached rerun reports the very same numbers. A damaged entry is treated as
missing and recomputed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from xaicompress.atomic import atomic_write_bytes
from xaicompress.checkpoint import Checkpoint, checkpoint_bytes, checkpoint_from_bytes
from xaicompress.data.fingerprint import file_sha256 as file_hash  # noqa: F401 (re-export)
from xaicompress.errors import XaiCompressError
from xaicompress.version import __version__

#: bump when the meaning of a cache entry changes
#: 4: packed format 3 (sizes measured in it; share rounds biases to an int8 grid)
#: 5: pruning stages that do not fine-tune refit the cut layers by default (least squares)
CACHE_FORMAT = 5


def stable_hash(obj: Any) -> str:
    """sha256 hex of the canonical JSON of `obj` (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def baseline_key(source: dict[str, Any], data: dict[str, Any], train: dict[str, Any],
                 seed: int) -> str:
    """data: the spec and the content fingerprint of the data (see module docstring)."""
    return stable_hash({"format": CACHE_FORMAT, "version": __version__, "source": source,
                        "data": data, "train": train, "seed": seed})


def stage_key(previous: str, stage: dict[str, Any], seed: int) -> str:
    return stable_hash({"format": CACHE_FORMAT, "version": __version__, "previous": previous,
                        "stage": stage, "seed": seed})


class StageCache:
    """Checkpoints by key in one folder (`OUT/cache` by default; `compare` shares one)."""

    def __init__(self, folder: str | Path, *, model: str | None = None) -> None:
        """model: the factory the config names (trusted); entries naming another
        unregistered factory are refused like any file's."""
        self.folder = Path(folder)
        self.model = model

    def path(self, key: str, label: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)[:40]
        return self.folder / f"{safe}-{key[:20]}.safetensors"

    def load(self, key: str, label: str) -> Checkpoint | None:
        """The cached checkpoint, or None when absent or unreadable (then recomputed).

        Under torchrun rank 0 decides and every rank follows, so all ranks run the same
        stages (their collectives must line up); OUT must be on a filesystem all ranks see.
        """
        from xaicompress.distributed import broadcast_object, is_distributed, is_rank0

        if not is_distributed():
            return self._load(key, label)
        mine = self._load(key, label) if is_rank0() else None
        if not broadcast_object(mine is not None):
            return None
        return mine if mine is not None else self._load(key, label)

    def _load(self, key: str, label: str) -> Checkpoint | None:
        p = self.path(key, label)
        if not p.is_file():
            return None
        try:
            ckpt = checkpoint_from_bytes(p.read_bytes(), str(p), model=self.model)
        except (XaiCompressError, OSError):
            return None
        if ckpt.metrics.get("pipeline", {}).get("key") != key:
            return None
        return ckpt

    def save(self, ckpt: Checkpoint, key: str, label: str) -> bytes:
        """Write `ckpt` atomically under `key`; returns the bytes written."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise XaiCompressError(f"{self.folder}: cannot create the stage cache folder "
                                   f"({exc.strerror or exc})") from None
        raw = checkpoint_bytes(ckpt)
        atomic_write_bytes(self.path(key, label), raw)
        return raw
