"""Feedback from the line: what people review, what their reviews say, and the pile of unknown parts.

    in_audit(verdict_id, rate)                 is the part in the audit sample? (a seeded hash of its id < rate)
    review_queue(store, audit_rate, ...)       flagged, unknown-product and audit-sampled passed parts to review
    quality(store, audit_rate, ...)            realised false-alarm and detection rates per product and day
    calibration_parts(store, product, rate)    the good parts `moleflow calibrate --from-reviews` uses
    unknown_pile(store, run_dir, learned)      "unknown product" parts not exported yet
    export_pile(rows, dest)                    copies (or links) of their images + pile.json, for add-task --discover

The audit sample
----------------
Every flagged part and every unknown-product part goes to the review queue; of the passed parts, only the
*audit sample*: a part is in it when a seeded hash of its verdict id, read as a number in [0, 1), is below
the audit rate (`serve --audit-rate`, default 5 %). Membership is fixed before anyone sees the part and does
not depend on its score, and a sample at a lower rate is contained in the sample at a higher one.

Realised rates (`quality`)
--------------------------
Per product and day (UTC), two strata: flagged parts (all queued) and passed parts (the audit sample is
queued). Within each stratum the reviewed parts are taken as a random sample of it (true for the audit
sample; for flagged parts, as long as reviewers do not pick which ones to review), so

    false alarms = flagged x FA / (FA + TP)          FA = reviewed false_alarm, TP = defect_confirmed (flagged)
    good passed  = passed x GC / (GC + FN)           GC = good_confirmed, FN = defect_confirmed (passed, audit)
    false-alarm rate = false alarms / (false alarms + good passed)
    detection rate   = true detections / (true detections + escaped defects)

with true detections = flagged x TP / (FA + TP) and escaped defects = passed x FN / (GC + FN). Reviews of
passed parts outside the audit sample are not used (they may have been picked for a reason). Without
reviewed passed parts, the passed ones are assumed good for the false-alarm rate (`assumed` says so: wrong
by at most the defect rate) and the detection rate is unknown (None). `wrong_product` reviews count in
neither: the part was not that product.

Which product, on the line: the same two strata estimate how often a verdict names the wrong product,

    wrong product = flagged x WPf / (FA + TP + WPf) + passed x WPp / (GC + FN + WPp)
    wrong-product rate = wrong product / (flagged + passed)

(WPf, WPp: reviewed wrong_product among flagged parts and among the audit sample's passed parts); unknown (None)
while a stratum with parts has no reviewed part. Beside it, `ambiguous`: the verdicts whose routing was in doubt
(the part was scored under every plausible product and its verdict names them; docs/decisions.md §8).

Recalibration (`calibration_parts`)
-----------------------------------
`moleflow calibrate --from-reviews` re-calibrates a product on the parts of its audit sample that a person
reviewed as good (false_alarm or good_confirmed), re-scored from their image files through
`MoleFlow.recalibrate` (the path `moleflow calibrate --normals` takes). Only the audit sample, because the
conformal guarantee needs good parts drawn without regard to their score: every flagged part is reviewed
but only a sample of the passed ones, so adding every reviewed false alarm would over-weight high scores,
raise the threshold and guarantee fewer false alarms than asked at the cost of missed defects. The audit
parts not reviewed yet are counted and reported: the guarantee holds once the sample is reviewed completely
(reviewing only the flagged ones among them would bias it the same way).
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from .decisions import ANOMALOUS, NORMAL, UNKNOWN
from .errors import MoleflowError

AUDIT_RATE = 0.05  # default share of passed parts sampled for review
AUDIT_SEED = 0
GOOD_LABELS = ("false_alarm", "good_confirmed")
MIN_PILE = 10  # unknown parts needed before the pile is clustered
PILE_FILE = "pile.json"
UNKNOWNS_DIR = "unknowns"
_SCAN_CHUNK = 2000


# ------------------------------------------------------------------------------------------ audit sample
def audit_value(verdict_id: int, seed: int = AUDIT_SEED) -> float:
    """The part's fixed draw in [0, 1): BLAKE2b of "seed:id", its first 8 bytes as a fraction."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(verdict_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def in_audit(verdict_id: int, rate: float, seed: int = AUDIT_SEED) -> bool:
    """Is the part in the audit sample at this rate (nested: a part sampled at rate r is sampled at any r' > r)?"""
    return rate > 0 and audit_value(verdict_id, seed) < rate


def check_rate(rate: float, what: str = "--audit-rate") -> float:
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
        raise MoleflowError(f"{what} {rate}: must be between 0 and 1 (e.g. 0.05 to review 5 % of passed parts)")
    return rate


# ------------------------------------------------------------------------------------------ the queue
def why_queued(row: dict[str, Any], audit_rate: float, seed: int = AUDIT_SEED) -> str | None:
    """Why a verdict is in the review queue: "flagged", "unknown product", "audit sample" (a passed part), or
    None (not queued)."""
    decision = row["decision"]
    if decision == ANOMALOUS:
        return "flagged"
    if decision == UNKNOWN:
        return "unknown product"
    if decision == NORMAL and in_audit(row["id"], audit_rate, seed):
        return "audit sample"
    return None


def review_queue(store: Any, audit_rate: float, product: str | None = None, decision: str | None = None,
                 since: Any = None, until: Any = None, limit: int = 50, include_reviewed: bool = False,
                 seed: int = AUDIT_SEED, scan: int = 100_000) -> list[dict[str, Any]]:
    """The parts to review, newest first: flagged and unknown-product parts, and passed parts of the audit
    sample (looked for among the newest `scan` passed parts), not yet reviewed (unless `include_reviewed`:
    then each carries its latest review). Each row is a verdict dict plus "why" and "review"."""
    check_rate(audit_rate)
    decisions = [decision] if decision else [ANOMALOUS, UNKNOWN, NORMAL]
    reviewed = None if include_reviewed else False
    rows: list[dict[str, Any]] = []
    flagged = [d for d in decisions if d in (ANOMALOUS, UNKNOWN)]
    if flagged:
        rows += store.verdicts(product=product, since=since, until=until, decision=flagged, reviewed=reviewed,
                               limit=limit)
    if NORMAL in decisions and audit_rate > 0:
        found: list[dict[str, Any]] = []
        before, scanned = None, 0
        while len(found) < limit and scanned < scan:
            chunk = store.verdicts(product=product, since=since, until=until, decision=NORMAL, reviewed=reviewed,
                                   limit=_SCAN_CHUNK, before_id=before)
            if not chunk:
                break
            found += [r for r in chunk if in_audit(r["id"], audit_rate, seed)]
            before, scanned = chunk[-1]["id"], scanned + len(chunk)
        rows += found[:limit]
    rows = sorted(rows, key=lambda r: r["id"], reverse=True)[:limit]
    latest = store.latest_reviews(r["id"] for r in rows) if include_reviewed else {}
    return [{**r, "why": why_queued(r, audit_rate, seed), "review": latest.get(r["id"])} for r in rows]


# ------------------------------------------------------------------------------------------ realised rates
REVIEW_KEYS = ("fa", "tp", "gc", "fn", "wpf", "wpp")  # `_rates`' review counts, in its argument (and `reviewed`) order


def _rates(n_flag: int, n_pass: int, fa: int, tp: int, gc: int, fn: int, wpf: int = 0, wpp: int = 0
           ) -> dict[str, Any]:
    """The stratified estimate of one product's false-alarm, detection and wrong-product rates (module
    docstring)."""
    out: dict[str, Any] = {"flagged": n_flag, "passed": n_pass,
                           "reviewed": {"false_alarm": fa, "defect_confirmed_flagged": tp, "good_confirmed": gc,
                                        "defect_confirmed_passed": fn, "wrong_product_flagged": wpf,
                                        "wrong_product_passed": wpp},
                           "false_alarms": None, "detected": None, "escaped": None, "false_alarm_rate": None,
                           "detection_rate": None, "assumed": None, "wrong_product": None,
                           "wrong_product_rate": None}
    strata = [(n, wrong / (wrong + rest) if wrong + rest else None)
              for n, wrong, rest in ((n_flag, wpf, fa + tp), (n_pass, wpp, gc + fn)) if n]
    if all(share is not None for _, share in strata):
        out["wrong_product"] = sum(n * share for n, share in strata)
        if n_flag + n_pass:
            out["wrong_product_rate"] = out["wrong_product"] / (n_flag + n_pass)
    if n_flag == 0:
        false_alarms, detected = 0.0, 0.0
    elif fa + tp:
        false_alarms, detected = n_flag * fa / (fa + tp), n_flag * tp / (fa + tp)
    else:
        false_alarms = detected = None
    if n_pass == 0:
        good, escaped = 0.0, 0.0
    elif gc + fn:
        good, escaped = n_pass * gc / (gc + fn), n_pass * fn / (gc + fn)
    else:
        good, escaped = float(n_pass), None
        out["assumed"] = "no passed part of the audit sample reviewed: passed parts taken as good"
    out.update(false_alarms=false_alarms, detected=detected, escaped=escaped)
    if false_alarms is not None and false_alarms + good > 0:
        out["false_alarm_rate"] = false_alarms / (false_alarms + good)
    if detected is not None and escaped is not None and detected + escaped > 0:
        out["detection_rate"] = detected / (detected + escaped)
    return out


def quality(store: Any, audit_rate: float, product: str | None = None, since: Any = None, until: Any = None,
            seed: int = AUDIT_SEED) -> dict[str, dict[str, Any]]:
    """Per product: {"days": [{"day", "flagged", "passed", "unknown", "reviewed", "false_alarm_rate",
    "detection_rate", ...}], "total": {...}} from the store's verdicts and reviews (module docstring)."""
    check_rate(audit_rate)
    counts: dict[tuple[str, str], dict[str, int]] = {}
    ambiguous: dict[tuple[str, str], int] = {}
    for day, prod, decision, n, n_ambiguous in store.daily_counts(product=product, since=since, until=until):
        counts.setdefault((prod, day), {})[decision] = n
        ambiguous[prod, day] = ambiguous.get((prod, day), 0) + n_ambiguous
    labels: dict[tuple[str, str], dict[str, int]] = {}
    for r in store.reviewed(product=product, since=since, until=until, decision=(NORMAL, ANOMALOUS)):
        if r["decision"] == NORMAL and not in_audit(r["id"], audit_rate, seed):
            continue  # a passed part reviewed outside the audit sample: not a random draw of the passed parts
        key = {("anomalous", "false_alarm"): "fa", ("anomalous", "defect_confirmed"): "tp",
               ("normal", "good_confirmed"): "gc", ("normal", "defect_confirmed"): "fn",
               ("anomalous", "wrong_product"): "wpf", ("normal", "wrong_product"): "wpp"}.get((r["decision"], r["label"]))
        if key:
            bucket = labels.setdefault((r["product"], str(r["at"])[:10]), {})
            bucket[key] = bucket.get(key, 0) + 1
    out: dict[str, dict[str, Any]] = {}
    for (prod, day) in sorted(set(counts) | set(labels)):
        if prod in (UNKNOWN, ""):
            continue
        c, l = counts.get((prod, day), {}), labels.get((prod, day), {})
        entry = {"day": day, "unknown": 0, "ambiguous": ambiguous.get((prod, day), 0),
                 **_rates(c.get(ANOMALOUS, 0), c.get(NORMAL, 0), *(l.get(k, 0) for k in REVIEW_KEYS))}
        out.setdefault(prod, {"days": []})["days"].append(entry)
    for prod, entry in out.items():
        days = entry["days"]
        total = [sum(d["reviewed"][k] for d in days) for k in days[0]["reviewed"]]
        entry["total"] = {"ambiguous": sum(d["ambiguous"] for d in days),
                          **_rates(sum(d["flagged"] for d in days), sum(d["passed"] for d in days), *total)}
    unknown_days = {day: c.get(UNKNOWN, 0) for (prod, day), c in counts.items() if prod == UNKNOWN}
    for entry in out.values():  # unknown-product parts per day (they belong to no product)
        for d in entry["days"]:
            d["unknown"] = unknown_days.get(d["day"], 0)
    return out


# ------------------------------------------------------------------------------------------ recalibration
def calibration_parts(store: Any, product: str, audit_rate: float, since: Any = None, until: Any = None,
                      seed: int = AUDIT_SEED) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(the product's audit-sample parts reviewed good, counts) for `moleflow calibrate --from-reviews`.
    counts: audit (parts of the product in the audit sample, passed or flagged), reviewed, good, not_good
    (defect_confirmed / wrong_product), unreviewed, false_alarms_outside (reviewed false alarms not used)."""
    check_rate(audit_rate)
    if audit_rate <= 0:
        raise MoleflowError("--audit-rate 0: no audit sample, so no good parts drawn without regard to their score")
    reviewed = store.reviewed(product=product, since=since, until=until, decision=(NORMAL, ANOMALOUS))
    audit_reviewed = [r for r in reviewed if in_audit(r["id"], audit_rate, seed)]
    good = [r for r in audit_reviewed if r["label"] in GOOD_LABELS]
    audit_total, before = 0, None
    while True:  # every audit part of the product in the window, reviewed or not
        chunk = store.verdicts(product=product, since=since, until=until, decision=(NORMAL, ANOMALOUS),
                               limit=_SCAN_CHUNK * 5, before_id=before)
        if not chunk:
            break
        audit_total += sum(in_audit(r["id"], audit_rate, seed) for r in chunk)
        before = chunk[-1]["id"]
    outside = sum(1 for r in reviewed if r["label"] == "false_alarm" and not in_audit(r["id"], audit_rate, seed))
    counts = {"audit": audit_total, "reviewed": len(audit_reviewed), "good": len(good),
              "not_good": len(audit_reviewed) - len(good), "unreviewed": audit_total - len(audit_reviewed),
              "false_alarms_outside": outside}
    return good, counts


def image_of(row: dict[str, Any]) -> Path | None:
    """The verdict's image file when it still exists with the recorded content (SHA-256), else None."""
    path = Path(str(row.get("path") or ""))
    if not row.get("sha256") or not path.is_file():
        return None
    try:
        if hashlib.sha256(path.read_bytes()).hexdigest() != row["sha256"]:
            return None
    except OSError:
        return None
    return path


# ------------------------------------------------------------------------------------------ unknown parts
def exported_ids(run_dir: str | Path) -> set[int]:
    """Verdict ids already exported by `export_pile` into RUN/unknowns/*/pile.json."""
    found: set[int] = set()
    for ledger in sorted((Path(run_dir) / UNKNOWNS_DIR).glob(f"*/{PILE_FILE}")):
        try:
            found.update(int(p["verdict_id"]) for p in json.loads(ledger.read_text())["parts"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a damaged ledger only means parts may be offered again
    return found


def unknown_pile(store: Any, run_dir: str | Path, learned: Iterable[str] = (), since: Any = None, until: Any = None,
                 include_exported: bool = False) -> list[dict[str, Any]]:
    """The "unknown product" parts, oldest first, less those reviewed as a learned product (wrong_product
    naming it) or as defective, and (unless `include_exported`) those already exported. Each row carries
    "file": whether its image file still exists."""
    learned = set(learned)
    rows = store.verdicts(decision=UNKNOWN, since=since, until=until, newest_first=False)
    latest = store.latest_reviews(r["id"] for r in rows)
    done = set() if include_exported else exported_ids(run_dir)
    out = []
    for r in rows:
        review = latest.get(r["id"])
        if review and (review["label"] == "defect_confirmed" or
                       (review["label"] == "wrong_product" and review.get("correct_product") in learned)):
            continue
        if r["id"] in done:
            continue
        out.append({**r, "file": bool(r.get("path")) and Path(str(r["path"])).is_file(), "review": review})
    return out


def default_export_dir(run_dir: str | Path) -> Path:
    """RUN/unknowns/<today, UTC>/ (-2, -3, ... when taken)."""
    base = Path(run_dir) / UNKNOWNS_DIR / datetime.now(timezone.utc).strftime("%Y-%m-%d")
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    return folder


def export_pile(rows: Sequence[dict[str, Any]], dest: str | Path, link: bool = False) -> dict[str, Any]:
    """Copy (or symlink) the pile's image files into `dest` as <verdict id>_<name>, and write dest/pile.json
    (which parts, from where; what `unknown_pile` reads to leave them out next time). A part whose file is
    gone or changed (its SHA-256) is listed as missing, not exported."""
    from .store.atomic import atomic_write_json

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    parts, missing = [], []
    for r in rows:
        source = Path(str(r.get("path") or ""))
        target = dest / f"{int(r['id']):08d}_{source.name or 'part.png'}"
        try:
            if link:
                if not source.is_file():
                    raise FileNotFoundError(source)
                if target.is_symlink() or target.exists():
                    target.unlink()
                os.symlink(source.resolve(), target)
            else:
                data = source.read_bytes()
                if r.get("sha256") and hashlib.sha256(data).hexdigest() != r["sha256"]:
                    missing.append({"verdict_id": r["id"], "path": str(source), "why": "the file changed"})
                    continue
                tmp = target.with_name(f".{target.name}.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, target)
        except OSError:
            missing.append({"verdict_id": r["id"], "path": str(source), "why": "no file"})
            continue
        parts.append({"verdict_id": int(r["id"]), "sha256": r.get("sha256"), "source": str(source),
                      "file": target.name, "at": r.get("at"), "nearest_product": r.get("nearest_product")})
    summary = {"exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "mode": "symlink" if link
               else "copy", "parts": parts, "missing": missing}
    atomic_write_json(dest / PILE_FILE, summary)
    return summary


def discover_command(run_dir: str | Path, folder: str | Path) -> str:
    """The command that learns the products of an exported pile."""
    return f"moleflow add-task {run_dir} --discover --data {folder} --name new-"


def cluster_pile(model: Any, rows: Sequence[dict[str, Any]], max_products: int = 10, seed: int = 0
                 ) -> dict[str, Any]:
    """Cluster the pile's parts that still have their image file with `discover.split_products` (the router's
    features, k-means, k by silhouette): {"k", "method", "clusters": [{"name", "n", "verdict_ids"}], "n_images"}."""
    from .discover import split_products

    with_files = [r for r in rows if r.get("file")]
    if len(with_files) < 2:
        raise MoleflowError(f"{len(with_files)} unknown parts with an image file: at least 2 are needed to cluster")
    paths = [Path(str(r["path"])) for r in with_files]
    groups, labels, summary = split_products(model, paths, None, prefix="new-", seed=seed, max_products=max_products)
    clusters = []
    for i, name in enumerate(groups):
        ids = [int(with_files[j]["id"]) for j in range(len(with_files)) if int(labels[j]) == i]
        clusters.append({"name": name, "n": len(ids), "verdict_ids": ids})
    return {"k": summary["k"], "method": summary["method"], "n_images": len(paths), "clusters": clusters}
