"""Rich progress bars for anything longer than a few seconds (quiet on rank != 0)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
console = Console(stderr=True)


def _enabled() -> bool:
    if os.environ.get("XAICOMPRESS_NO_PROGRESS") or not console.is_terminal:
        return False  # a bar in a log file or pipe is only noise
    from xaicompress.distributed import is_rank0

    return is_rank0()


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar on stderr (transient: it disappears when done)."""
    if not _enabled():
        yield from items
        return
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                  transient=True) as prog:
        task = prog.add_task(description, total=total)
        for item in items:
            yield item
            prog.advance(task)
