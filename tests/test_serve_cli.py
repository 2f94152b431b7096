"""The command line around the service: `serve`, `predict --engine`, `bench speed --engine`, `bench serve`."""

from __future__ import annotations

import csv
import json

import pytest

from moleflow.cli import main
from serve_support import shared_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_run(tmp_path_factory)


def test_serve_help_and_a_missing_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for option in ("--host", "--port", "--workers", "--engine", "--max-batch", "--max-wait-ms", "--max-pixels",
                   "--max-images", "--watch-interval", "--optimization", "/predict"):
        assert option in text, option
    assert main(["serve", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no moleflow model here" in err and "\n" not in err


def test_predict_with_the_onnx_engine_writes_the_torch_rows(run, tmp_path):
    data, run_dir = run
    inputs = [str(data / "brick" / "test"), str(data / "grass" / "test" / "good")]
    rows = {}
    for engine in ("torch", "onnx"):
        out = tmp_path / engine
        assert main(["predict", str(run_dir), *inputs, "--out", str(out), "--engine", engine, "--csv-only",
                     "--no-progress", "--engine-cache", str(tmp_path / "graphs")]) == 0
        rows[engine] = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows["onnx"]) == len(rows["torch"]) == 6
    for a, b in zip(rows["torch"], rows["onnx"]):
        assert (a["file"], a["nearest_product"], a["decision"]) == (b["file"], b["nearest_product"], b["decision"])
        assert float(b["score"]) == pytest.approx(float(a["score"]), rel=1e-4, abs=1e-4)
    assert any(p.name.startswith("features-") for p in (tmp_path / "graphs").iterdir())


def test_bench_speed_with_the_onnx_engine_on_a_saved_run(run, tmp_path):
    _, run_dir = run
    out = tmp_path / "speed.json"
    assert main(["bench", "speed", "--run", str(run_dir), "--engine", "onnx", "--batch-size", "4",
                 "--latency-runs", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    inference = result["inference"]
    assert inference["engine"] == "onnx" and inference["images_per_second"] > 0
    assert inference["single_image_latency_ms_median"] > 0 and inference["export_seconds"] > 0
    assert "train" not in result and result["config"]["tiling"] == "aspect"


def test_bench_serve_measures_a_real_server(run, tmp_path):
    _, run_dir = run
    out = tmp_path / "serve.json"
    assert main(["bench", "serve", str(run_dir), "--clients", "1", "3", "--requests", "6",
                 "--serve-args", "--max-wait-ms 20", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [level["clients"] for level in result["levels"]] == [1, 3]
    for level in result["levels"]:
        assert level["requests"] == 6 and level["requests_per_second"] > 0
        assert 0 < level["latency_ms_p50"] <= level["latency_ms_p99"]
    assert result["levels"][0]["mean_batch_size"] == 1.0
    assert result["serve_args"] == [str(run_dir), "--max-wait-ms", "20"]


def test_serve_store_default_token_and_the_open_network_warning(run, tmp_path, monkeypatch, caplog):
    """`serve` records into RUN/verdicts.sqlite unless --no-store; tokens from --token or MOLEFLOW_TOKEN; a
    warning when it listens beyond 127.0.0.1 without one (uvicorn itself is not started here)."""
    import logging

    import uvicorn

    from moleflow.serve.auth import exposure_warning, parse_tokens
    from serve_support import copy_run

    _, run_dir = run
    work = copy_run(run_dir, tmp_path / "run")
    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append((app.state.settings, kw)))
    monkeypatch.delenv("MOLEFLOW_TOKEN", raising=False)
    caplog.set_level(logging.WARNING)

    assert main(["serve", str(work), "--host", "0.0.0.0", "--engine", "torch"]) == 0
    settings, options = started[-1]
    assert options["host"] == "0.0.0.0" and settings.tokens == {}
    assert settings.store == f"sqlite:///{(work / 'verdicts.sqlite').resolve()}" and (work / "verdicts.sqlite").is_file()
    assert any("WITHOUT A TOKEN" in r.getMessage() for r in caplog.records)

    caplog.clear()
    monkeypatch.setenv("MOLEFLOW_TOKEN", "alice:a-secret,plc:p-secret")
    assert main(["serve", str(work), "--host", "0.0.0.0", "--engine", "torch", "--no-store"]) == 0
    settings, _ = started[-1]
    assert settings.tokens == {"alice": "a-secret", "plc": "p-secret"} and settings.store is None
    assert not any("WITHOUT A TOKEN" in r.getMessage() for r in caplog.records)
    assert main(["serve", str(work), "--engine", "torch", "--token", "only-one", "--no-store"]) == 0
    assert started[-1][0].tokens == {"token": "only-one"}

    assert exposure_warning("127.0.0.1", {}) is None and exposure_warning("localhost", {}) is None
    assert exposure_warning("::1", {}) is None and exposure_warning("10.0.0.5", {}) is not None
    assert exposure_warning("line3.factory", {}) is not None and exposure_warning("0.0.0.0", {"a": "b"}) is None
    for bad in ("alice:", "a:x,a:y", "a:x,b:x"):
        with pytest.raises(Exception, match="--token"):
            parse_tokens(bad)
    assert main(["serve", str(work), "--store", "x.sqlite", "--no-store"]) == 2
    # the review side's options
    assert main(["serve", str(work), "--engine", "torch", "--audit-rate", "0.2", "--thumbnails", "--keep-images",
                 str(tmp_path / "kept"), "--drift-interval", "5", "--min-pile", "4"]) == 0
    settings = started[-1][0]
    assert (settings.audit_rate, settings.thumbnails, settings.drift_interval, settings.min_pile) == (0.2, True, 5.0, 4)
    assert settings.keep_images == str((tmp_path / "kept").resolve()) and (tmp_path / "kept").is_dir()
    assert main(["serve", str(work), "--thumbnails", "--no-store"]) == 2
    assert main(["serve", str(work), "--audit-rate", "1.5"]) == 2
