"""The Typer app and the options every command shares.

Commands live in `xaicompress/commands/<name>.py`, one module each, and register on `app`.
The CLI is thin: it parses, calls the library, prints.
"""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(
    name="xaicompress",
    help="Compress PyTorch image classifiers with explainable AI (DeepLIFT relevance).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed; same seed, same numbers.")]
DataOpt = Annotated[str, typer.Option("--data", help="Dataset spec: mnist5k, digits, idx:DIR, "
                                      "cifar10:DIR, cifar100:DIR, folder:DIR.")]
TrustOpt = Annotated[str | None, typer.Option(
    "--model", help="The model factory (package.module:factory) a checkpoint of your own "
    "model names. Needed only for unregistered models: running that code is your decision, "
    "never a file's.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

#: set by the --debug flag of the main callback
DEBUG = {"on": False}


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of user "
                                              "errors.")] = False) -> None:
    DEBUG["on"] = debug
