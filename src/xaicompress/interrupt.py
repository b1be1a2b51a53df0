"""Ctrl-C (SIGINT) and SIGTERM: stop cleanly, say what was kept, exit 130 / 143.

The CLI installs `handle_signals()` around every command: either signal raises
`Interrupted` (a BaseException, like KeyboardInterrupt, so no `except Exception` swallows
it). The atomic writer removes its temporary file on the way out, so no half-written file
is left, and code that knows what survives (the pipeline: finished stages in OUT/cache)
adds that to `Interrupted.kept`. Inside `deferred()` a signal is only noted and raised
when the block ends: the pipeline writes its set of outputs (model files and the report
describing them) inside one, so a set is never half old, half new.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """Raised by SIGINT / SIGTERM while a command runs; exit code 128 + signal number."""

    def __init__(self, signum: int, kept: str | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.kept = kept

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


_state: dict[str, object] = {"defer": 0, "pending": None}


def _handler(signum: int, _frame: FrameType | None) -> None:
    if _state["defer"]:
        _state["pending"] = _state["pending"] or signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Turn SIGINT / SIGTERM into `Interrupted` inside the block (main thread only;
    elsewhere, e.g. in a test runner's worker thread, the block runs unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _state["pending"] = None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold a signal that arrives inside the block until the block has finished."""
    _state["defer"] = int(_state["defer"]) + 1  # type: ignore[call-overload]
    try:
        yield
    finally:
        _state["defer"] = int(_state["defer"]) - 1  # type: ignore[call-overload]
    pending = _state["pending"]
    if pending and not _state["defer"]:
        _state["pending"] = None
        raise Interrupted(int(pending))  # type: ignore[call-overload]
