from __future__ import annotations

import os
from typing import Annotated, Any

import typer
from rich.console import Console

from xaicompress.cli_app import (
    MAX_SEED,
    JsonOpt,
    app,
    model_options,
    runtime_options,
    validate_options,
)
from xaicompress.pipeline import load_config, run_pipeline
from xaicompress.pipeline.config import RunOptions
from xaicompress.report import summary_table

ConfigOpt = Annotated[str, typer.Option("--config", help="Pipeline config (YAML), e.g. "
                                        "configs/lenet5-mnist.yaml.")]
SeedOverride = Annotated[int | None, typer.Option("--seed", min=0, max=MAX_SEED, help="Random seed "
                                                  "(default: the config's); same seed, same "
                                                  "numbers.")]


def _echo(msg: str) -> None:
    from xaicompress.progress import console

    if not os.environ.get("XAICOMPRESS_NO_PROGRESS"):
        console.print(f"[dim]{msg}[/dim]")


@app.command("compress")
@runtime_options(enter=False)
@model_options({None: RunOptions}, panel="Run options (override the config's)")
def compress_cmd(
    config: ConfigOpt,
    out: Annotated[str, typer.Option("--out", help="Output folder (created with its parents). "
                                     "Finished stages are cached in OUT/cache.")],
    runtime: dict[str, Any],
    seed: SeedOverride = None,
    as_json: JsonOpt = False,
    *,
    options: dict,
) -> None:
    """Run a config's stages (cached) and write the packed model, ONNX and a report."""
    run_compress(config, out, seed=seed, as_json=as_json, runtime=runtime, options=options)


def run_compress(config: str, out: str, *, seed: int | None = None, as_json: bool = False,
                 runtime: dict[str, Any] | None = None, options: dict | None = None) -> None:
    """`compress` (also `demo`): the config, with the --seed, device options (`runtime`) and
    run options (`options`, `RunOptions` fields) typed on the command line laid over it."""
    cfg = load_config(config)
    if seed is not None:
        cfg = cfg.with_seed(seed)
    if runtime:
        cfg = cfg.model_copy(update=runtime)
    if options:
        cfg = cfg.with_run_options(validate_options(RunOptions, options, command="compress"))
    res = run_pipeline(cfg, out, echo=_echo)
    if as_json:
        from xaicompress.report.report import report_json

        print(report_json(res.report), end="")
        return
    # Piped output has no terminal width: give the table room instead of wrapping cells.
    con = Console() if Console().is_terminal else Console(width=140)
    con.print(summary_table(res.report))
    done = sum(not c for c in res.cached)
    con.print(f"{done} step(s) computed, {len(res.cached) - done} from cache, "
              f"{res.seconds:.1f} s -> {res.out_dir}/ (report.md, report.json, "
              f"{', '.join(p.name for k, p in res.files.items() if k in ('packed', 'onnx'))})")
