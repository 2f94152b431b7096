"""Run reports: `write_report(run_dir)` turns a `moleflow train` run directory into report.md
(+ figures/*.png) and a self-contained report.html.

`figures` holds reusable figure builders (heat map, grouped bar chart, ROC / PR curves, score
histograms, example strips) and `render` the markdown / HTML helpers (e.g. `table_markdown`), so
an ablation comparison can be built from the same parts.
"""

from .render import build_report, load_run, table_markdown, write_report

__all__ = ["build_report", "load_run", "table_markdown", "write_report"]
