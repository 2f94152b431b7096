"""Build the run report: read a run directory, assemble sections, write markdown and HTML.

The report is first assembled as a list of simple blocks (`Heading`, `Para`, `Bullets`, `Table`,
`Image`, `Code`); the same blocks are then rendered to markdown (figures as ``figures/<name>.png``
files) and to one self-contained HTML file (figures as base64 data URIs, inline CSS, no scripts).
Inline markup inside text is a small markdown subset: ``**bold**``, ``*italic*`` and ```code```.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MoleflowError
from ..metrics import METRIC_LABELS, mean_metrics
from ..store.atomic import atomic_write_bytes, atomic_write_text
from ..store.run import SCORE_COLUMNS, VERDICT_STORE_FILE
from . import figures as F
from .blocks import Block, Bullets, Code, Heading, Image, Para, Table
from .line import line_section, read_line

__all__ = [
    "METRIC_LABELS",
    "RunData",
    "build_report",
    "fmt_pct",
    "load_run",
    "render_html",
    "render_markdown",
    "table_markdown",
    "write_report",
]

DEFAULT_METRICS = list(METRIC_LABELS)
EXAMPLE_KEYS = ("images", "maps", "masks", "scores", "labels", "kinds", "files")
KIND_LABELS = {"detected": "detected", "missed": "missed", "false_alarm": "false alarm", "normal": "normal"}
#: Examples per group (best / worst) in a class strip.
PER_GROUP = 4


# ---------------------------------------------------------------------------------------------
# Formatting


def _finite(v: Any) -> bool:
    """True for a real, finite number (None, NaN, strings and bools are not)."""
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) and math.isfinite(v)


def fmt_pct(v: Any, digits: int = 1) -> str:
    """A fraction as a percentage with `digits` decimals; "n/a" when missing or not finite."""
    return f"{100 * float(v):.{digits}f}" if _finite(v) else "n/a"


def fmt_pp(v: Any) -> str:
    """A signed difference of fractions in percentage points; "n/a" when missing."""
    return f"{100 * float(v):+.1f} pp" if _finite(v) else "n/a"


def fmt_num(v: Any, spec: str = ".4g") -> str:
    """A number with format `spec`; "n/a" when missing or not finite."""
    return format(float(v), spec) if _finite(v) else "n/a"


def fmt_count(k: int, n: int) -> str:
    """"k / n (p%)", or "–" when n is 0."""
    return f"{k} / {n} ({100 * k / n:.1f}%)" if n else "–"


def md_escape(text: Any) -> str:
    """Escape user text for markdown (and for this module's inline-HTML converter)."""
    return re.sub(r"([\\`*|\[\]<>])", r"\\\1", str(text))


def md_code(text: Any) -> str:
    """A markdown code span for arbitrary text (backticks in it are replaced by quotes)."""
    return "`" + str(text).replace("`", "'").replace("\n", " ") + "`"


def table_markdown(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None,
                   bold_rows: Iterable[int] = ()) -> str:
    """A GitHub-flavoured markdown table. `align`: one of "l", "r", "c" per column (default: first
    column left, others right). Cells are used as given (already formatted / escaped); pipes are
    escaped. Rows in `bold_rows` are set in bold."""
    align = align or ("l" + "r" * (len(headers) - 1))
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    bold = set(bold_rows)

    def cell(v: Any, strong: bool) -> str:
        s = str(v).replace("|", "\\|").replace("\n", " ")
        return f"**{s}**" if strong and s else s

    lines = ["| " + " | ".join(cell(h, False) for h in headers) + " |",
             "| " + " | ".join(marks[a] for a in align) + " |"]
    lines += ["| " + " | ".join(cell(v, i in bold) for v in row) + " |" for i, row in enumerate(rows)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Blocks and rendering



_INLINE = re.compile(r"\\(?P<esc>[\\`*|\[\]<>_#])|`(?P<code>[^`]+)`|\*\*(?P<bold>.+?)\*\*|\*(?P<em>[^*]+?)\*")


def inline_html(text: str) -> str:
    """Convert this module's inline markdown subset to escaped HTML."""
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos:m.start()]))
        if m.group("esc") is not None:
            out.append(html.escape(m.group("esc")))
        elif m.group("code") is not None:
            out.append(f"<code>{html.escape(m.group('code'))}</code>")
        elif m.group("bold") is not None:
            out.append(f"<strong>{inline_html(m.group('bold'))}</strong>")
        else:
            out.append(f"<em>{inline_html(m.group('em'))}</em>")
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def render_markdown(blocks: Sequence[Block], figure_dir: str = "figures") -> str:
    """Markdown for `blocks`; images are referenced as ``<figure_dir>/<name>.png``."""
    parts = []
    for b in blocks:
        if isinstance(b, Heading):
            parts.append("#" * b.level + " " + b.text)
        elif isinstance(b, Para):
            parts.append(b.text)
        elif isinstance(b, Bullets):
            parts.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, Table):
            parts.append(table_markdown(b.headers, b.rows, b.align, b.bold_rows))
        elif isinstance(b, Image):
            caption = f"*{b.caption}*" if "*" not in b.caption else b.caption
            parts.append(f"![{md_escape(b.name)}]({figure_dir}/{b.name}.png)\n\n{caption}")
        elif isinstance(b, Code):
            parts.append(f"```{b.lang}\n{b.text.rstrip()}\n```")
    return "\n\n".join(parts) + "\n"


_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;max-width:1400px;
margin:2em auto;padding:0 1.2em;color:#222;line-height:1.45;font-size:15px}
h1{border-bottom:2px solid #345;padding-bottom:.25em}h2{border-bottom:1px solid #ccd;margin-top:1.8em}
h3{margin-top:1.4em}code{background:#f2f3f5;padding:1px 4px;border-radius:3px;font-size:90%}
pre{background:#f6f7f9;padding:.8em;overflow-x:auto;border:1px solid #e1e4e8;border-radius:4px;font-size:12px}
pre code{background:none;padding:0}
table{border-collapse:collapse;margin:.8em 0;font-size:13.5px}
th,td{border:1px solid #d5d8dc;padding:4px 9px}th{background:#eef1f5}
tr:nth-child(even) td{background:#fafbfc}td.r,th.r{text-align:right;font-variant-numeric:tabular-nums}
td.c,th.c{text-align:center}tr.bold td{font-weight:bold;background:#eef3ea}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:13px;color:#555;margin-top:.3em}p.small{font-size:13px;color:#555}
ul{padding-left:1.4em}
"""


def _html_table(t: Table) -> str:
    """One HTML table with right-aligned numeric columns and bold rows."""
    align = t.align or ("l" + "r" * (len(t.headers) - 1))
    cls = {"l": "", "r": ' class="r"', "c": ' class="c"'}
    head = "".join(f"<th{cls[a]}>{inline_html(h)}</th>" for h, a in zip(t.headers, align))
    body = []
    bold = set(t.bold_rows)
    for i, row in enumerate(t.rows):
        cells = "".join(f"<td{cls[a]}>{inline_html(str(v))}</td>" for v, a in zip(row, align))
        body.append(f'<tr class="bold">{cells}</tr>' if i in bold else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(blocks: Sequence[Block], title: str) -> str:
    """One self-contained HTML page: inline CSS, figures embedded as PNG data URIs, no scripts."""
    parts = []
    for b in blocks:
        if isinstance(b, Heading):
            anchor = f' id="{html.escape(b.anchor)}"' if b.anchor else ""
            parts.append(f"<h{b.level}{anchor}>{inline_html(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            cls = ' class="small"' if b.small else ""
            parts.append(f"<p{cls}>{inline_html(b.text)}</p>")
        elif isinstance(b, Bullets):
            parts.append("<ul>" + "".join(f"<li>{inline_html(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            parts.append(_html_table(b))
        elif isinstance(b, Image):
            data = base64.b64encode(b.png).decode("ascii")
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b.name)}">'
                         f"<figcaption>{inline_html(b.caption)}</figcaption></figure>")
        elif isinstance(b, Code):
            parts.append(f"<pre><code>{html.escape(b.text.rstrip())}</code></pre>")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n"
            f"</body>\n</html>\n")


# ---------------------------------------------------------------------------------------------
# Reading a run directory


@dataclass
class RunData:
    """Everything the report needs from a run directory (optional parts may be empty)."""

    run_dir: Path
    results: dict[str, Any]
    scores: dict[str, dict[str, np.ndarray]]
    examples: dict[str, dict[str, np.ndarray]]
    notes: list[str] = field(default_factory=list)
    line: dict[str, Any] | None = None  # the verdict store's review summary (`line.read_line`), if the run has one

    @property
    def classes(self) -> list[str]:
        """Classes in learning order (dataset.classes, else the keys of `final`)."""
        ds = self.results.get("dataset") or {}
        return list(ds.get("classes") or (self.results.get("final") or {}).keys())

    @property
    def metrics(self) -> list[str]:
        """Metric keys in the run's order."""
        return list(self.results.get("metrics") or DEFAULT_METRICS)

    def first_step(self, cls: str) -> int | None:
        """Index of the step that learned `cls`."""
        for j, step in enumerate(self.results.get("steps") or []):
            if cls in (step.get("classes") or []):
                return j
        return None

    def threshold(self, cls: str) -> float | None:
        """Decision threshold of the expert that learned `cls` (None if unknown)."""
        j = self.first_step(cls)
        experts = [] if j is None else step_experts(self.results["steps"][j])
        thr = next((e.get("threshold") for e in experts if cls in (e.get("classes") or [])), None)
        return float(thr) if _finite(thr) else None


def step_experts(step: dict) -> list[dict]:
    """The experts a results.json step learned (name, classes, threshold, calibration, ...); results written
    before steps could hold several experts have one, described by the step itself."""
    if "experts" in step:
        return list(step["experts"])
    return [{"name": step.get("task_name"), "classes": step.get("classes") or [], "threshold": step.get("threshold"),
             "calibration": step.get("calibration") or {}, "skipped_batches": step.get("skipped_batches")}]


def read_scores(path: Path) -> dict[str, np.ndarray]:
    """One scores CSV as column arrays (numeric columns as numbers)."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("file", "label", "score") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"missing columns {missing}")
        rows = list(reader)
    cols: dict[str, np.ndarray] = {}
    for name in SCORE_COLUMNS:
        raw = [r.get(name, "") or "" for r in rows]
        if name == "score":
            cols[name] = np.array([float(v) for v in raw], dtype=float)
        elif name in ("label", "routed_task", "known", "anomalous"):
            cols[name] = np.array([int(float(v)) if v.strip() else -1 for v in raw], dtype=int)
        else:
            cols[name] = np.array(raw, dtype=str)
    return cols


def read_examples(path: Path) -> dict[str, np.ndarray]:
    """One examples npz (no pickles) with shapes checked."""
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("images", "maps", "kinds") if k not in z.files]
        if missing:
            raise ValueError(f"missing keys {missing}")
        ex = {k: z[k] for k in EXAMPLE_KEYS if k in z.files}
    n = len(ex["images"])
    if ex["images"].ndim != 4 or ex["maps"].shape[:1] != (n,) or len(ex["kinds"]) != n:
        raise ValueError(f"inconsistent shapes images {ex['images'].shape} maps {ex['maps'].shape}")
    return ex


def load_run(run_dir: Path | str, audit_rate: float | None = None, store: str | None = None) -> RunData:
    """Read results.json (required), scores/*.csv and examples/*.npz (optional), and the verdict store's reviews
    (`store`, default RUN/verdicts.sqlite if there is one; `audit_rate`: the review queue's, default
    `feedback.AUDIT_RATE`)."""
    run_dir = Path(run_dir)
    path = run_dir / "results.json"
    if not path.is_file():
        raise MoleflowError(f"{path} not found: pass the run directory written by `moleflow train`")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MoleflowError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(results, dict):
        raise MoleflowError(f"{path} does not hold a JSON object")
    run = RunData(run_dir, results, {}, {})
    for cls in run.classes:
        for sub, ext, reader, into in (("scores", "csv", read_scores, run.scores),
                                       ("examples", "npz", read_examples, run.examples)):
            p = run_dir / sub / f"{cls}.{ext}"
            if not p.is_file():
                continue
            try:
                into[cls] = reader(p)
            except (OSError, ValueError, KeyError) as exc:
                run.notes.append(f"{sub}/{cls}.{ext} could not be read ({exc}); left out.")
    try:
        run.line = read_line(run_dir, audit_rate, store)
    except MoleflowError as exc:
        run.notes.append(f"the verdict store could not be read ({exc}); the 'On the line' section is left out.")
    return run


# ---------------------------------------------------------------------------------------------
# Sections


def _metric_label(key: str) -> str:
    return METRIC_LABELS.get(key, key)


def _task_order(run: RunData) -> str:
    tasks = (run.results.get("dataset") or {}).get("tasks") or [[c] for c in run.classes]
    return " → ".join(f"{i + 1}. " + " + ".join(md_escape(c) for c in t) for i, t in enumerate(tasks))


def _header(run: RunData, title: str) -> list[Block]:
    """Title and the run's identity: date, command, backbone, preset, data, task order, seed."""
    r = run.results
    cfg = r.get("config") or {}
    bb = r.get("backbone") or {}
    ds = r.get("dataset") or {}
    data_cfg = cfg.get("data") or {}
    sha = str(bb.get("weights_sha256") or "")
    backbone = md_escape(bb.get("name") or (cfg.get("backbone") or {}).get("name") or "n/a")
    if sha:
        backbone += f" (weights {md_code(sha[:12])}"
        backbone += f", {md_escape(bb['weights_source'])})" if bb.get("weights_source") else ")"
    items = [
        f"**Date:** {md_escape(r.get('created') or 'n/a')}",
        f"**Command:** {md_code(r.get('command') or 'n/a')}",
        f"**Backbone:** {backbone}",
        f"**Preset:** {md_escape(cfg.get('preset') or 'n/a')}; image size "
        f"{md_escape(data_cfg.get('image_size', 'n/a'))} px ({md_escape(data_cfg.get('resize_mode', 'n/a'))}"
        + (", elongated images cut into near-square tiles" if data_cfg.get("tiling") == "aspect" else "") + ")",
        f"**Evaluation resolution:** pixel metrics on {md_escape(data_cfg.get('image_size', 'n/a'))} x "
        f"{md_escape(data_cfg.get('image_size', 'n/a'))} maps and masks, each the whole image resized "
        f"({md_escape(data_cfg.get('resize_mode', 'n/a'))})",
        f"**Features and scores:** {md_escape((cfg.get('backbone') or {}).get('feature_merge', 'mean'))} of the "
        f"backbone layers; patch score from {md_escape((cfg.get('score') or {}).get('source', 'flow'))}",
        f"**Data:** {md_escape(ds.get('name') or 'n/a')} at {md_code(ds.get('root') or 'n/a')}, "
        f"{len(run.classes)} products, scenario {md_code(ds.get('scenario') or 'n/a')}",
        f"**Task order:** {_task_order(run)}",
        f"**Seed:** {md_escape(r.get('seed', 'n/a'))}",
        f"**moleflow:** {md_escape(r.get('moleflow_version') or 'n/a')}; run directory {md_code(run.run_dir.name)}",
    ]
    return [Heading(1, md_escape(title)), Bullets(items)]


def _protocol() -> list[Block]:
    """The "how to read this" paragraph."""
    return [Heading(2, "How to read this", "protocol"), Bullets([
        "**Task-agnostic evaluation.** One model has learned the products one after another (no "
        "replay of old data). At test time it is *not* told which product an image shows: the "
        "router picks the task, and an image routed to the wrong product is scored by that "
        "product's expert, so routing errors count in every metric.",
        "**Final results** are measured after the last task. All numbers are percentages (higher is "
        "better); *n/a* means the metric cannot be computed (e.g. no ground-truth masks).",
        "**Image metrics** (I-AUROC, I-AP, I-F1max) rank the image scores; **pixel metrics** "
        "(P-AUROC, P-AP, AUPRO up to 30% FPR) use the anomaly maps at the model's input size.",
        "**Decisions** (flagged / passed) use thresholds calibrated on held-out *normal training* "
        "images only, at a target false-alarm rate; test data never sets a threshold.",
        "**Forgetting.** `R[j,i]` is the metric of task i after learning step j (T steps; when a "
        "task holds several products, i runs over products and `R[i,i]` is read at the step that "
        "learned the product). "
        "`BWT = mean over i < T-1 of (R[T-1,i] - R[i,i])` (negative = forgetting); "
        "`FM = mean over i < T-1 of (max over j in [i, T-2] of R[j,i] - R[T-1,i])` (0 = no "
        "forgetting). Both are in percentage points (pp).",
        "**Oracle** results give the model the true task (no router): the routed-vs-oracle gap is "
        "what routing costs.",
    ])]


def _summary(run: RunData) -> list[Block]:
    """One sentence with the headline numbers."""
    mean = run.results.get("final_mean") or {}
    cont = run.results.get("continual") or {}
    def pct(key: str) -> str:
        text = fmt_pct(mean.get(key))
        return f"**{text}%**" if text != "n/a" else "n/a"

    parts = [f"mean image AUROC {pct('image_auroc')}", f"pixel AUROC {pct('pixel_auroc')}",
             f"AUPRO {pct('aupro')}", f"routing accuracy {pct('routing_accuracy')}"]
    bwt = (cont.get("image_auroc") or {}).get("bwt")
    if _finite(bwt):
        parts.append(f"image-AUROC BWT **{fmt_pp(bwt)}**")
    text = (f"After learning {len(run.results.get('steps') or [])} task(s) covering "
            f"{len(run.classes)} product(s): " + ", ".join(parts) + ".")
    return [Heading(2, "At a glance", "summary"), Para(text)]


def _final_section(run: RunData) -> list[Block]:
    """Per-class final table with a bold mean row, and the routed-vs-oracle gap."""
    r = run.results
    final = r.get("final") or {}
    metrics = run.metrics
    headers = ["Product"] + [_metric_label(m) for m in metrics] + ["Test images (anomalous)"]
    rows = []
    for cls in run.classes:
        res = final.get(cls) or {}
        n = f"{res['n_test']} ({res.get('n_anomalous', '?')})" if "n_test" in res else "n/a"
        rows.append([md_escape(cls)] + [fmt_pct(res.get(m)) for m in metrics] + [n])
    mean = r.get("final_mean") or mean_metrics(final, metrics)
    rows.append(["Mean"] + [fmt_pct(mean.get(m)) for m in metrics] + [""])
    blocks: list[Block] = [Heading(2, "Final results per product (task-agnostic)", "final"),
                           Table(headers, rows, bold_rows=[len(rows) - 1]),
                           Para("Mean = unweighted mean over the products that have a value.", small=True)]
    oracle_mean = r.get("oracle_mean") or (mean_metrics(r["oracle"], metrics) if r.get("oracle") else None)
    blocks.append(Heading(3, "Routed vs oracle (mean over products)"))
    if not oracle_mean:
        blocks.append(Para("No oracle evaluation in this run."))
        return blocks
    gap_metrics = [m for m in metrics if m != "routing_accuracy"]
    gap_rows = [[_metric_label(m), fmt_pct(mean.get(m)), fmt_pct(oracle_mean.get(m)),
                 fmt_pp(mean[m] - oracle_mean[m]) if _finite(mean.get(m)) and _finite(oracle_mean.get(m)) else "n/a"]
                for m in gap_metrics]
    blocks.append(Table(["Metric", "Routed", "Oracle (true task)", "Gap"], gap_rows))
    blocks.append(Image("routed_vs_oracle", F.bar_chart(
        [_metric_label(m) for m in gap_metrics],
        {"routed": [mean.get(m) for m in gap_metrics], "oracle": [oracle_mean.get(m) for m in gap_metrics]},
        title="Routed (task-agnostic) vs oracle (true task), mean over products", ylabel="metric"),
        "Mean metrics with the router's choice vs with the true task; the difference is the cost of routing."))
    return blocks


def _defect_type_section(run: RunData) -> list[Block]:
    """Final image AUROC of each defect type (its anomalous images vs all normal images of the product)."""
    final = run.results.get("final") or {}
    rows = []
    for cls in run.classes:
        res = final.get(cls) or {}
        per_type = res.get("per_defect_image_auroc")
        if not isinstance(per_type, dict):
            continue
        counts = res.get("per_defect_count") or {}
        for t in sorted(per_type):
            rows.append([md_escape(cls), md_escape(t), str(counts.get(t, "n/a")), fmt_pct(per_type[t])])
    if not rows:
        return []
    return [Heading(2, "Image AUROC per defect type", "defect_types"),
            Table(["Product", "Defect type", "Anomalous images", "I-AUROC"], rows, align="llrr"),
            Para("Each defect type's anomalous test images ranked against all normal test images of the "
                 "product (task-agnostic, after the last task); n/a = no normal test image.", small=True)]


def _decision_section(run: RunData) -> list[Block]:
    """False alarms / detections at the calibrated thresholds, from the per-image CSVs."""
    if not run.scores:
        return []
    rows = []
    for cls in run.classes:
        s = run.scores.get(cls)
        if s is None:
            continue
        normal, anomalous = s["label"] == 0, s["label"] == 1
        flagged = s["anomalous"] == 1
        rows.append([md_escape(cls), fmt_count(int((flagged & normal).sum()), int(normal.sum())),
                     fmt_count(int((flagged & anomalous).sum()), int(anomalous.sum())),
                     fmt_count(int((~flagged & anomalous).sum()), int(anomalous.sum())),
                     fmt_count(int((s["known"] == 0).sum()), len(s["known"]))])
    blocks: list[Block] = [
        Heading(2, "Decisions at the calibrated thresholds", "decisions"),
        Table(["Product", "False alarms (normal flagged)", "Detected (anomalous flagged)",
               "Missed (anomalous passed)", "Flagged as unknown product"], rows),
        Para("Counts over the test images of each product, using the decision of the task the router "
             "chose; thresholds come from held-out normal training images only.", small=True)]
    thresholds = run.results.get("thresholds") or {}
    if thresholds:
        def interval(v: dict) -> str:
            low_high = v.get("interval")
            return "n/a" if not low_high else f"{fmt_pct(low_high[0])} – {fmt_pct(low_high[1])}"

        rows = [[md_escape(name), f"{v['threshold']:.4g}", str(v.get("n")), fmt_pct(v.get("requested")),
                 fmt_pct(v.get("supported")), interval(v), fmt_pct(v.get("realised")), str(v.get("good_test_images"))]
                for name, v in thresholds.items()]
        blocks.append(Table(["Product", "Threshold", "Calibration images", "False alarms asked (%)",
                             "Smallest rate they support (%)", "95 % interval (%)",
                             "Realised on good test images (%)", "good test images"], rows))
        blocks.append(Para("Thresholds are the split-conformal order statistic of held-out normal training "
                           "scores: a new good part is flagged with probability at most max(asked, supported); "
                           "the interval is where this threshold's realised rate lies with 95 % probability "
                           "given its calibration images. Realised: good test images of the product flagged "
                           "(anomalous or unknown product).", small=True))
    warnings = [(name, v.get("warning")) for name, v in thresholds.items()] or \
        [(e.get("name"), (e.get("calibration") or {}).get("warning"))
         for step in run.results.get("steps") or [] for e in step_experts(step)]
    warnings = [(name, text) for name, text in warnings if text]
    if warnings:
        blocks.append(Para("Thresholds the calibration data cannot support: " + "; ".join(
            f"{md_escape(str(name))}: {md_escape(text)}" for name, text in warnings)))
    return blocks


def continual_matrix(run: RunData, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(R, learned): R[j, i] = `metric` of class i after step j (NaN if missing / not learned)."""
    steps = run.results.get("steps") or []
    index = {c: i for i, c in enumerate(run.classes)}
    R = np.full((len(steps), len(index)), np.nan)
    learned = np.zeros(R.shape, dtype=bool)
    for j, step in enumerate(steps):
        for cls, res in (step.get("results") or {}).items():
            if cls in index:
                learned[j, index[cls]] = True
                v = (res or {}).get(metric)
                R[j, index[cls]] = float(v) if _finite(v) else np.nan
    return R, learned


def _continual_section(run: RunData) -> list[Block]:
    """Heat maps of the step x class matrices (image AUROC, pixel AP) and the BWT / FM table."""
    steps = run.results.get("steps") or []
    blocks: list[Block] = [Heading(2, "Continual learning: forgetting", "continual")]
    if len(steps) < 2:
        blocks.append(Para(f"Only {len(steps)} task in this run: there is nothing to forget, so no "
                           "step × product matrix, BWT or FM."))
        return blocks
    cont = run.results.get("continual") or {}
    rows = [[_metric_label(m), fmt_pp((cont.get(m) or {}).get("bwt")), fmt_pp((cont.get(m) or {}).get("fm"))]
            for m in run.metrics if m in cont]
    if rows:
        blocks.append(Table(["Metric", "BWT (higher is better)", "FM (lower is better)"], rows))
    step_labels = [f"{j}: {s.get('task_name', j)}" for j, s in enumerate(steps)]
    for metric in ("image_auroc", "pixel_ap"):
        R, learned = continual_matrix(run, metric)
        if not np.isfinite(R).any():
            blocks.append(Para(f"No {_metric_label(metric)} values in this run: no {_metric_label(metric)} matrix."))
            continue
        text = [[fmt_pct(R[j, i]) if learned[j, i] else "" for i in range(R.shape[1])] for j in range(R.shape[0])]
        c = cont.get(metric) or {}
        png = F.heatmap(
            100 * R, step_labels, run.classes, text=text, cmap="RdYlGn",
            vmin=min(50.0, float(np.nanmin(100 * R))), vmax=100.0,
            title=f"{_metric_label(metric)} (%) after each step — BWT {fmt_pp(c.get('bwt'))}, FM {fmt_pp(c.get('fm'))}",
            xlabel="product", ylabel="after step", colorbar_label=f"{_metric_label(metric)} (%)")
        blocks.append(Image(f"continual_{metric}", png,
                            f"{_metric_label(metric)} of each product (columns) after each learning step (rows). "
                            "Grey blank = not learned yet; grey n/a = learned but not measurable. A column "
                            "that fades downwards is forgetting."))
    return blocks


def _routing_section(run: RunData) -> list[Block]:
    """Routing confusion heat map: rows = true product, columns = chosen task (+ unknown)."""
    rc = run.results.get("routing_confusion")
    blocks: list[Block] = [Heading(2, "Routing", "routing")]
    if not rc or not rc.get("matrix"):
        blocks.append(Para("No routing confusion matrix in this run."))
        return blocks
    counts = np.asarray(rc["matrix"], dtype=float)
    rows_total = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, rows_total, out=np.zeros_like(counts), where=rows_total > 0)
    final = run.results.get("final") or {}
    row_labels = [f"{c} ({fmt_pct((final.get(c) or {}).get('routing_accuracy'))}%)" for c in rc["classes"]]
    text = [[str(int(v)) if v else "" for v in row] for row in counts]
    png = F.heatmap(100 * frac, row_labels, rc["tasks"], text=text, cmap="Blues", vmin=0, vmax=100,
                    title="Routing confusion (test images)", xlabel="task chosen by the router",
                    ylabel="true product (routing accuracy)", colorbar_label="% of the product's images")
    blocks.append(Image("routing_confusion", png,
                        "Rows: true product; columns: task chosen by the router (last column: flagged as an "
                        "unknown product). Colours are row-normalised; numbers are image counts (blank = 0)."))
    oracle = run.results.get("oracle") or {}
    rows = [[md_escape(c)] + [fmt_pct((final.get(c) or {}).get(k)) for k in
                              ("routing_accuracy_good", "routing_accuracy_defective", "ambiguous_rate",
                               "routing_accuracy_unambiguous", "routing_coverage_defective", "detection_rate")]
            + [fmt_pct((oracle.get(c) or {}).get("detection_rate"))] for c in rc["classes"]]
    blocks.append(Table(["Product", "Good parts routed right (%)", "Defective parts routed right (%)",
                         "Ambiguous routing (%)", "Routed right when not ambiguous (%)",
                         "Defective parts with their product among those named (%)",
                         "Defective parts flagged, routed (%)", "Defective parts flagged, oracle product (%)"], rows))
    blocks.append(Para("An ambiguous part (two products fit its patches almost equally) is scored under each plausible "
                       "product, flagged only if flagged under all of them, and its verdict names the other plausible "
                       "products. A verdict without that doubt names one product: the fifth column is how often that "
                       "product is right. The last two columns show what routing costs in decisions: the share of "
                       "defective parts flagged when the router chooses the product, and when the true product is "
                       "given.", small=True))
    learned = [(e["name"], e.get("confusability") or {}) for step in run.results.get("steps", [])
               for e in step.get("experts", [])]
    learned = [(n, c) for n, c in learned if c.get("good")]
    if learned:
        def share(c: dict, case: str, own: bool, name: str) -> str:
            shares = c.get(case) or {}
            value = shares.get(name, 0.0) if own else sum(v for k, v in shares.items() if k != name)
            return fmt_pct(value) if shares else "n/a"

        def worst(c: dict, name: str) -> str:
            others = {k: v for case in ("good", "defect") for k, v in (c.get(case) or {}).items() if k != name}
            return md_escape(max(others, key=others.get)) if others else "-"

        def draws(c: dict) -> str:
            shares = c.get("draws") or {}
            return ", ".join(f"{md_escape(k)} {fmt_pct(v)}" for k, v in sorted(shares.items(), key=lambda x: -x[1])) or "-"

        rows = [[md_escape(n), str(c.get("n", "")), str(len(c.get("among", []))), share(c, "good", True, n),
                 share(c, "defect", True, n), worst(c, n), draws(c)] for n, c in learned]
        blocks.append(Table(["Product", "held-out normals", "products then", "good routed to itself (%)",
                             "with a 10 % pasted defect (%)", "most confused with",
                             "draws others' held-out good parts (%)"], rows))
        blocks.append(Para("Confusability measured when each product was learned: its held-out normal training images "
                           "routed among the products learned up to then, as they are and with one pasted defect; and "
                           "the other direction, the share of each other product's held-out good parts (kept when "
                           "it was learned, routed by the prototypes) that the new product draws.", small=True))
    stress = run.results.get("routing_stress") or {}
    if stress.get("per_class"):
        areas = stress["areas"]
        rows = [[md_escape(c), str(v["n"]), fmt_pct(v["good"])] + [fmt_pct(v["defective"].get(a)) for a in areas]
                for c, v in stress["per_class"].items()]
        blocks.append(Table(["Product", "images", "as they are (%)"] +
                            [f"pasted defect {100 * float(a):g} % of the image (%)" for a in areas], rows))
        blocks.append(Para("Routing stress test: good test images of each product routed as they are and with one "
                           "pasted defect (cut-paste, hole, spot or noise rectangle) covering the given share of "
                           "the image. A defect should never move a part to another product's expert.", small=True))
    return blocks


def _curves_section(run: RunData) -> list[Block]:
    """ROC / PR curves and score histograms from the per-image CSVs."""
    blocks: list[Block] = [Heading(2, "Image-level curves", "curves")]
    curves = {c: (run.scores[c]["score"], run.scores[c]["label"] == 1) for c in run.classes if c in run.scores}
    if not curves:
        blocks.append(Para("No per-image scores (scores/*.csv) in this run."))
        return blocks
    blocks.append(Image("roc", F.roc_figure(curves, "Image-level ROC (task-agnostic)"),
                        "ROC per product from the per-image scores; AUROC (%) in the legend. Dotted: chance."))
    blocks.append(Image("pr", F.pr_figure(curves, "Image-level precision-recall (task-agnostic)"),
                        "Precision-recall per product; average precision (%) in the legend."))
    hist = {c: (s, lab, run.threshold(c)) for c, (s, lab) in curves.items()}
    blocks.append(Image("score_histograms", F.score_histograms(hist),
                        "Image scores of normal (blue) and anomalous (red) test images; dashed: the decision "
                        "threshold of the product's own task (calibrated on normal training images)."))
    return blocks


def _short_name(path: str, limit: int = 26) -> str:
    """The last two parts of a path, shortened in the middle to `limit` characters."""
    name = "/".join(Path(str(path)).parts[-2:])
    return name if len(name) <= limit else name[: limit // 2 - 1] + "…" + name[-(limit // 2):]


def _pick_examples(kinds: np.ndarray, scores: np.ndarray) -> list[tuple[str, list[int]]]:
    """Best (detected, normal) and worst (missed, false alarm) examples, `PER_GROUP` each."""
    kinds = np.asarray([str(k) for k in kinds])
    scores = np.asarray(scores, dtype=float)

    def of(kind: str, descending: bool) -> list[int]:
        idx = np.flatnonzero(kinds == kind)
        return [int(i) for i in idx[np.argsort(-scores[idx] if descending else scores[idx], kind="stable")]]

    groups = []
    for name, (a, b) in (("Best: detected defects, typical normals", (of("detected", True), of("normal", False))),
                         ("Worst: missed defects, false alarms", (of("missed", False), of("false_alarm", True)))):
        half = PER_GROUP // 2
        take_a = a[: max(half, PER_GROUP - len(b))]
        take_b = b[: PER_GROUP - len(take_a)]
        groups.append((name, take_a + take_b))
    return groups


def _examples_section(run: RunData) -> list[Block]:
    """One strip per product: best and worst examples, image + anomaly-map overlay + GT contour."""
    blocks: list[Block] = [Heading(2, "Examples per product", "examples")]
    if not run.examples:
        blocks.append(Para("No example images (examples/*.npz) in this run."))
        return blocks
    blocks.append(Para("Each strip shows the image (top) and its anomaly map over it (bottom, jet colours: "
                       "blue = normal, red = anomalous); the white outline (on a thin black rim) is the "
                       "ground-truth defect. The colour scale is shared within a product (stated in each caption), not "
                       "across products. Under each example: its kind, the decision at the calibrated "
                       "threshold, the image score and the file."))
    for cls in run.classes:
        ex = run.examples.get(cls)
        if ex is None or not len(ex["images"]):
            continue
        n = len(ex["images"])
        scores = np.asarray(ex.get("scores", np.full(n, np.nan)), dtype=float)
        files = [str(f) for f in ex.get("files", [""] * n)]
        groups = _pick_examples(ex["kinds"], scores)
        chosen = [i for _, idx in groups for i in idx]
        if not chosen:
            continue
        decisions = _decisions_by_file(run.scores.get(cls))
        captions = [f"{KIND_LABELS.get(str(k), str(k))}{decisions.get(f, '')}\n"
                    f"score {fmt_num(s, '.3g')}\n{_short_name(f)}" for k, s, f in zip(ex["kinds"], scores, files)]
        maps = np.asarray(ex["maps"], dtype=np.float32)
        lo, hi = F.map_range(maps[chosen])
        masks = ex.get("masks")
        png = F.example_strip(np.asarray(ex["images"]), maps, masks, captions, groups,
                              title=f"{cls}: anomaly-map colour scale {lo:.3g} (blue) to {hi:.3g} (red)",
                              vrange=(lo, hi))
        has_masks = masks is not None and bool(np.asarray(masks).any())
        blocks += [Heading(3, md_escape(cls)),
                   Image(f"examples_{_slug(cls)}", png,
                         f"{md_escape(cls)}: map colour scale {lo:.3g} to {hi:.3g} (NLL units, 1st–99.5th "
                         f"percentile of the shown maps)" + ("" if has_masks else "; no ground-truth masks") + ".")]
    return blocks


def _decisions_by_file(scores: dict[str, np.ndarray] | None) -> dict[str, str]:
    """file -> " → flagged" / " → passed" / " → unknown product" from a scores CSV."""
    if scores is None:
        return {}
    out = {}
    for f, known, flag in zip(scores["file"], scores["known"], scores["anomalous"]):
        out[str(f)] = " → unknown product" if known == 0 else (" → flagged" if flag == 1 else " → passed")
    return out


def _slug(name: str) -> str:
    """A file-name-safe version of `name`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "class"


def _discovery_section(run: RunData) -> list[Block]:
    """Products found by `--discover`: per step the clusters, their make-up by (hidden) class, and samples."""
    found = [(j, s["discovery"]) for j, s in enumerate(run.results.get("steps") or []) if s.get("discovery")]
    if not found:
        return []
    blocks: list[Block] = [Heading(2, "Products found without names", "discovery")]
    for j, d in found:
        classes = sorted({c for comp in (d.get("composition") or {}).values() for c in comp})
        rows = [[md_escape(c["name"]), str(c["n"])] + [str((d.get("composition") or {}).get(c["name"], {}).get(k, ""))
                                                     for k in classes] for c in d.get("clusters") or []]
        blocks.append(Para(f"Step {j}: {d.get('k')} products found by {md_escape(str(d.get('method', '')))}; "
                           f"purity against the hidden class names {fmt_pct(d.get('purity'))} %."))
        blocks.append(Table(["Product found", "images"] + [f"of {md_escape(k)}" for k in classes], rows))
        for c in d.get("clusters") or []:
            sheet = run.run_dir / str(c.get("sheet", ""))
            if c.get("sheet") and sheet.is_file():
                blocks.append(Image(f"discover_step{j}_{_slug(c['name'])}", sheet.read_bytes(),
                                    f"{c['name']}: sample training images ({c['n']} in all)."))
    return blocks


def _timing_section(run: RunData) -> list[Block]:
    """Per-task training time and the threshold calibration (training data only)."""
    steps = run.results.get("steps") or []
    timing = run.results.get("timing") or {}
    train_s = timing.get("train_seconds") or []
    rows = []
    for j, s in enumerate(steps):
        secs = s.get("train_seconds", train_s[j] if j < len(train_s) else None)
        for k, e in enumerate(step_experts(s)):
            cal = e.get("calibration") or {}
            products = ", ".join(md_escape(c) for c in e.get("classes") or [])
            # steps learned on Ray have no wall time of their own: each expert's training time instead
            own = fmt_num(e.get("train_seconds"), ".1f") + " (expert)" if secs is None else ""
            rows.append([str(j) if k == 0 else "", md_escape(str(e.get("name", ""))), products,
                         own or (fmt_num(secs, ".1f") if k == 0 else ""), str(e.get("skipped_batches", "n/a")),
                         fmt_num(e.get("threshold")), md_escape(cal.get("source", "n/a")), str(cal.get("n", "n/a")),
                         fmt_pct(cal.get("false_alarm_rate"))])
    blocks: list[Block] = [Heading(2, "Training time and threshold calibration", "timing"),
                           Table(["Step", "Expert", "Products", "Learn (s)", "Skipped batches", "Threshold",
                                  "Calibration source", "n", "Target false alarms (%)"], rows,
                                 align="rllrrrlrr")]
    parallel = run.results.get("parallel")
    if parallel:
        blocks.append(Para(f"Steps learned up front, experts after the first step {parallel['workers']} at a time on "
                           f"Ray ({parallel.get('address') or 'local'}, {parallel['cpus_per_expert']} CPU per expert): "
                           f"{fmt_num(parallel.get('learn_seconds'), '.1f')} s for {parallel['steps_learned']} steps."))
    blocks.append(Para(f"Evaluation: {fmt_num(timing.get('eval_seconds'), '.1f')} s; total: "
                       f"{fmt_num(timing.get('total_seconds'), '.1f')} s. Thresholds are set on held-out normal "
                       "training images at the target false-alarm rate; no test image is used."))
    return blocks


def _config_section(run: RunData) -> list[Block]:
    """The full configuration, for reproduction."""
    cfg = run.results.get("config")
    if not cfg:
        return []
    return [Heading(2, "Configuration", "config"), Code(json.dumps(cfg, indent=2, sort_keys=False), "json")]


def _notes_section(run: RunData) -> list[Block]:
    return [Heading(2, "Notes", "notes"), Bullets([md_escape(n) for n in run.notes])] if run.notes else []


def default_title(run: RunData) -> str:
    """"MoLE-Flow report: <dataset> (<n> products, scenario <s>)"."""
    ds = run.results.get("dataset") or {}
    return (f"MoLE-Flow report: {ds.get('name') or run.run_dir.name} ({len(run.classes)} products, "
            f"scenario {ds.get('scenario') or 'n/a'})")


def build_report(run: RunData, title: str | None = None) -> list[Block]:
    """All report blocks, in order."""
    title = title or default_title(run)
    sections = [_header(run, title), _protocol(), _summary(run), _final_section(run), _defect_type_section(run),
                _decision_section(run), _continual_section(run), _routing_section(run), _discovery_section(run),
                _curves_section(run),
                _examples_section(run), line_section(run.line, run.results.get("thresholds") or {}),
                _timing_section(run), _config_section(run), _notes_section(run)]
    return [b for s in sections for b in s]


def write_report(run_dir: Path | str, title: str | None = None, audit_rate: float | None = None,
                 store: str | None = None) -> tuple[Path, Path]:
    """Write RUN_DIR/report.md (+ RUN_DIR/figures/*.png) and the self-contained RUN_DIR/report.html.

    Returns (markdown path, html path). Optional parts of the run (examples, oracle, continual
    matrices, pixel metrics) are skipped or shown as "n/a" when missing.
    """
    run = load_run(run_dir, audit_rate, store)
    title = title or default_title(run)
    return _write_blocks(run.run_dir, "report", build_report(run, title), title)


def _write_blocks(run_dir: Path, stem: str, blocks: Sequence[Block], title: str) -> tuple[Path, Path]:
    """RUN_DIR/figures/<image>.png for every figure, RUN_DIR/<stem>.md and the self-contained <stem>.html."""
    for b in blocks:
        if isinstance(b, Image):
            atomic_write_bytes(run_dir / "figures" / f"{b.name}.png", lambda fh, b=b: fh.write(b.png))
    md_path, html_path = run_dir / f"{stem}.md", run_dir / f"{stem}.html"
    atomic_write_text(md_path, render_markdown(blocks))
    atomic_write_text(html_path, render_html(blocks, title))
    return md_path, html_path


def write_line_report(run_dir: Path | str, audit_rate: float | None = None, store: str | None = None
                      ) -> tuple[Path, Path]:
    """Write RUN_DIR/line.md (+ figures) and RUN_DIR/line.html: the "On the line" section alone (realised rates
    from reviews), for runs served without an evaluation (no results.json needed). (markdown path, html path)."""
    run_dir = Path(run_dir)
    line = read_line(run_dir, audit_rate, store)
    if line is None:
        raise MoleflowError(f"no verdict store at {run_dir / VERDICT_STORE_FILE}: record verdicts first (`moleflow "
                            "serve`, `watch` or `predict --record`), or pass --store URL")
    thresholds: dict[str, Any] = {}
    results = run_dir / "results.json"
    if results.is_file():
        try:
            thresholds = json.loads(results.read_text(encoding="utf-8")).get("thresholds") or {}
        except (OSError, ValueError):
            thresholds = {}  # the requested rates are then shown as n/a
    title = f"moleflow: {run_dir.name} on the line"
    return _write_blocks(run_dir, "line", [Heading(1, title), *line_section(line, thresholds)], title)
