"""Thresholds with a stated guarantee, per-product operating points, and `moleflow calibrate`."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from moleflow import MoleFlow
from moleflow.calibration import calibration_split, conformal_threshold, images_needed
from moleflow.cli import main
from moleflow.data.synthetic import write_mvtec_layout

from helpers import random_images, tiny_config


def test_conformal_threshold_is_the_exact_order_statistic():
    scores = np.arange(1.0, 20.0)  # n = 19, shuffled order must not matter
    np.random.default_rng(0).shuffle(scores)
    r = conformal_threshold(scores, 0.1)  # k = ceil(20 * 0.9) = 18
    assert (r.rank, r.threshold, r.n) == (18, 18.0, 19)
    assert r.supported == pytest.approx(1 / 20) and r.guaranteed == pytest.approx(0.1) and not r.warning
    r = conformal_threshold(np.arange(1.0, 10.0), 0.1)  # n = 9: k = ceil(10 * 0.9) = 9, the largest
    assert (r.rank, r.threshold) == (9, 9.0) and not r.warning


def test_too_few_scores_say_what_they_can_guarantee():
    r = conformal_threshold([3.0, 1.0, 2.0, 5.0, 4.0], 0.01)  # k = ceil(6 * 0.99) = 6 > 5
    assert r.threshold == 5.0 and r.rank == 5
    assert r.supported == pytest.approx(1 / 6) and r.guaranteed == pytest.approx(1 / 6)
    assert "5 calibration images" in r.warning and "99" in r.warning
    # both ways to tighten the promise are named: more good parts later, or more of the product's images held out
    assert "moleflow calibrate" in r.warning and "score.calibration_keep_train" in r.warning
    empty = conformal_threshold([], 0.01)
    assert math.isinf(empty.threshold) and empty.warning


def test_the_guarantee_holds_on_new_normals():
    """Over many calibration sets, the rate at which a new normal exceeds the threshold is at most the
    requested rate (exactly 1 - k/(n+1) for continuous scores), and the 95 % interval covers it."""
    rng = np.random.default_rng(1)
    n, rate = 30, 0.1  # k = ceil(31 * 0.9) = 28: expected rate 1 - 28/31 = 0.0968
    realised, covered = [], []
    for _ in range(2000):
        r = conformal_threshold(rng.normal(size=n), rate)
        p = float(1 - 0.5 * (1 + math.erf(r.threshold / math.sqrt(2))))  # exact P(new normal > threshold)
        realised.append(p)
        covered.append(r.interval[0] <= p <= r.interval[1])
    assert np.mean(realised) <= rate and abs(np.mean(realised) - (1 - 28 / 31)) < 0.005
    assert 0.93 <= np.mean(covered) <= 0.97


def test_calibration_split_holds_out_what_the_rate_needs():
    assert images_needed(0.01) == 99 and images_needed(0.05) == 19 and images_needed(0.1) == 9
    assert calibration_split(666, 0.01, 0.1, 200) == 99
    assert calibration_split(260, 0.01, 0.1, 200) == 60  # 200 images stay for training
    assert calibration_split(80, 0.01, 0.1, 200) == 8  # a small product: 10 %
    assert calibration_split(400, 0.05, 0.1, 200) == 40  # at least 10 %
    assert calibration_split(9, 0.01, 0.1, 200) == 0  # too few images to hold any out
    assert calibration_split(300, 0.01, 0.0, 200) == 0  # repo preset: nothing held out
    # a small product that trades training images for a tighter promise (docs/decisions.md §1)
    assert calibration_split(120, 0.01, 0.1, 200) == 12 and calibration_split(120, 0.01, 0.1, 80) == 40


def test_fit_task_uses_its_own_false_alarm_rate():
    model = MoleFlow(tiny_config(**{"score.calibration_keep_train": 40}))
    info = model.fit_task(random_images(0, 60), name="a", false_alarm_rate=0.1)
    cal = info.calibration
    assert cal["false_alarm_rate"] == 0.1 and cal["n"] == 9  # 60 images: 9 needed, 51 remain >= 40
    assert cal["rule"].startswith("conformal") and len(cal["scores"]) == 9
    assert info.threshold == sorted(cal["scores"])[math.ceil(10 * 0.9) - 1] and not cal["warning"]
    assert model.inspector.threshold(info.task_id) == info.threshold


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_mvtec_layout(root, ["brick", "grass"], n_train=20, n_test_good=3, n_test_defect=3, size=112, seed=0)
    extra = tmp_path_factory.mktemp("extra")
    write_mvtec_layout(extra, ["brick"], n_train=24, n_test_good=1, n_test_defect=1, size=112, seed=7)
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--data", str(root), "--classes", "brick", "grass", "--out", str(out), "--preset", "tiny",
                 "--set", "train.epochs=1", "--no-progress", "--false-alarm-rate", "0.05", "grass=0.2"]) == 0
    return root, extra / "brick" / "train" / "good", out


def test_train_takes_rates_per_product(trained):
    _, _, out = trained
    tasks = {t.name: t for t in MoleFlow.load(out).tasks}
    assert tasks["brick"].calibration["false_alarm_rate"] == 0.05
    assert tasks["grass"].calibration["false_alarm_rate"] == 0.2
    results = json.loads((out / "results.json").read_text())
    assert set(results["thresholds"]) == {"brick", "grass"}
    assert all(0 <= v["realised"] <= 1 for v in results["thresholds"].values())
    assert all(c["routing_accuracy_good"] is not None for c in results["final"].values())
    stress = results["routing_stress"]["per_class"]
    assert set(stress) == {"brick", "grass"} and set(stress["brick"]["defective"]) == {"0.02", "0.05", "0.1", "0.2"}


def test_calibrate_changes_only_the_products_threshold(trained, tmp_path, capsys):
    _, normals, out = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    before_files = {p.name for p in (run / "model").iterdir()}
    model = MoleFlow.load(run)
    probe = random_images(3, 6, shift=0.5)
    before = model.predict(probe)
    old = {t.name: t.threshold for t in model.tasks}
    old_n = model.task_by_name("brick").calibration["n"]
    assert old_n == 2  # 20 training images: 10 %
    assert main(["calibrate", str(run), "--product", "brick", "--normals", str(normals)]) == 0
    assert "threshold" in capsys.readouterr().out
    after_files = {p.name for p in (run / "model").iterdir()}
    changed = sorted(before_files ^ after_files)
    assert len(changed) == 2 and all(n.startswith("task0-calibration-") for n in changed)  # old and new
    loaded = MoleFlow.load(run)
    after = loaded.predict(probe)
    assert torch.equal(before.scores, after.scores) and torch.equal(before.maps, after.maps)
    assert torch.equal(before.task_ids, after.task_ids)
    grass = after.task_ids == 1
    assert torch.equal(before.anomalous[grass], after.anomalous[grass])  # other products decide as before
    brick = next(t for t in loaded.tasks if t.name == "brick")
    assert brick.calibration["n"] == old_n + 24 and "moleflow calibrate" in brick.calibration["source"]
    assert brick.calibration["history"][-1]["threshold"] == old["brick"]
    assert next(t for t in loaded.tasks if t.name == "grass").threshold == old["grass"]
    results = json.loads((run / "results.json").read_text())
    assert results["thresholds"]["brick"]["threshold"] == brick.threshold


def test_calibrate_refuses_empty_or_unreadable_folders(trained, tmp_path, capsys):
    _, _, out = trained
    run = tmp_path / "run"
    shutil.copytree(out, run)
    manifest = (run / "model" / "manifest.json").read_bytes()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["calibrate", str(run), "--product", "brick", "--normals", str(empty)]) == 2
    assert "no images found" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "part.png").write_bytes(b"not an image")
    assert main(["calibrate", str(run), "--product", "brick", "--normals", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "part.png" in err and len(err.strip().splitlines()) == 1
    assert main(["calibrate", str(run), "--product", "nope", "--normals", str(bad)]) == 2
    assert (run / "model" / "manifest.json").read_bytes() == manifest
