"""One row of the bad-input corpus (shared by every table in tests/badinput/)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class Case:
    """A bad input run through the real CLI (`harness.check_case` runs it).

    args: the command line, a template where {ckpt} (a good checkpoint), {out} (an output
    path), {dir} (the case's folder) and {bad} (what `make` wrote) are filled in.
    needle: must appear in the one-line error message ({badname} = the bad file's name).
    make: (good checkpoint, folder) -> the bad input it wrote.
    kind: the class of bad input it belongs to (counted by benchmarks/robustness.py).
    code: the exit code expected (2: a user error).
    env: environment variables set for the run (e.g. WORLD_SIZE=abc).
    patch: (monkeypatch) -> None, for faults no file can cause (a full disk).
    """

    id: str
    args: tuple[str, ...]
    needle: str
    make: Callable[[Path, Path], Path] | None = None
    kind: str = "other"
    code: int = 2
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    patch: Callable[[Any], None] | None = None
