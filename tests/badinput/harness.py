"""The checks every bad-input case must pass, shared by all tables in tests/badinput/.

`check_case(case, good_ckpt, tmp_path, run_cli)` runs one `Case` through the real CLI, in
process, and asserts: the exit code; exactly one line on stderr that names the input (the
case's needle); no traceback; peak memory below 1 GiB more than before the call; no file
created, changed or deleted under the case's folder (contents and modes, links and FIFOs
included, never opened); the good checkpoint untouched; the payload marker never created.

Memory is bounded with RLIMIT_AS (address space) raised 1 GiB above the process's current
size around the call and restored afterwards: a bomb that tries to allocate more gets a
MemoryError (exit 1) instead of its clean error, and the case fails. In process this costs
nothing; a subprocess per case would cost a second each.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.badinput import makers
from tests.badinput.case import Case

GIB = 1 << 30


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """relative path -> (st_mode, what): sha256 of a regular file's bytes, a link's target,
    '' for folders and special files (never opened: a FIFO would block)."""
    out: dict[str, tuple[int, str]] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            p = Path(folder) / name
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                what = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                what = ""
            out[str(p.relative_to(root))] = (st.st_mode, what)
    return out


def _vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


@contextlib.contextmanager
def memory_limit(extra: int = GIB) -> Iterator[None]:
    """Allow the process at most `extra` more bytes of address space inside the block."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_bytes() + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def fill(case: Case, good_ckpt: Path, tmp_path: Path) -> tuple[list[str], Path]:
    """The case's command line with its placeholders filled, and the bad input it made."""
    bad = case.make(good_ckpt, tmp_path) if case.make else tmp_path / "unused"
    values = {"ckpt": str(good_ckpt), "out": str(tmp_path / "out.safetensors"),
              "dir": str(tmp_path), "bad": str(bad)}
    return [a.format(**values) for a in case.args], bad


def check_case(case: Case, good_ckpt: Path, tmp_path: Path, run_cli: Any,
               monkeypatch: Any = None) -> str:
    """Run `case` and assert everything the module docstring lists; returns the message."""
    args, bad = fill(case, good_ckpt, tmp_path)
    before = snapshot(tmp_path)
    ckpt_before = snapshot(good_ckpt.parent)
    with contextlib.ExitStack() as stack:
        if case.env or case.patch:
            assert monkeypatch is not None, f"{case.id}: needs the monkeypatch fixture"
            for k, v in case.env.items():
                monkeypatch.setenv(k, v)
            if case.patch:
                case.patch(monkeypatch)
            stack.callback(monkeypatch.undo)
        with memory_limit():
            code, stdout, err = run_cli(*args)
    assert code == case.code, f"{case.id}: exit {code}, stderr: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"{case.id}: {err}"
    assert "Traceback" not in err and "Traceback" not in stdout, case.id
    needle = case.needle.format(badname=Path(bad).name)
    assert needle in lines[0], f"{case.id}: {needle!r} not in {lines[0]!r}"
    after = snapshot(tmp_path)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"{case.id}: files created, changed or deleted: {changed[:5]}"
    assert snapshot(good_ckpt.parent) == ckpt_before, f"{case.id}: the good checkpoint changed"
    assert not (tmp_path / makers.MARKER).exists(), f"{case.id}: the payload ran"
    return lines[0]
