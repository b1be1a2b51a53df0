"""One atomic writer for every file the project writes.

Write to a temporary file in the destination folder, fsync, then rename over the target,
so an interrupted run never leaves a half-written file and an existing file is never
damaged.

What is never touched: a destination that exists and is not a regular file (a device such
as /dev/null, a FIFO, a socket, a folder) is refused, never replaced; a symbolic link to a
regular file is written through (the link stays, its target gets the new content). The
temporary files have one unmistakable name, ``.xaicompress-<16 hex digits>.tmp``, so the
sweep after a killed run (`remove_stale_temps`) removes only files this tool created, and
the temporary name is short whatever the target's (a 255-byte target name still works).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from xaicompress.errors import XaiCompressError

TEMP_PREFIX = ".xaicompress-"
TEMP_SUFFIX = ".tmp"
#: exactly the names `_create_temp` makes; nothing else is ever swept
TEMP_NAME = re.compile(r"\.xaicompress-[0-9a-f]{16}\.tmp")

_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISDIR, "a folder"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Fail early, before any work, if `path` cannot be written; returns the path the
    write goes to (the target of a symbolic link to a regular file, else `path`)."""
    p = Path(path)
    if p.is_symlink():
        try:
            st = p.stat()
        except OSError:
            raise XaiCompressError(f"{p}: is a symbolic link to a missing file; refusing to "
                                   "replace the link") from None
        if not stat.S_ISREG(st.st_mode):
            raise XaiCompressError(f"{p}: is a symbolic link to {_kind(st.st_mode)}; refusing "
                                   "to replace it, expected a regular file path")
        p = Path(os.path.realpath(p))
    elif os.path.lexists(p):
        mode = p.lstat().st_mode
        if stat.S_ISDIR(mode):
            raise XaiCompressError(f"{p}: is a folder, expected a file path")
        if not stat.S_ISREG(mode):
            raise XaiCompressError(f"{p}: exists and is {_kind(mode)}; refusing to replace it, "
                                   "expected a regular file path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise XaiCompressError(f"{p}: output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise XaiCompressError(f"{p}: output folder {parent} is not writable")
    return p


Verify = Callable[[Path], None]

#: stacks of lists that `record_writes` hands out; every finished write is appended
_RECORDERS: list[list[Path]] = []


@contextlib.contextmanager
def record_writes() -> Iterator[list[Path]]:
    """Collect the paths of every file written atomically inside the block (in order)."""
    paths: list[Path] = []
    _RECORDERS.append(paths)
    try:
        yield paths
    finally:
        # by identity: two recorders holding equal lists are still different recorders
        del _RECORDERS[next(i for i, r in enumerate(_RECORDERS) if r is paths)]


def _create_temp(folder: Path) -> tuple[int, Path]:
    # O_EXCL: never opens a file that exists; mode 0o666 lets the umask decide, as open() does.
    for _ in range(100):
        tmp = folder / f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise XaiCompressError(f"{folder}: cannot create a temporary file")  # pragma: no cover


def _cannot_write(p: Path, exc: OSError) -> XaiCompressError:
    return XaiCompressError(f"{p}: cannot write ({exc.strerror or exc})")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", *,
                verify: Verify | None = None) -> Iterator[IO]:
    """Open a temporary file next to `path`; on success it replaces `path` atomically.

    verify: called with the temporary file's path after it is fsynced and before the
    rename; whatever it raises aborts the write (the temporary file is removed and `path`
    is left as it was). Writers use it to reload what they wrote and compare it with the
    in-memory object, so nothing the loader would refuse is ever renamed into place.
    An OSError (full disk, quota, I/O error) becomes a one-line `XaiCompressError` naming
    `path`; `path` is then unchanged.
    """
    if mode not in ("wb", "w"):
        raise ValueError("atomic_open supports 'wb' and 'w'")
    p = check_writable(path)
    if not _is_rank0():
        # Under torchrun only rank 0 writes; the other ranks compute the same bytes and
        # discard them, so every code path stays identical across ranks.
        yield io.BytesIO() if "b" in mode else io.StringIO()
        return
    try:
        fd, tmp = _create_temp(p.parent)
    except OSError as exc:
        raise _cannot_write(p, exc) from exc
    try:
        # Text: a non-UTF-8 file name (surrogate escapes) is written as \udcxx, not refused.
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8",
                       errors=None if "b" in mode else "backslashreplace") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)
        os.replace(tmp, p)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _cannot_write(p, exc) from exc
        raise
    _fsync_dir(p.parent)
    for paths in _RECORDERS:
        paths.append(p)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *,
                       verify: Verify | None = None) -> None:
    with atomic_open(path, "wb", verify=verify) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, *,
                      verify: Verify | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8", errors="backslashreplace"), verify=verify)


def atomic_save_figure(fig, path: str | os.PathLike[str], **kwargs) -> None:  # noqa: ANN001
    """Save a matplotlib figure atomically (format taken from the suffix)."""
    p = Path(path)
    fmt = p.suffix.lstrip(".") or "png"
    with atomic_open(p, "wb") as f:
        fig.savefig(f, format=fmt, **kwargs)


def remove_stale_temps(folder: str | os.PathLike[str]) -> int:
    """Delete the temporary files a killed run of this tool left in `folder` (a SIGKILL
    gives the writer no chance to clean up); returns how many were removed.

    Only regular files named exactly like `atomic_open`'s temporary files (`TEMP_NAME`) and
    owned by this user are removed; any other file, `.*.tmp` of the user's included, stays.
    """
    if not _is_rank0():
        return 0
    n = 0
    uid = os.getuid() if hasattr(os, "getuid") else None
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        if not TEMP_NAME.fullmatch(entry.name):
            continue
        with contextlib.suppress(OSError):
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or (uid is not None and st.st_uid != uid):
                continue
            os.unlink(entry.path)
            n += 1
    return n


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
