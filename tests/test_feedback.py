"""Feedback from the line (feedback.py) on a real SQLite verdict store: the audit sample, the review queue,
realised rates from reviews, the parts `calibrate --from-reviews` uses, and the unknown-product pile and its
export. No model: verdict rows are written directly."""

from __future__ import annotations

import json

import pytest

from moleflow import MoleflowError
from moleflow.feedback import (AUDIT_RATE, audit_value, calibration_parts, export_pile, exported_ids, image_of,
                               in_audit, quality, review_queue, unknown_pile)
from moleflow.store.verdicts import VerdictStore, sqlite_url


def verdict(product: str, decision: str, score: float = 1.0, path: str = "p.png", sha: str | None = None,
            at: str | None = None) -> dict:
    return {"sha256": sha, "path": path, "product": product if decision != "unknown product" else decision,
            "nearest_product": product, "score": score, "threshold": 2.0, "decision": decision, "source": "watch",
            "at": at}


@pytest.fixture
def store(tmp_path):
    with VerdictStore(sqlite_url(tmp_path / "v.sqlite")) as s:
        yield s


def test_the_audit_sample_is_fixed_nested_and_at_its_rate():
    values = [audit_value(i) for i in range(1, 20001)]
    assert values == [audit_value(i) for i in range(1, 20001)] and all(0 <= v < 1 for v in values)
    for rate in (0.01, 0.05, 0.2):
        share = sum(v < rate for v in values) / len(values)
        assert abs(share - rate) < 4 * (rate * (1 - rate) / len(values)) ** 0.5 + 1e-3, (rate, share)
    small = {i for i in range(1, 5001) if in_audit(i, 0.02)}
    assert small <= {i for i in range(1, 5001) if in_audit(i, 0.1)}  # nested
    assert not any(in_audit(i, 0.0) for i in range(1, 1000))
    assert {i for i in range(1, 3000) if in_audit(i, 0.1, seed=1)} != {i for i in range(1, 3000) if in_audit(i, 0.1)}


def test_the_queue_holds_flagged_unknown_and_audited_parts_not_yet_reviewed(store):
    rows = [verdict("brick", "normal") for _ in range(300)] + [verdict("brick", "anomalous", 3.0) for _ in range(5)] \
        + [verdict("grass", "unknown product", 9.0) for _ in range(3)] + [verdict("grass", "normal") for _ in range(100)]
    ids = store.add_many(rows, return_ids=True)
    rate = 0.1
    queue = review_queue(store, rate, limit=500)
    assert [q["id"] for q in queue] == sorted((q["id"] for q in queue), reverse=True)  # newest first
    expected = {i for i, r in zip(ids, rows) if r["decision"] != "normal" or in_audit(i, rate)}
    assert {q["id"] for q in queue} == expected
    why = {q["id"]: q["why"] for q in queue}
    assert sum(w == "flagged" for w in why.values()) == 5 and sum(w == "unknown product" for w in why.values()) == 3
    assert all(why[i] == "audit sample" for i, r in zip(ids, rows) if r["decision"] == "normal" and i in why)
    assert {q["id"] for q in review_queue(store, rate, product="grass", decision="normal", limit=500)} == \
        {i for i, r in zip(ids, rows) if r["product"] == "grass" and r["decision"] == "normal" and in_audit(i, rate)}
    flagged = [q for q in queue if q["why"] == "flagged"]
    store.add_review(flagged[0]["id"], "defect_confirmed", reviewer="alice")
    after = review_queue(store, rate, limit=500)
    assert flagged[0]["id"] not in {q["id"] for q in after} and len(after) == len(queue) - 1
    again = review_queue(store, rate, limit=500, include_reviewed=True)
    assert next(q for q in again if q["id"] == flagged[0]["id"])["review"]["label"] == "defect_confirmed"
    assert len(review_queue(store, rate, limit=3)) == 3
    with pytest.raises(MoleflowError, match="audit-rate"):
        review_queue(store, 1.5)


def test_realised_rates_from_reviews_per_day(store):
    """Day 1: 100 passed, 10 flagged; of the flagged 8 reviewed (6 false alarms, 2 defects); of the passed,
    the audit sample reviewed (all good but one escaped defect)."""
    day1, day2 = "2025-03-01T10:00:00+00:00", "2025-03-02T10:00:00+00:00"
    ids = store.add_many([verdict("brick", "normal", at=day1) for _ in range(100)]
                         + [verdict("brick", "anomalous", 3.0, at=day1) for _ in range(10)]
                         + [verdict("brick", "normal", at=day2) for _ in range(50)]
                         + [verdict("grass", "unknown product", 9.0, at=day2)], return_ids=True)
    passed1, flagged1, passed2 = ids[:100], ids[100:110], ids[110:160]
    for vid in flagged1[:6]:
        store.add_review(vid, "false_alarm", reviewer="alice")
    for vid in flagged1[6:8]:
        store.add_review(vid, "defect_confirmed", reviewer="alice")
    rate = 0.2
    audited = [v for v in passed1 if in_audit(v, rate)]
    assert len(audited) >= 3
    store.add_review(audited[0], "defect_confirmed", reviewer="bob")  # an escape
    for vid in audited[1:]:
        store.add_review(vid, "good_confirmed", reviewer="bob")
    outside = next(v for v in passed1 if not in_audit(v, rate))
    store.add_review(outside, "defect_confirmed", reviewer="bob")  # not a random draw: not used
    q = quality(store, rate)
    assert set(q) == {"brick"}  # unknown-product parts belong to no product
    d1, d2 = q["brick"]["days"]
    assert (d1["day"], d1["flagged"], d1["passed"], d2["unknown"]) == ("2025-03-01", 10, 100, 1)
    g = len(audited) - 1
    fp, tp = 10 * 6 / 8, 10 * 2 / 8
    tn, fn = 100 * g / len(audited), 100 * 1 / len(audited)
    assert d1["false_alarm_rate"] == pytest.approx(fp / (fp + tn))
    assert d1["detection_rate"] == pytest.approx(tp / (tp + fn))
    assert d1["reviewed"] == {"false_alarm": 6, "defect_confirmed_flagged": 2, "good_confirmed": g,
                              "defect_confirmed_passed": 1, "wrong_product_flagged": 0, "wrong_product_passed": 0}
    assert d1["wrong_product_rate"] == 0.0 and d2["wrong_product_rate"] is None  # day 2: no passed part reviewed
    assert d2["false_alarm_rate"] == 0.0 and d2["detection_rate"] is None and d2["assumed"]  # nothing reviewed
    total = q["brick"]["total"]
    assert total["flagged"] == 10 and total["passed"] == 150 and total["detection_rate"] == pytest.approx(
        tp / (tp + 150 * 1 / len(audited)))
    assert quality(store, rate, product="grass") == {}


def test_calibration_uses_the_audit_sample_reviewed_good(store, tmp_path):
    files = []
    for i in range(60):
        f = tmp_path / f"part{i}.png"
        f.write_bytes(f"image {i}".encode())
        files.append(f)
    import hashlib

    rows = [verdict("brick", "anomalous" if i % 6 == 0 else "normal", path=str(f),
                    sha=hashlib.sha256(f.read_bytes()).hexdigest()) for i, f in enumerate(files)]
    ids = store.add_many(rows, return_ids=True)
    rate = 0.3
    audit = [i for i in ids if in_audit(i, rate)]
    flagged_ids = [i for i, r in zip(ids, rows) if r["decision"] == "anomalous"]
    for vid in flagged_ids:  # every flagged part reviewed: false alarms
        store.add_review(vid, "false_alarm", reviewer="alice")
    passed_audit = [i for i in audit if i not in flagged_ids]
    for vid in passed_audit[:-1]:  # all but one audited passed part reviewed good
        store.add_review(vid, "good_confirmed", reviewer="alice")
    good, counts = calibration_parts(store, "brick", rate)
    expected = {i for i in audit if i in flagged_ids} | set(passed_audit[:-1])
    assert {r["id"] for r in good} == expected
    assert counts["audit"] == len(audit) and counts["unreviewed"] == 1 and counts["good"] == len(expected)
    assert counts["false_alarms_outside"] == len([i for i in flagged_ids if not in_audit(i, rate)])
    assert all(image_of(r) is not None for r in good)
    files[ids.index(good[0]["id"])].write_bytes(b"changed")  # the file changed: not this part any more
    assert image_of(good[0]) is None
    with pytest.raises(MoleflowError, match="audit-rate 0"):
        calibration_parts(store, "brick", 0.0)
    assert AUDIT_RATE == 0.05


def test_the_unknown_pile_is_exported_once(store, tmp_path):
    import hashlib

    files = []
    for i in range(6):
        f = tmp_path / "line" / f"u{i}.png"
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(f"unknown {i}".encode())
        files.append(f)
    ids = store.add_many([verdict("brick", "unknown product", 9.0, path=str(f),
                                  sha=hashlib.sha256(f.read_bytes()).hexdigest()) for f in files]
                         + [verdict("brick", "unknown product", 9.0, path="upload.png")], return_ids=True)
    store.add_review(ids[0], "wrong_product", reviewer="bob", correct_product="brick")  # a learned product: not new
    store.add_review(ids[1], "wrong_product", reviewer="bob", correct_product="bolt")  # a new one: stays
    store.add_review(ids[2], "defect_confirmed", reviewer="bob")  # defective: no part to learn from
    run = tmp_path / "run"
    pile = unknown_pile(store, run, learned=["brick", "grass"])
    assert [r["id"] for r in pile] == ids[1:2] + ids[3:]
    assert [r["file"] for r in pile] == [True, True, True, True, False]
    files[3].write_bytes(b"changed since")
    summary = export_pile(pile, run / "unknowns" / "2025-03-01")
    exported = {p["verdict_id"] for p in summary["parts"]}
    assert exported == {ids[1], ids[4], ids[5]} and {m["verdict_id"] for m in summary["missing"]} == {ids[3], ids[6]}
    folder = run / "unknowns" / "2025-03-01"
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{i:08d}_u{j}.png" for i, j in
                                                               ((ids[1], 1), (ids[4], 4), (ids[5], 5))] + ["pile.json"])
    assert json.loads((folder / "pile.json").read_text())["mode"] == "copy"
    assert exported_ids(run) == exported
    assert [r["id"] for r in unknown_pile(store, run, learned=["brick"])] == [ids[3], ids[6]]  # not offered again
    assert len(unknown_pile(store, run, learned=["brick"], include_exported=True)) == 5
    linked = export_pile([r for r in pile if r["id"] == ids[5]], tmp_path / "links", link=True)
    assert linked["mode"] == "symlink" and (tmp_path / "links" / f"{ids[5]:08d}_u5.png").is_symlink()


def test_wrong_product_rate_from_reviews(store):
    """How often a verdict names the wrong product, from the same strata: 20 flagged parts, 10 reviewed, 2 of them
    wrong_product; 200 passed parts, the audit sample reviewed with 1 wrong_product. Wrong-product reviews stay out
    of the false-alarm and detection rates. Ambiguous verdicts are counted per day."""
    at = "2025-03-01T10:00:00+00:00"
    rows = ([verdict("brick", "normal", at=at) for _ in range(200)]
            + [verdict("brick", "anomalous", 3.0, at=at) for _ in range(20)])
    for r in rows[:7]:
        r["route_ambiguous"] = True
    ids = store.add_many(rows, return_ids=True)
    passed, flagged = ids[:200], ids[200:]
    for vid in flagged[:2]:
        store.add_review(vid, "wrong_product", reviewer="alice", correct_product="grass")
    for vid in flagged[2:10]:
        store.add_review(vid, "false_alarm", reviewer="alice")
    rate = 0.2
    audited = [v for v in passed if in_audit(v, rate)]
    assert len(audited) >= 4
    store.add_review(audited[0], "wrong_product", reviewer="bob", correct_product="grass")
    for vid in audited[1:]:
        store.add_review(vid, "good_confirmed", reviewer="bob")
    total = quality(store, rate)["brick"]["total"]
    wrong = 20 * 2 / 10 + 200 * 1 / len(audited)
    assert total["wrong_product"] == pytest.approx(wrong)
    assert total["wrong_product_rate"] == pytest.approx(wrong / 220)
    assert total["reviewed"]["wrong_product_flagged"] == 2 and total["reviewed"]["wrong_product_passed"] == 1
    assert total["false_alarm_rate"] == pytest.approx(20 / 220)  # every reviewed flagged part a false alarm
    assert total["ambiguous"] == 7 and quality(store, rate)["brick"]["days"][0]["ambiguous"] == 7
