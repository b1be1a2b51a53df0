"""Entry point: `xaicompress COMMAND ...` (and `python -m xaicompress`).

User errors (`XaiCompressError`, bad options) become one line on stderr and exit code 2;
a traceback is shown only with `--debug`.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

import typer
from typer.exceptions import TyperException

from xaicompress.cli_app import DEBUG, app
from xaicompress.errors import XaiCompressError


def _load_commands() -> None:
    import xaicompress.commands as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"xaicompress.commands.{info.name}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (tests call this directly)."""
    _load_commands()
    from xaicompress.distributed import init_from_env, is_rank0, shutdown

    started = False
    try:
        started = init_from_env()
        if started and not is_rank0():
            # Under torchrun one terminal report is enough: rank 0's.
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        app(args=argv, standalone_mode=False)
    except XaiCompressError as exc:
        if DEBUG["on"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except TyperException as exc:
        msg = " ".join(exc.format_message().split())
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        if started:
            shutdown()
    return 0


def run() -> None:
    sys.exit(main())
