"""`moleflow bench scale` learns generated products into one model and measures it at each task count."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moleflow import MoleFlow
from moleflow.bench.scale import mixed_batch, product_images, scale_products
from moleflow.cli import main
from moleflow.errors import MoleflowError


def test_generated_products_are_distinct():
    products = scale_products(105)
    assert len({p.name for p in products}) == 105
    with pytest.raises(MoleflowError, match="1 to 105"):
        scale_products(106)
    # the colour variants of one picture are different images
    plain, _ = product_images(products[0], 2, 0, 32)
    recoloured, _ = product_images(products[15], 2, 0, 32)
    assert products[15].base == products[0].base and plain.shape == recoloured.shape == (2, 32, 32, 3)
    assert np.abs(plain.astype(int) - recoloured.astype(int)).mean() > 10
    held = [np.full((2, 8, 8, 3), p, np.uint8) for p in range(40)]
    images, owners = mixed_batch(held)
    assert images.shape == (32, 8, 8, 3) and len(np.unique(owners)) == 32
    assert (images[:, 0, 0, 0] == owners).all()


def test_bench_scale_cli_measures_each_count_and_the_checkpoint_loads(tmp_path):
    out, report = tmp_path / "run", tmp_path / "scale.json"
    threads = torch.get_num_threads()
    assert main(["bench", "scale", "--counts", "1", "3", "--preset", "tiny", "--n-train", "8", "--heldout", "2",
                 "--load-runs", "2", "--predict-runs", "2", "--threads", "1", "--out", str(out),
                 "--json", str(report)]) == 0
    assert torch.get_num_threads() == threads  # --threads 1 held for the benchmark only
    data = json.loads(report.read_text())
    assert data["machine"]["threads"] == 1
    assert data["command"].startswith("moleflow") and data["benchmark"] == "scale"
    settings = data["settings"]
    assert settings["preset"] == "tiny" and settings["images_per_product"] == 8
    assert settings["train"] == {"epochs": 2, "min_steps": 0, "batch_size": 8}
    assert settings["images_trained_per_product"] + settings["calibration_images_per_product"] == 8
    assert len(data["learn_seconds_per_task"]) == 3 and data["products"] == [p.name for p in scale_products(3)]
    one, three = data["rows"]
    assert [one["tasks"], three["tasks"]] == [1, 3]
    # the model folder: manifest + shared flow + an expert and its calibration file per task
    assert [one["checkpoint_files"], three["checkpoint_files"]] == [4, 8]
    assert three["checkpoint_bytes"] > one["checkpoint_bytes"] + 2 * one["expert_bytes"]
    assert one["expert_bytes"] == three["expert_bytes"] > 0 and three["manifest_bytes"] > one["manifest_bytes"]
    for row in data["rows"]:
        assert row["add_task_seconds"] > 0 and row["save_seconds"] > 0
        assert len(row["load_seconds_all"]) == 2 and row["load_seconds_median"] > 0
        assert 0 < row["read_files_seconds_median"] < row["load_seconds_first"]
        assert row["route_us_per_image"] > 0
        mixed = row["predict_mixed_batch"]
        assert mixed["images"] == 32 and mixed["products_in_batch"] == row["tasks"]
        assert 1 <= mixed["experts_used"] <= row["tasks"] and mixed["ms_per_batch"] > 0
        assert mixed["ms_per_image"] == pytest.approx(mixed["ms_per_batch"] / 32)
        assert row["predict_one_product_batch_ms"] > 0
        assert row["routing_heldout_images"] == 2 * row["tasks"] and 0 <= row["routing_accuracy"] <= 1
        fresh = row["fresh_process"]
        assert 100 < fresh["rss_mb_before_load"] <= fresh["rss_mb_after_load"] <= fresh["peak_rss_mb"]
        assert row["bench_process_peak_rss_mb"] > 100
    assert one["routing_accuracy"] == 1.0 and one["misrouted"] == {}  # one product: every image goes to it
    wrong = round((1 - three["routing_accuracy"]) * three["routing_heldout_images"])
    assert sum(three["misrouted"].values()) == wrong

    # the checkpoint of 3 tasks loads and scores images of its products
    model = MoleFlow.load(out)
    assert [t.name for t in model.tasks] == data["products"]
    _, held = product_images(scale_products(3)[2], 0, 4, model.config.data.image_size)
    pred = model.predict(list(held))
    assert pred.scores.shape == (4,) and np.isfinite(pred.scores.numpy()).all()
    assert set(pred.task_ids.tolist()) <= {t.task_id for t in model.tasks}

    # a second run into the same folder is refused (nothing of the first is overwritten)
    assert main(["bench", "scale", "--counts", "1", "--preset", "tiny", "--out", str(out),
                 "--json", str(tmp_path / "again.json")]) == 2
    assert not (tmp_path / "again.json").exists()


def test_bench_memory_learns_each_size_in_its_own_process(tmp_path):
    out = tmp_path / "memory.json"
    assert main(["bench", "memory", "--sizes", "12", "24", "--set", "train.epochs=1", "--set", "train.min_steps=0",
                 "--workers", "0", "--threads", "1", "--image-size", "112", "--images", str(tmp_path / "img"),
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["n_images"] for r in rows] == [12, 24]
    assert all(r["n_train"] + r["n_calibration"] == r["n_images"] for r in rows)
    assert rows[1]["cache_bytes"] > rows[0]["cache_bytes"] > 0
    assert all(r["peak_rss_bytes"] >= r["rss_before_learning_bytes"] > 0 for r in rows)
    assert len(list((tmp_path / "img").glob("*.png"))) == 24
