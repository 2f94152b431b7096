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


def test_centred_maps_through_onnx(tmp_path):
    """`score.map_centre=median`: the exported graph makes the same centred maps as `predict` (image scores and
    decisions are those of the patch scores as they are)."""
    centred = MoleFlow(Config.from_preset("tiny").with_overrides({"score.map_centre": "median"}))
    for i, shift in enumerate(SHIFTS[:2]):
        centred.fit_task(images(i, 16, shift), name=f"product{i}")
    probe = torch.cat([images(200, 2, SHIFTS[0]), images(201, 2, SHIFTS[1])])
    path = export_onnx(centred, tmp_path)
    assert read_onnx_metadata(path)["map_centre"] == "median"
    result = assert_matches(centred, path, probe)
    maps = result["pred"].maps.flatten(1)
    assert (maps.min(1).values < 0).all() and (maps.max(1).values > 0).all()  # each map around its own median


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


# ------------------------------------------------------------------------------------------ the onnx engine
def pictures(seed: int, n: int, width: int, height: int, mean: float) -> list:
    """n random RGB PIL images of width x height around grey level `mean`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(np.clip(rng.normal(mean, 40, (height, width, 3)), 0, 255).astype(np.uint8))
            for _ in range(n)]


@pytest.fixture(scope="module")
def tiled_model() -> MoleFlow:
    """The default cpu preset's tiling and patch memory on the tiny preset; product b has long parts."""
    m = MoleFlow(Config.from_preset("tiny").with_overrides({"data.tiling": "aspect", "score.source": "flow+memory",
                                                            "train.epochs": 1}))
    m.fit_task(pictures(0, 12, 120, 120, 100), name="a")
    m.fit_task(pictures(1, 12, 300, 100, 170), name="b")  # 3 : 1, cut into 3 tiles
    return m


@pytest.fixture(scope="module")
def mixed_parts() -> list:
    return (pictures(10, 2, 120, 120, 100) + pictures(11, 2, 300, 100, 170) + pictures(12, 1, 100, 260, 170)
            + pictures(13, 1, 90, 90, 0))  # square a, long b (both orientations), something else


def assert_same_inspection(a, b, tol: float = TOL) -> None:
    assert torch.equal(a.task_ids, b.task_ids) and torch.equal(a.known, b.known)
    scale = max(1.0, float(a.scores.abs().max()))
    assert float((a.scores - b.scores).abs().max()) < tol * scale
    assert float((a.maps - b.maps).abs().max()) < tol * scale
    np.testing.assert_allclose(a.router_distance.numpy(), b.router_distance.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(a.thresholds.numpy(), b.thresholds.numpy())
    clear = (a.scores.double() - a.thresholds).abs() > tol * scale
    assert torch.equal(a.anomalous[clear], b.anomalous[clear])


def test_onnx_engine_matches_torch_with_tiles_and_patch_memory(tiled_model, mixed_parts, tmp_path):
    from moleflow.engine import make_engine

    prep = tiled_model.prepare(mixed_parts)
    assert len(prep.pixels) == 2 + 2 * 3 + 3 + 1  # tiles really cut
    reference = make_engine(tiled_model, "torch").inspect(prep)
    assert reference.task_ids.tolist()[:5] == [0, 0, 1, 1, 1] and not bool(reference.known[5])
    assert torch.equal(reference.scores, tiled_model.predict(mixed_parts).scores)  # torch engine = predict
    engine = make_engine(tiled_model, "onnx", cache_dir=tmp_path)
    assert_same_inspection(reference, engine.inspect(prep))
    oracle = [1, 0, 0, 1, 1, 0]  # oracle ids take the same path in both engines
    assert_same_inspection(make_engine(tiled_model, "torch").inspect(prep, oracle), engine.inspect(prep, oracle))
    alone = torch.cat([engine.inspect(tiled_model.prepare([p])).scores for p in mixed_parts])
    assert torch.equal(alone, engine.inspect(prep).scores)  # batching does not change a score


def test_the_two_backends_of_the_pipeline_differ_only_in_rounding(tiled_model, mixed_parts, tmp_path):
    """The neural calls are all that the torch and onnxruntime backends of the one pipeline do differently."""
    from moleflow.engine import make_engine
    from moleflow.pipeline import TorchBackend

    prep = tiled_model.prepare(mixed_parts)
    torch_backend, onnx_backend = TorchBackend(tiled_model.inspector), make_engine(tiled_model, "onnx",
                                                                                   cache_dir=tmp_path)
    (tokens, routing), (onnx_tokens, onnx_routing) = torch_backend.features(prep.pixels), onnx_backend.features(
        prep.pixels)
    assert tokens.dtype == onnx_tokens.dtype == torch.float32 and tokens.shape == onnx_tokens.shape
    np.testing.assert_allclose(onnx_tokens.numpy(), tokens.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(onnx_routing.numpy(), routing.numpy(), rtol=1e-4, atol=1e-4)
    tasks = tiled_model.inspector.task_ids
    index = torch.arange(len(tokens)) % len(tasks)  # every tile under one expert, both experts used
    scores = torch_backend.expert_scores(tokens, index, tasks)
    onnx_scores = onnx_backend.expert_scores(tokens, index, tasks)
    assert scores.shape == onnx_scores.shape == tokens.shape[:3]
    scale = max(1.0, float(scores.abs().max()))
    assert float((scores - onnx_scores).abs().max()) < TOL * scale


def test_predict_and_every_engine_refuse_the_same_requests(tiled_model, tmp_path):
    """The request preconditions are one function: predict and both engines refuse alike, before any work."""
    from moleflow.engine import make_engine

    parts = pictures(3, 2, 50, 50, 9)
    prep = tiled_model.prepare(parts)
    runners = [lambda ids: tiled_model.predict(parts, ids)] + [
        lambda ids, e=engine: e.inspect(prep, ids)
        for engine in (make_engine(tiled_model, "torch"), make_engine(tiled_model, "onnx", cache_dir=tmp_path))]
    for run in runners:
        with pytest.raises(MoleflowError, match=r"unknown task ids \[7\]"):
            run([7, 0])
        with pytest.raises(MoleflowError, match="1 task ids for 2 images"):
            run([0])
    tiled_model.config.router.enabled = False  # oracle mode: routing among several products is refused
    try:
        for run in runners:
            with pytest.raises(MoleflowError, match="oracle mode"):
                run(None)
            assert run([0, 1]).task_ids.tolist() == [0, 1]
    finally:
        tiled_model.config.router.enabled = True


def test_onnx_engine_graphs_are_cached_per_expert(tiled_model, mixed_parts, tmp_path):
    from moleflow.engine import export_graphs, make_engine

    paths = export_graphs(tiled_model, tmp_path)
    assert sorted(paths) == ["0", "1", "features"]
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert len(stamps) == 3
    grown = copy.deepcopy(tiled_model)
    grown.fit_task(pictures(2, 12, 110, 110, 30), name="c")
    make_engine(grown, "onnx", cache_dir=tmp_path)
    new = {p for p in tmp_path.iterdir()} - set(stamps)
    assert [p.name.split("-")[0] for p in new] == ["expert2"]  # a new product exports only its expert
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # the others are reused untouched


def test_onnx_engine_int8_backbone_keeps_routing(tiled_model, mixed_parts, tmp_path):
    from moleflow.engine import make_engine

    prep = tiled_model.prepare(mixed_parts)
    exact = make_engine(tiled_model, "onnx", cache_dir=tmp_path).inspect(prep)
    int8 = make_engine(tiled_model, "onnx", cache_dir=tmp_path, quantize="int8")
    features = int8.paths["features"]
    assert features.stat().st_size < 0.5 * make_engine(tiled_model, "onnx", cache_dir=tmp_path).paths[
        "features"].stat().st_size
    out = int8.inspect(prep)
    assert torch.equal(out.task_ids[:5], exact.task_ids[:5]) and bool(torch.isfinite(out.scores).all())


def test_engine_errors_are_clear(tiled_model, tmp_path):
    from moleflow.engine import make_engine

    with pytest.raises(MoleflowError, match="engine 'tensorrt'"):
        make_engine(tiled_model, "tensorrt")
    with pytest.raises(MoleflowError, match="quantize 'int4'"):
        make_engine(tiled_model, "onnx", cache_dir=tmp_path, quantize="int4")
    with pytest.raises(MoleflowError, match="onnx engine"):  # the single graph cannot tile: says what can
        export_onnx(tiled_model, tmp_path / "single")
    with pytest.raises(MoleflowError, match="unknown task ids"):
        make_engine(tiled_model, "onnx", cache_dir=tmp_path).inspect(tiled_model.prepare(pictures(3, 1, 50, 50, 9)),
                                                                   [7])


def test_a_large_model_keeps_its_tensors_in_external_data(model, probe, tmp_path):
    import json

    path = export_onnx(model, tmp_path, external_data_above=0)  # as a model over the 2 GB limit is written
    data = tmp_path / "model.onnx.data"
    assert data.is_file() and data.stat().st_size > path.stat().st_size
    info = json.loads((tmp_path / EXPORT_JSON).read_text())
    assert info["onnx_data_file"] == "model.onnx.data" and len(info["onnx_data_sha256"]) == 64
    assert_matches(model, path, probe)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    export_onnx(model, tmp_path)  # small again: one self-contained file, the data file removed
    assert not data.exists()
    assert_matches(model, path, probe)
