"""One row of the bad-input corpus (shared by every table in tests/badinput/)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Case:
    """A bad input run through the real CLI.

    args: the command line, a template where {ckpt} (a good checkpoint), {out} (an output
    path), {dir} (the case's folder) and {bad} (what `make` wrote) are filled in.
    needle: must appear in the one-line error message ({badname} = the bad file's name).
    make: (good checkpoint, folder) -> the bad input it wrote.
    """

    id: str
    args: tuple[str, ...]
    needle: str
    make: Callable[[Path, Path], Path] | None = None
