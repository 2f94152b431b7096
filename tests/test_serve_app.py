"""The HTTP service: every endpoint, bad input, hot reload (FastAPI's TestClient; the app's own lifespan)."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from moleflow.calibration import threshold_source
from moleflow import MoleFlow
from moleflow.cli import main
from moleflow.serve.app import create_app
from moleflow.serve.settings import ServeSettings
from serve_support import copy_run, elongated, png, shared_run, sample_image, wait_ready

UNKNOWN = "unknown product"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_run(tmp_path_factory)


@pytest.fixture(scope="module")
def client(run):
    _, run_dir = run
    app = create_app(ServeSettings(run=str(run_dir), max_images=4, watch_interval=0))
    with TestClient(app) as c:
        wait_ready(c)
        yield c


def files(*items: tuple[str, bytes]) -> list:
    return [("files", (name, data, "image/png")) for name, data in items]


def assert_one_line_error(response, status: int, *words: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) <= {"error", "model"} and "\n" not in body["error"], body  # model: a failed reload's
    for word in words:
        assert word in body["error"], body
    return body["error"]


def test_predict_routes_scores_and_decides_like_the_model(run, client):
    data, run_dir = run
    brick, grass = sample_image(data, "brick", "scratch"), sample_image(data, "grass")
    long_part = elongated(sample_image(data, "brick"))  # cut into 3 tiles by the run's data.tiling=aspect
    response = client.post("/predict", files=files(("brick.png", brick.read_bytes()), ("grass.png", grass.read_bytes()),
                                                   ("long.png", png(long_part))))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["engine"] == "onnx" and len(body["model"]) == 12
    rows = body["results"]
    assert [r["file"] for r in rows] == ["brick.png", "grass.png", "long.png"]
    assert [r["nearest_product"] for r in rows] == ["brick", "grass", "brick"]
    assert (rows[2]["width"], rows[2]["height"]) == (280, 112)
    model = MoleFlow.load(run_dir)  # the torch reference on the same images
    pred = model.predict([Image.open(brick), Image.open(grass), long_part])
    np.testing.assert_allclose([r["score"] for r in rows], pred.scores.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose([r["router_distance"] for r in rows], pred.router_distance.numpy(), rtol=1e-4)
    thresholds = {t.name: t for t in model.tasks}
    for row, known, anomalous in zip(rows, pred.known.tolist(), pred.anomalous.tolist()):
        info = thresholds[row["nearest_product"]]
        assert row["threshold"] == pytest.approx(info.threshold)
        assert row["threshold_source"] == threshold_source(info.calibration)
        assert row["unknown_product"] is (not known)
        assert row["decision"] == (UNKNOWN if not known else "anomalous" if anomalous else "normal")
        assert row["product"] == (UNKNOWN if not known else row["nearest_product"])
        assert "heatmap_png" not in row and "overlay_png" not in row
    raw = client.post("/predict", content=grass.read_bytes(), headers={"content-type": "image/png",
                                                                       "x-filename": "cam3.png"})
    assert raw.status_code == 200 and raw.json()["results"][0]["file"] == "cam3.png"
    assert raw.json()["results"][0]["score"] == pytest.approx(rows[1]["score"], rel=1e-6)


def test_maps_are_base64_pngs_when_asked(run, client):
    data, _ = run
    response = client.post("/predict?maps=true", content=sample_image(data, "brick", "spot").read_bytes(),
                           headers={"content-type": "image/png"})
    assert response.status_code == 200
    row = response.json()["results"][0]
    for key in ("heatmap_png", "overlay_png"):
        picture = Image.open(io.BytesIO(base64.b64decode(row[key])))
        assert picture.format == "PNG" and picture.size == (112, 112) and picture.mode == "RGB"


def test_an_image_of_no_learned_product_is_unknown(client):
    noise = np.random.default_rng(0).integers(0, 255, (90, 90, 3), dtype=np.uint8)
    row = client.post("/predict", files=files(("noise.png", png(noise)))).json()["results"][0]
    assert row["decision"] == UNKNOWN and row["unknown_product"] is True and row["product"] == UNKNOWN
    assert row["nearest_product"] in ("brick", "grass")


def test_tasks_health_ready_verdicts_docs_and_page(client):
    tasks = client.get("/tasks").json()
    assert [t["name"] for t in tasks["tasks"]] == ["brick", "grass"]
    assert all(t["threshold"] is not None and t["threshold_source"] and t["unknown_distance"] for t in tasks["tasks"])
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["products"] == ["brick", "grass"] and health["engine"] == "onnx"
    assert health["model"] == tasks["model"] and health["batching"]["max_batch"] == 16
    assert client.get("/ready").json() == {"ready": True, "model": tasks["model"]}
    recent = client.get("/verdicts?limit=2").json()["verdicts"]
    assert len(recent) == 2 and recent[0]["at"] >= recent[1]["at"]  # newest first, no images kept
    assert all("overlay_png" not in v for v in recent)
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/tasks", "/health", "/ready", "/reload", "/verdicts"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert "swagger" in client.get("/docs").text.lower()
    page = client.get("/")
    assert page.status_code == 200 and 'id="drop"' in page.text and "/static/app.js" in page.text
    assert "api(\"/predict?maps=true\"" in client.get("/static/app.js").text
    assert_one_line_error(client.get("/nowhere"), 404)


def test_bad_input_gets_a_one_line_4xx_and_the_service_keeps_serving(run, client):
    data, _ = run
    good = sample_image(data, "brick").read_bytes()
    huge = io.BytesIO()
    Image.new("L", (6000, 6000)).save(huge, format="PNG")  # 36 MP, a few kB compressed
    cases = [
        (dict(files=[("files", ("notes.txt", b"not an image at all", "text/plain"))]), 422, "notes.txt",
         "not an image"),
        (dict(content=b"", headers={"content-type": "image/png"}), 400, "empty"),
        (dict(files=files(("empty.png", b""))), 400, "empty.png", "empty"),
        (dict(content=good[: len(good) // 2], headers={"content-type": "image/png"}), 422, "truncated"),
        (dict(files=files(("big.png", huge.getvalue()))), 413, "big.png", "6000 x 6000", "--max-pixels"),
        (dict(content=b'{"image": 1}', headers={"content-type": "application/json"}), 415, "application/json"),
        (dict(files=files(*[(f"{i}.png", good) for i in range(5)])), 413, "--max-images"),
        (dict(files=[("note", (None, b"no file here"))]), 400, "no image"),
        (dict(content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"}), 400, ""),
    ]
    for kwargs, status, *words in cases:
        assert_one_line_error(client.post("/predict", **kwargs), status, *words)
        assert client.post("/predict", content=good, headers={"content-type": "image/png"}).status_code == 200
    assert_one_line_error(client.post("/predict?maps=perhaps", content=good, headers={"content-type": "image/png"}),
                          422, "maps")
    assert client.get("/health").json()["status"] == "ok"


def test_reload_serves_a_product_added_by_add_task(run, tmp_path):
    data, run_dir = run
    work = copy_run(run_dir, tmp_path / "run")
    hubble = sample_image(data, "hubble").read_bytes()
    app = create_app(ServeSettings(run=str(work), watch_interval=0))
    with TestClient(app) as c:
        before = wait_ready(c)["model"]
        assert c.post("/predict", content=hubble, headers={"content-type": "image/png"}).json()["results"][0][
            "product"] != "hubble"
        graphs = set((work / "export" / "engine").iterdir())
        assert main(["add-task", str(work), "--data", str(data), "--classes", "hubble", "--no-progress"]) == 0
        assert c.get("/tasks").json()["model"] == before  # nothing changes until the reload
        reply = c.post("/reload").json()
        assert reply["reloaded"] and reply["changed"] and reply["previous"] == before
        assert reply["products"] == ["brick", "grass", "hubble"]
        row = c.post("/predict", content=hubble, headers={"content-type": "image/png"}).json()["results"][0]
        assert row["product"] == "hubble" and row["model"] == reply["model"]
        new = set((work / "export" / "engine").iterdir()) - graphs
        assert [p.name.split("-")[0] for p in new] == ["expert2"]  # only the new expert was exported
        assert c.get("/health").json()["reloads"] == 1


def test_the_watcher_reloads_after_remove_task(run, tmp_path):
    _, run_dir = run
    work = copy_run(run_dir, tmp_path / "run")
    with TestClient(create_app(ServeSettings(run=str(work), watch_interval=0.1))) as c:
        wait_ready(c)
        assert main(["remove-task", str(work), "grass"]) == 0
        deadline = time.monotonic() + 60
        while [t["name"] for t in c.get("/tasks").json()["tasks"]] != ["brick"]:
            assert time.monotonic() < deadline, c.get("/health").json()
            time.sleep(0.1)
        assert c.get("/health").json()["reload_error"] is None


def test_a_failed_reload_keeps_the_old_model_serving(run, tmp_path):
    data, run_dir = run
    work = copy_run(run_dir, tmp_path / "run")
    good = sample_image(data, "grass").read_bytes()
    with TestClient(create_app(ServeSettings(run=str(work), watch_interval=0.1))) as c:
        version = wait_ready(c)["model"]
        # the calibration file, read whole at load (the expert file of a lazily loaded product is read again when
        # its first part arrives, so damaging that would break the served model for that product too)
        shard = sorted((work / "model").glob("task1-calibration-*.safetensors"))[0]
        original = shard.read_bytes()
        shard.write_bytes(original[:-10] + b"0123456789")  # damaged on disk
        reply = c.post("/reload")
        error = assert_one_line_error(reply, 500, shard.name, "SHA-256", "still serving")
        assert error  # and the service still answers with the old model
        row = c.post("/predict", content=good, headers={"content-type": "image/png"}).json()["results"][0]
        assert row["model"] == version and row["nearest_product"] == "grass"
        health = c.get("/health").json()
        assert health["status"] == "ok" and shard.name in health["reload_error"]
        assert health["last_reload"]["ok"] is False
        manifest = work / "model" / "manifest.json"  # a broken manifest seen by the watcher: same story
        text = manifest.read_text()
        manifest.write_text(text.replace('"format"', '"formatx"', 1))
        time.sleep(0.5)
        assert c.get("/ready").status_code == 200 and c.get("/tasks").json()["model"] == version
        shard.write_bytes(original)
        manifest.write_text(text)
        reply = c.post("/reload").json()
        assert reply["reloaded"] and reply["model"] == version
        assert c.get("/health").json()["reload_error"] is None


def test_not_ready_while_no_model_can_be_loaded(run, tmp_path):
    data, run_dir = run
    work = copy_run(run_dir, tmp_path / "run")
    manifest = work / "model" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format": "something else"}))
    with TestClient(create_app(ServeSettings(run=str(work), watch_interval=0))) as c:
        deadline = time.monotonic() + 60
        while c.get("/health").json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.get("/health").json()["status"] == "error"
        assert_one_line_error(c.get("/ready"), 503, "not a moleflow model manifest")
        assert_one_line_error(c.post("/predict", content=sample_image(data, "brick").read_bytes(),
                                     headers={"content-type": "image/png"}), 503, "could not be loaded")


def test_the_torch_engine_gives_the_same_verdicts(run, client):
    data, run_dir = run
    body = sample_image(data, "brick", "spot").read_bytes()
    onnx_row = client.post("/predict", content=body, headers={"content-type": "image/png"}).json()["results"][0]
    with TestClient(create_app(ServeSettings(run=str(run_dir), engine="torch", watch_interval=0))) as c:
        wait_ready(c)
        reply = c.post("/predict", content=body, headers={"content-type": "image/png"}).json()
    assert reply["engine"] == "torch"
    row = reply["results"][0]
    assert row["score"] == pytest.approx(onnx_row["score"], rel=1e-4, abs=1e-4)
    assert {k: v for k, v in row.items() if k not in ("score", "router_distance")} == \
        {k: v for k, v in onnx_row.items() if k not in ("score", "router_distance")}


def test_settings_are_checked():
    from moleflow import MoleflowError

    with pytest.raises(MoleflowError, match="--max-batch"):
        ServeSettings(run="x", max_batch=0)
    with pytest.raises(MoleflowError, match="--optimization 'max'"):
        ServeSettings(run="x", optimization="max")
    settings = ServeSettings(run="x", max_wait_ms=2.5)
    assert ServeSettings.from_json(settings.to_json()) == settings


# ------------------------------------------------------------------------------------------ on the line
def test_health_is_503_until_the_model_is_loaded(run, monkeypatch):
    """A client that waits for /health and then posts must not be told "the model is still loading"."""
    import threading

    from moleflow.serve.holder import ModelHolder

    _, run_dir = run
    release, original = threading.Event(), ModelHolder._load

    def slow_load(self):
        assert release.wait(60)
        return original(self)

    monkeypatch.setattr(ModelHolder, "_load", slow_load)
    with TestClient(create_app(ServeSettings(run=str(run_dir), engine="torch", watch_interval=0))) as c:
        health = c.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading" and health.json()["model"] is None
        assert c.get("/ready").status_code == 503
        release.set()
        deadline = time.monotonic() + 60
        while (health := c.get("/health")).status_code != 200:
            assert health.json()["status"] == "loading" and time.monotonic() < deadline
            time.sleep(0.05)
        assert health.json()["status"] == "ok" and health.json()["products"] == ["brick", "grass"]
        assert c.post("/predict", content=png(np.zeros((64, 64, 3), np.uint8)),
                      headers={"content-type": "image/png"}).status_code == 200


def test_tokens_guard_every_endpoint_but_health_and_every_verdict_is_recorded(run, tmp_path):
    import hashlib

    from moleflow.store.verdicts import VerdictStore, model_sha256, sqlite_url

    data, run_dir = run
    url = sqlite_url(tmp_path / "verdicts.sqlite")
    settings = ServeSettings(run=str(run_dir), watch_interval=0, store=url,
                             tokens={"alice": "alice-secret-1", "plc": "plc-secret-2"})
    brick, grass = sample_image(data, "brick", "scratch").read_bytes(), sample_image(data, "grass").read_bytes()
    alice, plc = {"authorization": "Bearer alice-secret-1"}, {"authorization": "bearer plc-secret-2"}
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        assert c.get("/health").status_code == 200 and c.get("/health").json()["access"] == "token"
        for method, path in (("get", "/tasks"), ("get", "/verdicts"), ("post", "/predict"), ("post", "/reload"),
                             ("get", "/docs"), ("get", "/openapi.json"), ("get", "/nowhere"), ("get", "/reviews/queue"),
                             ("post", "/reviews"), ("get", "/drift"), ("get", "/unknowns"), ("post", "/static/app.js")):
            response = getattr(c, method)(path)
            assert_one_line_error(response, 401, "Authorization: Bearer")
            assert response.headers["www-authenticate"].startswith("Bearer")
        # the review page's own files hold no data: served without a token (the page sends it with its API calls)
        assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200
        assert "Authorization" in c.get("/static/app.js").text
        for header in ({"authorization": "Bearer wrong"}, {"authorization": "alice-secret-1"},
                       {"authorization": "Basic YWxpY2U6eA=="}):
            assert_one_line_error(c.get("/tasks", headers=header), 401)
        assert c.get("/tasks", headers=alice).status_code == 200 and c.get("/", headers=plc).status_code == 200
        assert_one_line_error(c.post("/predict", content=brick, headers={"content-type": "image/png"}), 401)

        first = c.post("/predict", files=files(("brick.png", brick), ("grass.png", grass)), headers=alice)
        second = c.post("/predict", content=grass, headers={"content-type": "image/png", "x-filename": "cam3.png",
                                                            **plc})
        assert first.status_code == second.status_code == 200, (first.text, second.text)
        answered = first.json()["results"] + second.json()["results"]
        recent = c.get("/verdicts", headers=alice).json()["verdicts"]
        assert [v["verdict_id"] for v in recent[:3]] == [answered[2]["verdict_id"], answered[1]["verdict_id"],
                                                          answered[0]["verdict_id"]]
        store_health = c.get("/health").json()["store"]
        assert store_health == {"database": "sqlite", "recorded": 3, "errors": 0, "last_error": None,
                                "transactions": 2, "queued": 0}  # two requests, one after the other
    with VerdictStore(url) as store:
        rows = {r["id"]: r for r in store.verdicts()}
    assert len(rows) == 3
    for verdict, body in zip(answered, (brick, grass, grass)):
        row = rows[verdict["verdict_id"]]
        assert row["path"] == verdict["file"] and row["sha256"] == hashlib.sha256(body).hexdigest()
        assert (row["product"], row["decision"], row["nearest_product"]) == \
            (verdict["product"], verdict["decision"], verdict["nearest_product"])
        assert row["score"] == pytest.approx(verdict["score"]) and row["threshold"] == pytest.approx(verdict["threshold"])
        assert row["source"] == "serve" and row["engine"] == "onnx" and row["latency_ms"] > 0
        assert row["model_sha256"] == model_sha256(run_dir) and row["model_sha256"][:12] == verdict["model"]
