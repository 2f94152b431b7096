"""Daily use: predict on new images, list tasks, add a product, remove a product."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from moleflow import MoleFlow
from moleflow.cli import main
from moleflow.data.synthetic import write_mvtec_layout
from moleflow.store import run_lock

TINY = ["--preset", "tiny", "--set", "train.epochs=3", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_mvtec_layout(root, ["brick", "grass", "hubble"], n_train=20, n_test_good=3, n_test_defect=3, size=112, seed=0)
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--data", str(root), "--classes", "brick", "grass", "--out", str(out), "--no-report"]
                + TINY) == 0
    return root, out


def test_predict_writes_decisions_overlays_and_a_summary(run_dir, tmp_path):
    root, out = run_dir
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 90, 3), dtype=np.uint8)).save(noise)
    pred_dir = tmp_path / "pred"
    args = ["predict", str(out), str(root / "brick" / "test"), str(root / "grass" / "test" / "good" / "*.png"),
            str(bad), str(noise), "--out", str(pred_dir), "--no-progress"]
    assert main(args) == 3  # one part was not inspected: the line system must learn it
    rows = list(csv.DictReader(open(pred_dir / "predictions.csv")))
    assert len(rows) == 6 + 3 + 1 + 1  # every input has a row, the unreadable one included
    by_file = {r["file"]: r for r in rows}
    brick_rows = [r for f, r in by_file.items() if "/brick/" in f]
    assert all(r["nearest_product"] == "brick" for r in brick_rows)
    assert by_file[str(bad)]["decision"] == "unreadable" and "cannot read" in by_file[str(bad)]["reason"]
    inspected = [r for r in rows if r["file"] != str(bad)]
    assert {r["decision"] for r in inspected} <= {"normal", "anomalous", "unknown product"}
    assert by_file[str(noise)]["decision"] == "unknown product"
    for r in inspected:
        assert (pred_dir / r["overlay"]).is_file()
        assert float(r["threshold"]) > 0 and r["threshold_source"].startswith("conformal")
    summary = json.loads((pred_dir / "summary.json").read_text())
    assert summary["failed"][0]["file"] == str(bad) and summary["not_inspected"] == 1
    assert main(args + ["--allow-unreadable", "--csv-only"]) == 0


def test_predict_with_no_readable_image_reports_every_part(run_dir, tmp_path, capsys):
    _, out = run_dir
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"nope")
    assert main(["predict", str(out), str(bad), "--out", str(tmp_path / "p"), "--no-progress"]) == 3
    assert "1 NOT INSPECTED" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "p" / "predictions.csv")))
    assert [r["decision"] for r in rows] == ["unreadable"]


def test_tasks_lists_products(run_dir, capsys):
    _, out = run_dir
    assert main(["tasks", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["brick", "grass"]
    assert all(r["parameters"] > 0 and r["bytes"] > r["parameters"] * 4 for r in rows)
    assert rows[0]["calibration"] == "held-out normal training images"


def test_add_then_remove_a_task(run_dir, tmp_path, capsys):
    root, out = run_dir
    work = tmp_path / "run"
    work.mkdir()
    shutil.copytree(out / "model", work / "model")
    probe = torch.randn(4, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    before = MoleFlow.load(work).predict(probe, task_ids=[0] * 4).scores
    assert main(["add-task", str(work), "--data", str(root), "--classes", "hubble", "--no-progress"]) == 0
    assert "check passed" in capsys.readouterr().out
    model = MoleFlow.load(work)
    assert [t.name for t in model.tasks] == ["brick", "grass", "hubble"]
    assert model.tasks[2].source["root"] == str(root)
    assert torch.equal(model.predict(probe, task_ids=[0] * 4).scores, before)
    assert main(["evaluate", str(work), "--no-report", "--no-progress"]) == 0  # each class from its task's source
    assert list(json.loads((work / "results.json").read_text())["final"]) == ["brick", "grass", "hubble"]
    assert main(["add-task", str(work), "--data", str(root), "--classes", "brick"]) == 2  # already learned
    assert main(["remove-task", str(work), "grass"]) == 0
    model = MoleFlow.load(work)
    assert [t.name for t in model.tasks] == ["brick", "hubble"]
    assert torch.equal(model.predict(probe, task_ids=[0] * 4).scores, before)
    assert main(["remove-task", str(work), "grass"]) == 2
    assert main(["remove-task", str(work), "hubble"]) == 0
    assert main(["remove-task", str(work), "brick"]) == 2  # the last task: refused, the run stays usable
    assert "only learned task" in capsys.readouterr().err
    assert [t.name for t in MoleFlow.load(work).tasks] == ["brick"]


def test_a_second_writer_is_stopped_with_a_clear_message(run_dir, tmp_path, capsys):
    root, out = run_dir
    work = tmp_path / "run"
    work.mkdir()
    shutil.copytree(out / "model", work / "model")
    manifest = (work / "model" / "manifest.json").read_bytes()
    with run_lock(work):  # another process is adding a product
        assert main(["add-task", str(work), "--data", str(root), "--classes", "hubble", "--no-progress"]) == 2
        assert "being changed by another moleflow process" in capsys.readouterr().err
        assert main(["remove-task", str(work), "grass"]) == 2
    assert (work / "model" / "manifest.json").read_bytes() == manifest


def test_a_second_writer_in_another_process_is_stopped(run_dir, tmp_path):
    """Two `moleflow add-task` on one run at the same time: one is refused, nothing is lost."""
    root, out = run_dir
    work = tmp_path / "run"
    work.mkdir()
    shutil.copytree(out / "model", work / "model")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from moleflow.store import run_lock\n"
                               "with run_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)",
                               str(work)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc = main(["add-task", str(work), "--data", str(root), "--classes", "hubble", "--no-progress"])
        assert rc == 2
    finally:
        holder.kill()
        holder.wait()
    assert [t.name for t in MoleFlow.load(work).tasks] == ["brick", "grass"]


def test_train_refuses_to_replace_a_run(run_dir, capsys):
    root, out = run_dir
    manifest = (out / "model" / "manifest.json").read_bytes()
    assert main(["train", "--data", str(root), "--classes", "hubble", "--out", str(out), "--no-report"] + TINY) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and "--resume" in err
    assert (out / "model" / "manifest.json").read_bytes() == manifest


def test_resume_learns_only_the_missing_tasks_and_overwrite_starts_again(run_dir, tmp_path, capsys):
    root, out = run_dir
    work = tmp_path / "run"
    work.mkdir()
    shutil.copytree(out / "model", work / "model")
    before = {p.name for p in (work / "model").iterdir()}
    args = ["train", "--data", str(root), "--classes", "brick", "grass", "hubble", "--out", str(work),
            "--no-report"] + TINY
    assert main(args + ["--resume"]) == 0
    model = MoleFlow.load(work)
    assert [t.name for t in model.tasks] == ["brick", "grass", "hubble"]
    assert before <= {p.name for p in (work / "model").iterdir()}  # brick and grass were not re-learned
    results = json.loads((work / "results.json").read_text())
    assert [s["task_name"] for s in results["steps"]] == ["brick", "grass", "hubble"]
    assert main(args[:4] + ["grass", "brick"] + args[6:] + ["--resume"]) == 2  # another sequence
    assert "not the start of the requested sequence" in capsys.readouterr().err
    (work / "report.md").write_text("a report of the old run")
    assert main(["train", "--data", str(root), "--classes", "hubble", "--out", str(work), "--no-report",
                 "--overwrite"] + TINY) == 0
    assert [t.name for t in MoleFlow.load(work).tasks] == ["hubble"]
    assert not (work / "report.md").exists()  # no stale report describing the replaced model


def test_bad_test_files_are_found_before_any_training(tmp_path, capsys):
    root = tmp_path / "data"
    write_mvtec_layout(root, ["brick"], n_train=12, n_test_good=2, n_test_defect=2, size=112, seed=0)
    defect = sorted(p for p in (root / "brick" / "test").rglob("*.png") if "good" not in p.parts)[0]
    defect.write_bytes(defect.read_bytes()[:60])  # a truncated camera file
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--classes", "brick", "--out", str(out)] + TINY) == 2
    assert defect.name in capsys.readouterr().err
    assert not (out / "config.yaml").exists() and not (out / "model").exists()  # no half run
    mask = next((root / "brick" / "ground_truth").rglob("*.png"))
    defect.unlink()
    Image.new("L", (50, 50)).save(mask)  # a mask of the wrong size
    assert main(["train", "--data", str(root), "--classes", "brick", "--out", str(out)] + TINY) == 2
    err = capsys.readouterr().err
    assert mask.name in err or "mask" in err


def test_an_unwritable_output_is_refused_before_training(run_dir, tmp_path, capsys):
    root, _ = run_dir
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["train", "--data", str(root), "--classes", "brick", "--out", str(blocker / "run")] + TINY) == 2
    assert "a_file" in capsys.readouterr().err


def test_small_calibration_sets_are_reported(run_dir, capsys):
    _, out = run_dir
    assert main(["tasks", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 calibration images" in text and "not the requested 1.0%" in text  # 20 images, 10 % held out
