"""End to end: generated products learned one after another through the CLI, then re-evaluated."""

from __future__ import annotations

import json

import pytest

from moleflow.cli import main
from moleflow.data.synthetic import write_mvtec_layout

SMALL = ["--preset", "cpu-faithful", "--set", "backbone.embed_dim=64", "--set", "model.num_coupling_blocks=2",
         "--set", "model.lora_rank=8", "--set", "train.batch_size=8", "--set", "train.epochs=30", "--no-progress"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_mvtec_layout(root, ["brick", "grass", "hubble"], n_train=30, n_test_good=10, n_test_defect=10,
                       size=224, seed=1)
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "--data", str(root), "--out", str(out)] + SMALL) == 0
    return root, out


def test_three_task_continual_run_detects_synthetic_defects(trained_run):
    _, out = trained_run
    results = json.loads((out / "results.json").read_text())
    assert [s["task_name"] for s in results["steps"]] == ["brick", "grass", "hubble"]
    final = results["final"]
    for name, metrics in final.items():
        assert metrics["image_auroc"] >= 0.9, (name, metrics)
        assert metrics["pixel_auroc"] >= 0.9, (name, metrics)
        assert metrics["routing_accuracy"] == 1.0
    assert results["final_mean"]["image_auroc"] >= 0.95
    # zero forgetting: with perfect routing every class keeps its first score exactly
    for metric in ("image_auroc", "pixel_ap"):
        assert results["continual"][metric]["bwt"] == pytest.approx(0.0, abs=1e-12)
        assert results["continual"][metric]["fm"] == pytest.approx(0.0, abs=1e-12)
    matrix = results["routing_confusion"]["matrix"]  # rows: class; columns: task, then "unknown product"
    for i, row in enumerate(matrix):
        assert row[i] + row[-1] == 20 and sum(row) == 20
    assert sum(row[-1] for row in matrix) <= 1  # defective parts of known products are rarely "unknown"
    for name in ("config.yaml", "model/manifest.json", "final.csv", "matrix_image_auroc.csv", "scores/brick.csv",
                 "examples/hubble.npz", "report.html", "report.md"):
        assert (out / name).exists(), name
    assert results["backbone"]["weights_sha256"]
    assert results["config"]["train"]["seed"] == 0


def test_evaluate_reproduces_the_training_run(trained_run):
    _, out = trained_run
    before = json.loads((out / "results.json").read_text())
    assert main(["evaluate", str(out), "--no-report"]) == 0
    after = json.loads((out / "results.json").read_text())
    assert after["final"] == before["final"]
    assert [s["results"] for s in after["steps"]] == [s["results"] for s in before["steps"]]
    assert after["oracle"] == before["oracle"]
