"""One atomic writer for every file the project writes.

Write to a temporary file in the destination folder, fsync, then rename over the target,
so an interrupted run never leaves a half-written file and an existing file is never
damaged.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from xaicompress.errors import XaiCompressError


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Fail early, before any work, if `path` cannot be written."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise XaiCompressError(f"{p}: output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise XaiCompressError(f"{p}: output folder {parent} is not writable")
    if p.is_dir():
        raise XaiCompressError(f"{p}: is a folder, expected a file path")
    return p


Verify = Callable[[Path], None]


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", *,
                verify: Verify | None = None) -> Iterator[IO]:
    """Open a temporary file next to `path`; on success it replaces `path` atomically.

    verify: called with the temporary file's path after it is fsynced and before the
    rename; whatever it raises aborts the write (the temporary file is removed and `path`
    is left as it was). Writers use it to reload what they wrote and compare it with the
    in-memory object, so nothing the loader would refuse is ever renamed into place.
    """
    if mode not in ("wb", "w"):
        raise ValueError("atomic_open supports 'wb' and 'w'")
    p = check_writable(path)
    if not _is_rank0():
        # Under torchrun only rank 0 writes; the other ranks compute the same bytes and
        # discard them, so every code path stays identical across ranks.
        yield io.BytesIO() if "b" in mode else io.StringIO()
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent or ".")
    # mkstemp creates 0600; give the file the permissions a plain open() would.
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(Path(tmp))
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(p.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *,
                       verify: Verify | None = None) -> None:
    with atomic_open(path, "wb", verify=verify) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, *,
                      verify: Verify | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), verify=verify)


def atomic_save_figure(fig, path: str | os.PathLike[str], **kwargs) -> None:  # noqa: ANN001
    """Save a matplotlib figure atomically (format taken from the suffix)."""
    p = Path(path)
    fmt = p.suffix.lstrip(".") or "png"
    with atomic_open(p, "wb") as f:
        fig.savefig(f, format=fmt, **kwargs)


def remove_stale_temps(folder: str | os.PathLike[str]) -> int:
    """Delete temporary files that a killed run left in `folder` (a SIGKILL gives the
    writer no chance to clean up); returns how many were removed."""
    if not _is_rank0():
        return 0
    n = 0
    for p in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    return n


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_rank0() -> bool:
    from xaicompress.distributed import is_rank0

    return is_rank0()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder if str(folder) else ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
