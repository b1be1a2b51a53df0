from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from xaicompress.cli_app import JsonOpt, app, runtime_options
from xaicompress.commands.compress import ConfigOpt, _echo
from xaicompress.pipeline import load_config, run_compare
from xaicompress.pipeline.compare import parse_list, pm
from xaicompress.report.report import report_json


@app.command("compare")
@runtime_options(enter=False)
def compare_cmd(
    config: ConfigOpt,
    runtime: dict[str, Any],
    criteria: Annotated[str, typer.Option("--criteria", help="Comma-separated criteria, each "
                                          "substituted into every stage that has one (at most "
                                          "100).")]
    = "deeplift,l1,taylor,random",
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds, each "
                                       "0..2147483647 (at most 100).")] = "0,1,2",
    out: Annotated[str, typer.Option("--out", help="Output folder (created with its "
                                     "parents).")] = "xaicompress-compare",
    as_json: JsonOpt = False,
) -> None:
    """Run the same pipeline once per criterion and seed; table of mean ± std."""
    crit_list = parse_list(criteria, "--criteria")
    seed_list = parse_list(seeds, "--seeds", int)
    cfg = load_config(config).model_copy(update=runtime)
    result = run_compare(cfg, crit_list, seed_list, out, echo=_echo)
    if as_json:
        print(report_json(result["summary"]), end="")
        return
    t = Table(title=f"{result['title']}: mean ± std over seeds {seeds}")
    for c in ("criterion", "accuracy %", "drop pt", "packed KB", "x smaller", "cosine",
              "agree %"):
        t.add_column(c, justify="left" if c == "criterion" else "right")
    for crit, s in result["summary"].items():
        t.add_row(crit, pm(s["accuracy"]), pm(s["accuracy_drop"]), pm(s["size_kb"]),
                  pm(s["compression_ratio"], 1), pm(s["cosine"], 3), pm(s["agreement"], 1))
    con = Console()
    con.print(t)
    con.print(f"-> {out}/compare.md, compare.json, compare.png")
