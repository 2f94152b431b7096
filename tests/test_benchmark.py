"""The speed benchmark runs end to end on a tiny configuration and reports every measurement."""

from __future__ import annotations

import json

from moleflow.cli import main

from helpers import tiny_config


def test_speed_benchmark_reports_every_measurement(tmp_path):
    from moleflow.bench.speed import speed_benchmark

    result = speed_benchmark(tiny_config(), n_train=12, size=(160, 120), batch_size=4, latency_runs=3)
    assert result["train"]["steps"] > 0 and result["train"]["task_seconds"] > 0
    assert result["inference"]["images_per_second"] > 0
    assert result["inference"]["single_image_latency_ms_median"] > 0
    assert result["memory"]["peak_rss_mb"] > 100 and result["memory"]["peak_gpu_mb"] is None
    per_task = result["per_task"]
    assert per_task["parameters"] > 0 and per_task["checkpoint_bytes"] >= per_task["parameter_bytes"]


def test_bench_speed_cli_writes_json(tmp_path):
    out = tmp_path / "speed.json"
    assert main(["bench", "speed", "--preset", "tiny", "--n-train", "10", "--batch-size", "4",
                 "--latency-runs", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["config"]["preset"] == "tiny" and data["command"].startswith("moleflow")
