"""`moleflow status`: how the line is doing, from the run and its verdict store: verdicts per product, realised
false-alarm and detection rates from people's reviews (per day), drift alerts, and the unknown-product pile."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from ..errors import MoleflowError
from .common import format_table

EXAMPLES = """examples:
  moleflow status runs/real                        # products, reviews, rates, drift, unknown parts
  moleflow status runs/real --days 30 --json       # the same as JSON (for a dashboard or a cron check)
  moleflow status runs/real --store postgresql://qa@db.local/line
Rates come from reviews (the review page, POST /reviews): per product and day, the flagged parts and the
audit sample of passed parts are each taken as sampled by their reviewed parts (README "On the line").
Drift: a CUSUM on the conformal p-values of passed parts, 1 % chance of a false alert per 10,000 good parts
(drift.py). Exit code 0; with --fail-on-alert, 1 when a product is in drift alert.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("status", help="the line: verdicts, realised rates from reviews, drift, unknown parts",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--store", metavar="URL|FILE", help="the verdict store (default RUN_DIR/verdicts.sqlite)")
    p.add_argument("--days", type=int, default=14, help="days of daily rates shown (default 14)")
    p.add_argument("--audit-rate", type=float, default=None,
                   help="the review queue's audit rate (`serve --audit-rate`, default 0.05)")
    p.add_argument("--json", action="store_true", help="print everything as one JSON object")
    p.add_argument("--fail-on-alert", action="store_true", help="exit with 1 when a product is in drift alert")
    p.add_argument("--report", action="store_true",
                   help="also write RUN_DIR/line.html and line.md: realised false-alarm and detection rates from "
                        "reviews per product and day, with plots (the run report gets the same section)")
    p.set_defaults(run=run)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def line_status(run_dir: Path, store: Any, audit_rate: float, days: int) -> dict[str, Any]:
    """Everything `moleflow status` shows, as one JSON-able dict."""
    from ..drift import product_drift
    from ..feedback import MIN_PILE, discover_command, quality, unknown_pile
    from ..store.checkpoint import read_tasks

    sha, tasks = read_tasks(run_dir)
    since = (datetime.now(timezone.utc) - timedelta(days=max(days, 1) - 1)).strftime("%Y-%m-%d")
    rates = quality(store, audit_rate)
    drift = {d.product: d.to_dict() for d in product_drift(store, tasks)}
    pile = unknown_pile(store, run_dir, learned=[t["name"] for t in tasks])
    products = []
    for t in tasks:
        name = t["name"]
        q = rates.get(name, {"days": [], "total": None})
        products.append({"name": name, "threshold": t["threshold"], "counts": store.counts(product=name),
                         "quality": q["total"], "days": [d for d in q["days"] if d["day"] >= since],
                         "drift": drift.get(name)})
    with_files = sum(1 for r in pile if r["file"])
    return {"run": str(run_dir), "model": sha[:12], "store": store.name, "verdicts": len(store),
            "counts": store.counts(), "audit_rate": audit_rate, "products": products,
            "drift_alerts": [n for n, d in drift.items() if d["alert"]],
            "unknowns": {"parts": len(pile), "with_files": with_files, "min_to_cluster": MIN_PILE,
                         "first": pile[0]["at"] if pile else None, "last": pile[-1]["at"] if pile else None,
                         "export": f"moleflow unknowns {run_dir} --export",
                         "learn": discover_command(run_dir, f"{run_dir}/unknowns/<date>")}}


def run(args: argparse.Namespace) -> int:
    from ..feedback import AUDIT_RATE, check_rate
    from ..store.verdicts import VerdictStore

    if args.days < 1:
        raise MoleflowError("--days must be at least 1")
    rate = check_rate(AUDIT_RATE if args.audit_rate is None else args.audit_rate)
    with VerdictStore.open(args.store, run_dir=args.run_dir) as store:
        status = line_status(args.run_dir, store, rate, args.days)
    if args.json:
        print(json.dumps(status, indent=1, default=str))
    else:
        print(_text(status))
    if args.report:
        from ..report.render import write_line_report

        _, html_path = write_line_report(args.run_dir, audit_rate=rate, store=args.store)
        print(f"report: {html_path}", file=sys.stderr if args.json else sys.stdout)
    return 1 if args.fail_on_alert and status["drift_alerts"] else 0


def _text(s: dict[str, Any]) -> str:
    counts = s["counts"]
    lines = [f"run {s['run']}: model {s['model']}, {len(s['products'])} products; verdict store {s['store']}",
             f"verdicts: {s['verdicts']:,} (" + ", ".join(f"{n:,} {d}" for d, n in sorted(counts.items())) + ")"]
    rows = []
    for p in s["products"]:
        c, q, d = p["counts"], p["quality"] or {}, p["drift"] or {}
        reviewed = sum((q.get("reviewed") or {}).values()) if q else 0
        drift = "n/a" if not d else ("ALERT: scores " + str(d["direction"]) if d["alert"] and d["test"] == "p-values"
                                     else "ALERT: more flags" if d["alert"] else f"ok ({d['parts']} parts, {d['test']})")
        rows.append([p["name"], f"{p['threshold']:.4g}", c.get("normal", 0), c.get("anomalous", 0), reviewed,
                     _pct(q.get("false_alarm_rate")) + ("*" if q.get("assumed") else ""),
                     _pct(q.get("detection_rate")), _pct(q.get("wrong_product_rate")), q.get("ambiguous", 0), drift])
    lines += ["", format_table(rows, ["product", "threshold", "passed", "flagged", "reviewed", "false-alarm rate",
                                      "detection rate", "wrong product", "ambiguous", "drift"])]
    if any((p["quality"] or {}).get("assumed") for p in s["products"]):
        lines.append("* no passed part of the audit sample reviewed yet: passed parts taken as good")
    for p in s["products"]:
        d = p["drift"] or {}
        if d.get("alert"):
            lines.append(f"(!) drift: {d['message']}")
    for p in s["products"]:
        if not p["days"]:
            continue
        lines += ["", f"{p['name']}, per day (UTC):"]
        lines.append(format_table([[d["day"], d["passed"], d["flagged"], sum(d["reviewed"].values()),
                                    _pct(d["false_alarm_rate"]) + ("*" if d["assumed"] else ""),
                                    _pct(d["detection_rate"])] for d in p["days"]],
                                  ["day", "passed", "flagged", "reviewed", "false-alarm rate", "detection rate"]))
    u = s["unknowns"]
    lines.append("")
    if u["parts"]:
        lines.append(f"unknown product: {u['parts']} parts not exported yet ({u['with_files']} with their image file), "
                     f"{u['first'][:19]} to {u['last'][:19]}")
        if u["with_files"] >= u["min_to_cluster"]:
            lines.append(f"  a new product? {u['export']}   then   {u['learn']}")
    else:
        lines.append("unknown product: no parts waiting")
    return "\n".join(lines)
