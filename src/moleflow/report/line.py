"""The report's "On the line" section: what inspectors' reviews say about each product's decisions.

    read_line(run_dir, audit_rate, store) None without a store; else the store's counts and
                                          `feedback.quality` per product and day
    line_section(line, thresholds)        report blocks: a table per product (verdicts, reviews, realised
                                          false-alarm and detection rates beside the requested rate) and a
                                          plot of both rates per day

The rates are the stratified estimates of `feedback.quality` (README "On the line"): flagged parts are
weighed by their reviewed share of false alarms, passed parts by the reviewed audit sample. A day without
enough reviews has no estimate and is left out of the plot, never drawn as zero.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..store.run import VERDICT_STORE_FILE
from . import figures as F
from .blocks import Block, Bullets, Heading, Image, Para, Table


def read_line(run_dir: Path, audit_rate: float | None = None, store: str | None = None) -> dict[str, Any] | None:
    """The verdict store (`store`: a `--store` URL or file; default RUN/verdicts.sqlite) summarised for the
    report; None when no store is given and the run has no store file."""
    default = Path(run_dir) / VERDICT_STORE_FILE
    if store is None and not default.is_file():
        return None
    from ..feedback import AUDIT_RATE, check_rate, quality
    from ..store.verdicts import VerdictStore

    rate = check_rate(AUDIT_RATE if audit_rate is None else audit_rate)
    with VerdictStore.open(store or default) as db:
        return {"store": db.name, "verdicts": len(db), "counts": db.counts(), "audit_rate": rate,
                "products": quality(db, rate)}


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * float(v):.1f}"


def _rows(products: Mapping[str, Any], thresholds: Mapping[str, Any]) -> list[list[Any]]:
    rows = []
    for name, entry in sorted(products.items()):
        t = entry["total"]
        reviewed = t["reviewed"]
        requested = (thresholds.get(name) or {}).get("requested")
        rows.append([name, len(entry["days"]), t["flagged"], t["passed"], reviewed["false_alarm"],
                     reviewed["defect_confirmed_flagged"], reviewed["good_confirmed"],
                     reviewed["defect_confirmed_passed"], _pct(requested), _pct(t["false_alarm_rate"]),
                     _pct(t["detection_rate"]), reviewed["wrong_product_flagged"] + reviewed["wrong_product_passed"],
                     _pct(t["wrong_product_rate"]), t.get("ambiguous", 0)])
    return rows


def line_section(line: dict[str, Any] | None, thresholds: Mapping[str, Any]) -> list[Block]:
    """The section's blocks ([] without a verdict store)."""
    if line is None:
        return []
    counts = line["counts"]
    blocks: list[Block] = [
        Heading(2, "On the line: decisions as reviewed"),
        Para(f"From the verdict store `{line['store']}`: {line['verdicts']:,} verdicts "
             f"({', '.join(f'{v:,} {k}' for k, v in sorted(counts.items())) or 'none'}); audit sample of passed "
             f"parts {100 * line['audit_rate']:.1f} %. Realised rates are estimated from inspectors' reviews "
             "(flagged parts by their reviewed share of false alarms, passed parts by the reviewed audit sample); "
             "`moleflow status RUN` shows the same numbers, `moleflow calibrate RUN --from-reviews` recalibrates "
             "from the parts reviewed good.")]
    products = {k: v for k, v in line["products"].items() if v.get("total")}
    if not products:
        blocks.append(Para("No product has a decided verdict in the store yet."))
        return blocks
    blocks.append(Table(["product", "days", "flagged", "passed", "false alarm", "defect (flagged)",
                         "good (audit)", "defect (passed)", "requested FA %", "realised FA %", "detection %",
                         "wrong product (reviewed)", "wrong product %", "ambiguous"],
                        _rows(products, thresholds)))
    blocks.append(Para("Verdicts and reviews per product over the whole store. Reviewed counts are parts inspectors "
                       "labelled; rates are n/a until enough parts of each kind are reviewed. Wrong product: how often "
                       "a verdict of this product was another product (reviewed `wrong_product`, weighed like the "
                       "other rates); ambiguous: verdicts whose routing was in doubt and that name every plausible "
                       "product.", small=True))
    assumed = [n for n, e in products.items() if e["total"].get("assumed")]
    if assumed:
        blocks.append(Bullets([f"{n}: no passed part of the audit sample reviewed yet; passed parts taken as good"
                               for n in assumed]))
    blocks.append(Image("line_rates", F.daily_rates({name: entry["days"] for name, entry in products.items()}),
                        "Realised false-alarm and detection rates per day, from reviews (days without an estimate "
                        "are left out)."))
    return blocks
