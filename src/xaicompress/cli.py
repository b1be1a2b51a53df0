"""Entry point: `xaicompress COMMAND ...` (and `python -m xaicompress`).

User errors (`XaiCompressError`, bad options, an OSError the specific checks missed) become
one line on stderr and exit code 2; a traceback is shown only with `--debug`. SIGINT and
SIGTERM stop the command with exit code 130 / 143 and one line saying what was kept.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from pathlib import Path

import typer
from typer.exceptions import TyperException

from xaicompress.atomic import record_writes
from xaicompress.cli_app import DEBUG, app
from xaicompress.errors import XaiCompressError
from xaicompress.interrupt import Interrupted, handle_signals


def _load_commands() -> None:
    import xaicompress.commands as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"xaicompress.commands.{info.name}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (tests call this directly)."""
    _load_commands()
    for stream in (sys.stdout, sys.stderr):
        # A non-UTF-8 file name (surrogate escapes) is printed as \xNN, never a crash.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    with handle_signals(), record_writes() as written:
        return _run(argv, written)


def _run(argv: list[str] | None, written: list[Path]) -> int:
    from xaicompress.distributed import init_from_env, is_rank0, shutdown

    started = False
    try:
        started = init_from_env()
        if started and not is_rank0():
            # Under torchrun one terminal report is enough: rank 0's.
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        app(args=argv, standalone_mode=False)
    except XaiCompressError as exc:
        return _fail(exc, str(exc))
    except typer.Exit as exc:
        return exc.exit_code
    except TyperException as exc:
        return _fail(exc, " ".join(exc.format_message().split()))
    except Interrupted as exc:
        print(f"error: interrupted by {exc.signal_name}; {exc.kept or _kept(written)}",
              file=sys.stderr)
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print(f"error: interrupted; {_kept(written)}", file=sys.stderr)
        return 130
    except OSError as exc:  # anything the specific checks missed: still one line
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(exc, f"{where}{exc.strerror or exc}")
    except MemoryError as exc:
        return _fail(exc, "out of memory: the input needs more memory than this machine "
                     "has", code=1)
    finally:
        if started:
            shutdown()
    return 0


def _fail(exc: BaseException, message: str, code: int = 2) -> int:
    if DEBUG["on"]:
        raise exc
    print(f"error: {message}", file=sys.stderr)
    return code


def _kept(written: list[Path]) -> str:
    if not written:
        return "no file was written"
    names = ", ".join(str(p) for p in written[:3]) + (", ..." if len(written) > 3 else "")
    return f"{len(written)} complete file(s) written before it were kept ({names})"


def run() -> None:
    sys.exit(main())
