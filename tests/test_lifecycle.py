"""Daily use: predict on new images, list tasks, add a product, remove a product."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from moleflow import MoleFlow
from moleflow.cli import main
from moleflow.data.synthetic import write_mvtec_layout

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
    assert main(args) == 0
    rows = list(csv.DictReader(open(pred_dir / "predictions.csv")))
    assert len(rows) == 6 + 3 + 1
    by_file = {r["file"]: r for r in rows}
    brick_rows = [r for f, r in by_file.items() if "/brick/" in f]
    assert all(r["nearest_product"] == "brick" for r in brick_rows)
    assert {r["decision"] for r in rows} <= {"normal", "anomalous", "unknown product"}
    assert by_file[str(noise)]["decision"] == "unknown product"
    for r in rows:
        assert (pred_dir / r["overlay"]).is_file()
        assert float(r["threshold"]) > 0
    summary = json.loads((pred_dir / "summary.json").read_text())
    assert summary["failed"][0]["file"] == str(bad)


def test_predict_with_no_readable_image_fails_cleanly(run_dir, tmp_path, capsys):
    _, out = run_dir
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"nope")
    assert main(["predict", str(out), str(bad), "--out", str(tmp_path / "p"), "--no-progress"]) == 2
    assert "no image could be read" in capsys.readouterr().err


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
    (work / "model.pt").write_bytes((out / "model.pt").read_bytes())
    probe = torch.randn(4, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    before = MoleFlow.load(work / "model.pt").predict(probe, task_ids=[0] * 4).scores
    assert main(["add-task", str(work), "--data", str(root), "--classes", "hubble", "--no-progress"]) == 0
    assert "check passed" in capsys.readouterr().out
    model = MoleFlow.load(work / "model.pt")
    assert [t.name for t in model.tasks] == ["brick", "grass", "hubble"]
    assert model.tasks[2].source["root"] == str(root)
    assert torch.equal(model.predict(probe, task_ids=[0] * 4).scores, before)
    assert main(["evaluate", str(work), "--no-report", "--no-progress"]) == 0  # each class from its task's source
    assert list(json.loads((work / "results.json").read_text())["final"]) == ["brick", "grass", "hubble"]
    assert main(["add-task", str(work), "--data", str(root), "--classes", "brick"]) == 2  # already learned
    assert main(["remove-task", str(work), "grass"]) == 0
    model = MoleFlow.load(work / "model.pt")
    assert [t.name for t in model.tasks] == ["brick", "hubble"]
    assert torch.equal(model.predict(probe, task_ids=[0] * 4).scores, before)
    assert main(["remove-task", str(work), "grass"]) == 2
