"""Tests of moleflow.report: a fake run directory (the `moleflow train` contract) -> report.md/html."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import Normalize
from PIL import Image

from moleflow import metrics as M
from moleflow.metrics import mean_metrics
from moleflow.errors import MoleflowError
from moleflow.report import figures as F
from moleflow.report import render as R
from moleflow.report import write_report

CLASSES = ["bottle", "screw", "fabric_x"]  # fabric_x: no ground-truth masks -> no pixel metrics
METRICS = ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "aupro", "routing_accuracy"]
PIXEL = ("pixel_auroc", "pixel_ap", "aupro")
KINDS = ["detected", "detected", "missed", "false_alarm", "normal", "normal"]
SIZE = 48


def _class_metrics(rng: np.random.Generator, has_pixels: bool, defects: bool = True) -> dict:
    res = {m: round(float(rng.uniform(0.6, 1.0)), 4) for m in METRICS}
    if not has_pixels:
        res.update({m: None for m in PIXEL})
    res.update(n_test=40, n_anomalous=20)
    if defects:  # no random draws: the other numbers do not depend on it
        res["per_defect_image_auroc"] = {"crack": res["image_ap"], "scratch": None if not has_pixels else 0.5}
        res["per_defect_count"] = {"crack": 12, "scratch": 8}
    return res


def _write_scores(path: Path, cls: str, rng: np.random.Generator, threshold: float) -> None:
    labels = np.r_[np.zeros(20, int), np.ones(20, int)]
    scores = rng.normal(size=40) + 1.5 * labels
    scores[:3] = np.round(scores[:3])  # a few ties
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(R.SCORE_COLUMNS)
        for k, (lab, s) in enumerate(zip(labels, scores)):
            known = int(k != 5)
            w.writerow([_csv_file(cls, k, lab), "crack" if lab else "good", lab,
                        f"{s:.6f}", 0, cls, known, int(s > threshold)])


def _write_examples(path: Path, cls: str, rng: np.random.Generator, with_masks: bool) -> None:
    k = len(KINDS)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    masks = np.zeros((k, SIZE, SIZE), bool)
    if with_masks:
        for i, kind in enumerate(KINDS):
            if kind in ("detected", "missed"):
                masks[i] = (yy - 20 - 2 * i) ** 2 + (xx - 24) ** 2 < 60
    maps = (rng.normal(size=(k, SIZE, SIZE)) + 4 * masks).astype(np.float32)
    np.savez(path, images=rng.integers(0, 256, (k, SIZE, SIZE, 3), dtype=np.uint8), maps=maps, masks=masks,
             scores=rng.normal(size=k) + 2, labels=np.array([1, 1, 1, 0, 0, 0]), kinds=np.array(KINDS),
             files=np.array([_csv_file(cls, i + 20 * lab, lab) for i, lab in enumerate([1, 1, 1, 0, 0, 0])]))


def _csv_file(cls: str, k: int, label: int) -> str:
    """The file name of row k of a scores CSV (the examples point at the same files)."""
    return f"{cls}/test/{'bad' if label else 'good'}/{k:03d}.png"


def make_run(root: Path, tasks: list[list[str]], examples: bool = True, oracle: bool = True, seed: int = 0,
             defects: bool = True) -> Path:
    """A run directory following the `moleflow train` contract (random numbers); `defects` False: a run
    from before per-defect-type metrics."""
    rng = np.random.default_rng(seed)
    classes = [c for t in tasks for c in t]
    root.mkdir(parents=True, exist_ok=True)
    steps, learned = [], []
    for j, task in enumerate(tasks):
        learned += task
        steps.append({"step": j, "task_name": "+".join(task), "classes": task, "train_seconds": 10.0 + j,
                      "skipped_batches": 0, "threshold": 1.0 + 0.1 * j,
                      "calibration": {"source": "held-out normal training images", "n": 8, "false_alarm_rate": 0.01},
                      "results": {c: _class_metrics(rng, c != "fabric_x", defects) for c in learned}})
    final = steps[-1]["results"]
    final_mean = mean_metrics(final, METRICS)
    multi = len(tasks) > 1
    results = {
        "moleflow_version": "0.1.0", "created": "2026-11-22T15:00:00Z",
        "command": "moleflow train --data /data/mvtec --preset cpu <out>",
        "seed": 0,
        "config": {"backbone": {"name": "tf_efficientnet_lite0", "embed_dim": 128},
                   "data": {"image_size": 224, "resize_mode": "squash"}, "model": {}, "train": {"epochs": 12},
                   "router": {}, "score": {}, "preset": "cpu"},
        "backbone": {"name": "tf_efficientnet_lite0", "weights_sha256": "0123456789abcdef" * 4,
                     "weights_source": "https://example.org/weights.pth"},
        "dataset": {"root": "/data/mvtec", "name": "folder", "scenario": "1-1", "classes": classes, "tasks": tasks},
        "metrics": METRICS, "steps": steps, "final": final, "final_mean": final_mean,
        "continual": {m: {"bwt": -0.0123 if multi else None, "fm": 0.02 if multi else None} for m in METRICS},
        "routing_confusion": {"classes": classes, "tasks": ["+".join(t) for t in tasks] + ["unknown"],
                              "matrix": [[38 if i == t else (1 if t == (i + 1) % len(tasks) else 0)
                                          for t in range(len(tasks))] + [1] for i in range(len(classes))]},
        "timing": {"train_seconds": [s["train_seconds"] for s in steps], "eval_seconds": 12.0, "total_seconds": 100.0},
    }
    if oracle:
        results["oracle"] = {c: _class_metrics(rng, c != "fabric_x", defects) for c in classes}
        results["oracle_mean"] = mean_metrics(results["oracle"], METRICS)
    (root / "results.json").write_text(json.dumps(results, indent=1))
    (root / "scores").mkdir(exist_ok=True)
    for c in classes:
        _write_scores(root / "scores" / f"{c}.csv", c, rng, threshold=1.0)
    if examples:
        (root / "examples").mkdir(exist_ok=True)
        for c in classes:
            _write_examples(root / "examples" / f"{c}.npz", c, rng, with_masks=c != "fabric_x")
    return root


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, str, str]:
    run = make_run(tmp_path_factory.mktemp("run") / "run", [[c] for c in CLASSES])
    md_path, html_path = write_report(run)
    return run, md_path.read_text(), html_path.read_text()


def _table_rows(md: str, first_header: str) -> list[list[str]]:
    """Rows (cells) of the markdown table whose first header is `first_header`."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_files_written_and_returned(full_report):
    run, md, html = full_report
    assert (run / "report.md").is_file() and (run / "report.html").is_file()
    assert md.startswith("# MoLE-Flow report")
    assert "<title>MoLE-Flow report" in html


def test_html_is_self_contained(full_report):
    run, md, html = full_report
    n_figs = len(list((run / "figures").glob("*.png")))
    assert html.count('src="data:image/png;base64,') == n_figs
    assert 'src="figures/' not in html
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:|//)', html)
    assert "url(" not in html and "<script" not in html.lower() and "<link" not in html.lower()
    assert "https://example.org/weights.pth" in html  # the weight source as text, not a resource


def test_header_and_protocol(full_report):
    _, md, _ = full_report
    for text in ("2026-11-22T15:00:00Z", "moleflow train --data /data/mvtec", "tf_efficientnet_lite0",
                 "`0123456789ab`", "**Preset:** cpu", "1. bottle → 2. screw → 3. fabric_x", "**Seed:** 0",
                 "task-agnostic", "normal training", "BWT = mean over i < T-1 of (R[T-1,i] - R[i,i])",
                 "FM = mean over i < T-1 of (max over j in [i, T-2] of R[j,i] - R[T-1,i])"):
        assert text in md, text
    assert "0123456789abc" not in md  # only 12 characters of the hash


def test_every_class_appears(full_report):
    _, md, html = full_report
    for c in CLASSES:
        assert c in md and c in html
        assert f"### {c}" in md  # an example strip per class


def test_final_table_values_na_and_mean(full_report):
    run, md, _ = full_report
    results = json.loads((run / "results.json").read_text())
    rows = _table_rows(md, "Product")
    assert [r[0] for r in rows] == CLASSES + ["**Mean**"]
    for row in rows:
        assert all("nan" not in cell.lower() for cell in row)
    by_class = {r[0]: r for r in rows}
    for i, m in enumerate(METRICS, start=1):
        expected = results["final"]["bottle"][m]
        assert by_class["bottle"][i] == f"{100 * expected:.1f}"
        want = "n/a" if m in PIXEL else f"{100 * results['final']['fabric_x'][m]:.1f}"
        assert by_class["fabric_x"][i] == want
        mean = np.mean([results["final"][c][m] for c in CLASSES if results["final"][c][m] is not None])
        assert by_class["**Mean**"][i] == f"**{100 * mean:.1f}**"
        assert results["final_mean"][m] == pytest.approx(mean)
    assert by_class["bottle"][-1] == "40 (20)"
    for line in md.splitlines():
        if line.startswith("|"):
            assert "nan" not in line.lower()
    assert not re.search(r"\bnan\b", md, re.IGNORECASE)


def test_gap_table(full_report):
    run, md, _ = full_report
    results = json.loads((run / "results.json").read_text())
    rows = {r[0]: r for r in _table_rows(md, "Metric")}
    gap = results["final_mean"]["image_auroc"] - results["oracle_mean"]["image_auroc"]
    assert rows["I-AUROC"][1:] == [f"{100 * results['final_mean']['image_auroc']:.1f}",
                                   f"{100 * results['oracle_mean']['image_auroc']:.1f}", f"{100 * gap:+.1f} pp"]
    assert "Routing" not in rows


def test_per_defect_type_table(full_report):
    run, md, html = full_report
    results = json.loads((run / "results.json").read_text())
    assert "## Image AUROC per defect type" in md
    assert md.index("## Final results") < md.index("## Image AUROC per defect type") < md.index("## Decisions")
    assert R.table_markdown(["Product", "Defect type", "Anomalous images", "I-AUROC"], [], "llrr").splitlines() == \
        md.split("## Image AUROC per defect type", 1)[1].strip().splitlines()[:2]  # header and alignment
    rows = _table_rows(md.split("## Image AUROC per defect type", 1)[1], "Product")
    assert [r[:3] for r in rows] == [[c, t, n] for c in CLASSES for t, n in (("crack", "12"), ("scratch", "8"))]
    by_key = {(r[0], r[1]): r[3] for r in rows}
    for c in CLASSES:
        assert by_key[(c, "crack")] == f"{100 * results['final'][c]['per_defect_image_auroc']['crack']:.1f}"
    assert by_key[("bottle", "scratch")] == "50.0" and by_key[("fabric_x", "scratch")] == "n/a"
    assert "<h2 id=\"defect_types\">Image AUROC per defect type</h2>" in html
    table = html.split('id="defect_types"', 1)[1].split("</table>", 1)[0]
    assert '<th class="r">Anomalous images</th><th class="r">I-AUROC</th>' in table
    assert '<td>bottle</td><td>scratch</td><td class="r">8</td><td class="r">50.0</td>' in table
    assert table.count("<tr>") == 1 + 2 * len(CLASSES)


def test_per_defect_type_table_absent_for_old_runs(tmp_path):
    run = make_run(tmp_path / "old", [["bottle"], ["screw"]], examples=False, defects=False)
    md_path, html_path = write_report(run)
    assert "per defect type" not in md_path.read_text() and "defect_types" not in html_path.read_text()
    assert not re.search(r"\bnan\b", md_path.read_text(), re.IGNORECASE)


def test_decisions_from_csv(full_report):
    run, md, _ = full_report
    with open(run / "scores" / "bottle.csv") as fh:
        data = list(csv.DictReader(fh))
    false_alarms = sum(1 for d in data if d["label"] == "0" and d["anomalous"] == "1")
    detected = sum(1 for d in data if d["label"] == "1" and d["anomalous"] == "1")
    rows = _table_rows(md.split("## Decisions", 1)[1], "Product")
    assert [r[0] for r in rows] == CLASSES
    assert rows[0][1] == f"{false_alarms} / 20 ({100 * false_alarms / 20:.1f}%)"
    assert rows[0][2] == f"{detected} / 20 ({100 * detected / 20:.1f}%)"
    assert rows[0][3] == f"{20 - detected} / 20 ({100 * (20 - detected) / 20:.1f}%)"
    assert rows[0][4] == "1 / 40 (2.5%)"  # one image flagged as unknown product


def test_continual_and_timing(full_report):
    _, md, _ = full_report
    assert "-1.2 pp" in md and "+2.0 pp" in md  # BWT / FM as given
    rows = _table_rows(md, "Step")
    assert [r[0] for r in rows] == ["0", "1", "2"]
    assert rows[1][3] == "11.0" and rows[1][5] == "1.1" and rows[1][6] == "held-out normal training images"
    assert rows[1][8] == "1.0"


def test_figures_exist_and_decode(full_report):
    run, md, _ = full_report
    names = {p.stem for p in (run / "figures").glob("*.png")}
    expected = {"routed_vs_oracle", "continual_image_auroc", "continual_pixel_ap", "routing_confusion", "roc", "pr",
                "score_histograms"} | {f"examples_{c}" for c in CLASSES}
    assert expected == names
    for name in names:
        assert f"(figures/{name}.png)" in md
        with Image.open(run / "figures" / f"{name}.png") as img:
            img.load()
            assert img.format == "PNG" and min(img.size) > 100
            assert max(img.size) < 2500
    total = sum(p.stat().st_size for p in (run / "figures").glob("*.png"))
    assert total < 1_500_000


def test_single_task_run(tmp_path):
    run = make_run(tmp_path / "single", [["bottle"]], oracle=False)
    md_path, html_path = write_report(run, title="One product")
    md = md_path.read_text()
    assert md.startswith("# One product")
    assert "Only 1 task" in md and "No oracle evaluation" in md
    assert not list((run / "figures").glob("continual_*"))
    assert (run / "figures" / "examples_bottle.png").is_file()
    assert not re.search(r"\bnan\b", md, re.IGNORECASE)
    assert "data:image/png;base64," in html_path.read_text()


def test_missing_examples_and_broken_parts(tmp_path):
    run = make_run(tmp_path / "noex", [["bottle", "screw"], ["fabric_x"]], examples=False)
    (run / "scores" / "screw.csv").write_text("file,score\nx.png,1.0\n")  # no label column
    md_path, html_path = write_report(run)
    md = md_path.read_text()
    assert "No example images" in md
    assert "scores/screw.csv could not be read" in md
    assert not list((run / "figures").glob("examples_*"))
    assert "**Task order:** 1. bottle + screw → 2. fabric_x" in md
    assert not re.search(r"\bnan\b", md, re.IGNORECASE)
    assert (run / "figures" / "continual_image_auroc.png").is_file()
    html = html_path.read_text()
    assert "fabric_x" in html and 'src="figures/' not in html


def test_missing_results_json(tmp_path):
    with pytest.raises(MoleflowError, match="results.json"):
        write_report(tmp_path)


def test_html_escapes_user_text(tmp_path):
    run = make_run(tmp_path / "esc", [["bottle"]], examples=False, oracle=False)
    results = json.loads((run / "results.json").read_text())
    results["command"] = "moleflow train <script>alert(1)</script> --x `y`"
    (run / "results.json").write_text(json.dumps(results))
    shutil.rmtree(run / "scores")
    html = write_report(run)[1].read_text()
    assert "<script" not in html and "&lt;script&gt;" in html
    assert "No per-image scores" in html


@pytest.mark.parametrize("seed", [0, 1])
def test_curves_match_library_metrics(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(200) < 0.4
    scores = np.round(rng.normal(size=200) + labels, 1)  # many ties
    fpr, tpr, auc = F.roc_curve(scores, labels)
    recall, precision, ap = F.pr_curve(scores, labels)
    assert auc == pytest.approx(M.auroc(scores, labels), abs=1e-12)
    assert ap == pytest.approx(M.average_precision(scores, labels), abs=1e-12)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and recall[-1] == 1
    assert np.isnan(F.roc_curve(scores, np.zeros(200, bool))[2])


def test_table_markdown_and_formatting():
    md = R.table_markdown(["A", "B"], [["x|y", "1.0"], ["Mean", "2.0"]], bold_rows=[1])
    assert md.splitlines() == ["| A | B |", "| :--- | ---: |", "| x\\|y | 1.0 |", "| **Mean** | **2.0** |"]
    assert R.fmt_pct(None) == R.fmt_pct(float("nan")) == "n/a"
    assert R.fmt_pct(0.98765) == "98.8" and R.fmt_pp(-0.0123) == "-1.2 pp"
    assert R.inline_html("**a** `<b>` *c* 1\\*2") == "<strong>a</strong> <code>&lt;b&gt;</code> <em>c</em> 1*2"


def test_reusable_figures_small_multiples_and_bars():
    rng = np.random.default_rng(0)
    curves = {f"class_{i:02d}": (rng.normal(size=30), np.arange(30) % 3 == 0) for i in range(12)}
    for png in (F.roc_figure(curves),  # > MAX_OVERLAY classes: small multiples
                F.bar_chart(["I-AUROC", "P-AP"], {"run A": [0.9, None], "run B": [0.8, 0.5]},
                            title="Ablation", ylabel="metric")):
        with Image.open(io.BytesIO(png)) as img:
            assert img.format == "PNG" and img.size[0] > 300


def test_example_captions_use_csv_decisions(full_report):
    run, _, _ = full_report
    data = R.load_run(run)
    decisions = R._decisions_by_file(data.scores["bottle"])
    files = [str(f) for f in data.examples["bottle"]["files"]]
    assert all(f in decisions for f in files)
    rows = {r["file"]: r for r in csv.DictReader(open(run / "scores" / "bottle.csv"))}
    for f in files:
        want = " → unknown product" if rows[f]["known"] == "0" else (
            " → flagged" if rows[f]["anomalous"] == "1" else " → passed")
        assert decisions[f] == want
    groups = R._pick_examples(data.examples["bottle"]["kinds"], data.examples["bottle"]["scores"])
    kinds = [[KINDS[i] for i in idx] for _, idx in groups]
    assert kinds == [["detected", "detected", "normal", "normal"], ["missed", "false_alarm"]]


def test_overlay_tile_colours_and_outline():
    image = np.full((32, 32, 3), 128, np.uint8)
    amap = np.zeros((32, 32), np.float32)
    amap[:, 16:] = 10.0
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    norm = Normalize(0.0, 10.0)
    tile = F.overlay_tile(image, amap, mask, norm, size=32, alpha=0.5)
    assert tile.shape == (32, 32, 3) and tile.dtype == np.uint8
    assert tile[2, 2, 2] > tile[2, 2, 0]  # low values: blue tint
    assert tile[2, 30, 0] > tile[2, 30, 2]  # high values: red tint
    assert (tile[8, 12] == 255).all() and (tile[23, 12] == 255).all()  # white outline on the mask edge
    assert (tile[6, 12] == 0).all()  # black rim outside
    assert not (tile[16, 12] == 255).all()  # inside untouched
    plain = F.overlay_tile(image, amap, np.zeros((32, 32), bool), norm, size=16)
    assert plain.shape == (16, 16, 3)


def test_run_report_shows_realised_rates_from_the_verdict_store(tmp_path):
    """With RUN/verdicts.sqlite the run report gains "On the line": per product the flagged and passed parts, the
    reviews, and the realised false-alarm and detection rates (table and plot); without it the section is absent."""
    from moleflow.store.verdicts import VerdictStore, verdict_record

    run = make_run(tmp_path / "run", [[c] for c in CLASSES])
    md_before = write_report(run)[0].read_text()
    assert "On the line" not in md_before
    product = CLASSES[0]
    decisions = ["anomalous"] * 4 + ["normal"] * 16
    with VerdictStore(f"sqlite:///{run / 'verdicts.sqlite'}") as store:
        ids = store.add_many([verdict_record({"product": product, "nearest_product": product, "score": 1.0,
                                              "threshold": 0.5, "decision": d}, sha256=None, path=f"{i}.png",
                                             model_sha256=None, engine="torch", latency_ms=1.0, source="serve")
                              for i, d in enumerate(decisions)], return_ids=True)
        for vid, label in zip(ids[:4], ["false_alarm", "defect_confirmed", "defect_confirmed", "defect_confirmed"]):
            store.add_review(vid, label, reviewer="alice")
        for vid in ids[4:]:  # every passed part reviewed (audit rate 1 below): all good
            store.add_review(vid, "good_confirmed", reviewer="alice")
    md_path, html_path = write_report(run, audit_rate=1.0)
    md = md_path.read_text()
    assert "## On the line: decisions as reviewed" in md and "20 verdicts" in md
    row = next(r for r in _table_rows(md, "product") if r and r[0] == product and len(r) == 14)
    # 4 flagged, 1 of 4 reviewed a false alarm -> 1 false alarm among 1 + 16 good parts; every defect flagged;
    # every part reviewed and none of another product
    assert row[2:4] == ["4", "16"] and row[9] == f"{100 / 17:.1f}" and row[10] == "100.0"
    assert row[11:] == ["0", "0.0", "0"]
    assert (run / "figures" / "line_rates.png").is_file()
    assert "line_rates" in html_path.read_text() or "data:image/png" in html_path.read_text()
