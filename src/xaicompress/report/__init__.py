"""Reports of a `compress` run: report.json / report.md, plots, and explanation fidelity."""

from xaicompress.report.fidelity import FidelityProbe, map_similarity
from xaicompress.report.report import build_report, layer_summary, report_markdown, summary_table

__all__ = ["FidelityProbe", "build_report", "layer_summary", "map_similarity",
           "report_markdown", "summary_table"]
