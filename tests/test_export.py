"""ONNX export: onnxruntime reproduces `MoleFlow.predict` (routed) on a mixed-task batch, metadata, CLI."""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import onnx
import pytest
import torch

from moleflow import Config, MoleFlow, MoleflowError, __version__
from moleflow.cli import export as export_cli
from moleflow.export import (EXPORT_JSON, OUTPUT_NAMES, export_onnx, predict_onnx,
                             read_onnx_metadata)

SHIFTS = (0.0, 2.0, -2.0)  # one per task: different routing features, so the router tells them apart
TOL = 1e-4


def images(seed: int, n: int, shift: float) -> torch.Tensor:
    return torch.randn(n, 3, 112, 112, generator=torch.Generator().manual_seed(seed)) + shift


@pytest.fixture(scope="module")
def model() -> MoleFlow:
    m = MoleFlow(Config.from_preset("tiny"))
    for i, shift in enumerate(SHIFTS):
        m.fit_task(images(i, 16, shift), name=f"product{i}")
    return m


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    # interleaved tasks, a batch size other than the one traced (2)
    parts = [images(100 + i, 2, shift) for i, shift in enumerate(SHIFTS)]
    return torch.stack([p[j] for j in range(2) for p in parts])


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("export"))


def assert_matches(model: MoleFlow, onnx_path, probe: torch.Tensor) -> dict:
    pred = model.predict(probe)
    out = predict_onnx(onnx_path, probe.numpy())
    assert set(out) == set(OUTPUT_NAMES)
    assert out["scores"].shape == (len(probe),) and out["maps"].shape == (len(probe), 112, 112)
    assert out["task_index"].dtype == np.int64
    task_ids = np.array([t.task_id for t in model.tasks])[out["task_index"]]
    np.testing.assert_array_equal(task_ids, pred.task_ids.numpy())
    score_diff = np.abs(out["scores"] - pred.scores.numpy()).max()
    map_diff = np.abs(out["maps"] - pred.maps.numpy()).max()
    assert score_diff < TOL, score_diff
    assert map_diff < TOL, map_diff
    np.testing.assert_allclose(out["router_distance"], pred.router_distance.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out["known"], pred.known.numpy())
    return {"out": out, "pred": pred, "score_diff": score_diff, "map_diff": map_diff}


def test_onnx_reproduces_routed_predict(model, exported, probe):
    result = assert_matches(model, exported, probe)
    pred, out = result["pred"], result["out"]
    assert pred.task_ids.tolist() == [0, 1, 2, 0, 1, 2]  # the probe really mixes the tasks
    thresholds = np.array([t.threshold for t in model.tasks])[out["task_index"]]
    clear = np.abs(out["scores"] - thresholds) > TOL  # decisions away from the threshold must agree
    np.testing.assert_array_equal(out["anomalous"][clear], pred.anomalous.numpy()[clear])
    single = predict_onnx(exported, probe[:1].numpy())  # dynamic batch: one image
    assert abs(single["scores"][0] - out["scores"][0]) < TOL


def test_metadata_in_model_and_export_json(model, exported):
    meta = read_onnx_metadata(exported)
    assert meta["moleflow_version"] == __version__
    assert meta["task_names"] == ["product0", "product1", "product2"]
    assert meta["task_ids"] == [0, 1, 2]
    assert meta["thresholds"] == pytest.approx([t.threshold for t in model.tasks])
    assert meta["image_size"] == 112
    assert meta["mean"] == pytest.approx(list(model.extractor.mean))
    assert meta["std"] == pytest.approx(list(model.extractor.std))
    assert meta["backbone"] == "tf_efficientnet_lite0"
    assert meta["backbone_weights_sha256"] == model.extractor.weights_sha256
    assert meta["score_mode"] == "top_k"
    info = json.loads((exported.parent / EXPORT_JSON).read_text())
    assert info["input_names"] == ["images"] and info["output_names"] == list(OUTPUT_NAMES)
    for key in ("moleflow_version", "task_names", "thresholds", "image_size", "mean", "std", "backbone",
                "backbone_weights_sha256"):
        assert info[key] == meta[key], key
    proto = onnx.load(str(exported))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["images"]  # weights are constants, not inputs
    assert [o.name for o in proto.graph.output] == list(OUTPUT_NAMES)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch


@pytest.mark.parametrize("mode", ["max", "mean"])
def test_other_score_modes_through_onnx(model, probe, mode, tmp_path):
    other = copy.copy(model)  # same weights, another image-score aggregation
    other.config = model.config.with_overrides({"score.mode": mode})
    path = export_onnx(other, tmp_path)
    assert read_onnx_metadata(path)["score_mode"] == mode
    assert_matches(other, path, probe)


def test_unsupported_score_mode_is_a_clear_error(model, tmp_path):
    other = copy.copy(model)
    other.config = Config.from_preset("tiny").with_overrides({"score.mode": "spatial_cluster"})
    with pytest.raises(MoleflowError, match="spatial_cluster"):
        export_onnx(other, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_untrained_model_is_an_error(tmp_path):
    with pytest.raises(MoleflowError, match="no task"):
        export_onnx(MoleFlow(Config.from_preset("tiny")), tmp_path)


def cli_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moleflow")
    export_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser


def test_cli_export_end_to_end(model, probe, tmp_path, capsys):
    run_dir = tmp_path / "run"
    model.save(run_dir)
    args = cli_parser().parse_args(["export", str(run_dir), "--format", "onnx"])
    assert args.run(args) == 0
    assert "wrote" in capsys.readouterr().out
    path = run_dir / "export" / "model.onnx"
    assert path.is_file() and (run_dir / "export" / EXPORT_JSON).is_file()
    assert_matches(model, path, probe)
    out = tmp_path / "elsewhere"
    args = argparse.Namespace(run_dir=run_dir, format="onnx", out=out, opset=17, no_verify=True)
    assert export_cli.run(args) == 0
    assert (out / "model.onnx").is_file()


def test_cli_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_parser().parse_args(["export", "--help"])
    text = capsys.readouterr().out
    assert "example" in text and "--format" in text and "--opset" in text
    with pytest.raises(MoleflowError, match="no moleflow model here"):
        export_cli.run(cli_parser().parse_args(["export", str(tmp_path)]))
