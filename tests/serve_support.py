"""Shared pieces of the service tests: one tiny run per test session, apps and a real uvicorn server.

The run is the `tiny` preset with the default `cpu` preset's tiling and patch memory (`data.tiling=aspect`,
`score.source=flow+memory`), one training epoch, products brick and grass of `write_mvtec_layout` (hubble is
written too, for adding a product), learned with `MoleFlow.fit_task` and saved with `MoleFlow.save` (what
`moleflow train` does, without its evaluation, to keep the tests short). It is built once per pytest
session under the session's temporary folder and must not be changed by tests: copy it (`copy_run`) first.
"""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from moleflow import Config, MoleFlow
from moleflow.data.synthetic import write_mvtec_layout

OVERRIDES = {"train.epochs": 1, "data.tiling": "aspect", "score.source": "flow+memory"}


def shared_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data root with brick, grass, hubble; run with brick and grass), built once per session."""
    base = tmp_path_factory.getbasetemp() / "serve-shared"
    data, run = base / "data", base / "run"
    if not (base / "done").is_file():
        shutil.rmtree(base, ignore_errors=True)
        write_mvtec_layout(data, ["brick", "grass", "hubble"], n_train=16, n_test_good=2, n_test_defect=2,
                           size=112, seed=0)
        model = MoleFlow(Config.from_preset("tiny").with_overrides(OVERRIDES))
        for name in ("brick", "grass"):  # what `moleflow train` learns, without its evaluation
            model.fit_task(train_images(data, name), name=name, source={"root": str(data), "name": "folder"})
        model.save(run)
        (base / "done").write_text("")
    return data, run


def train_images(data: Path, product: str) -> list[Path]:
    return sorted((data / product / "train" / "good").glob("*.png"))


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of the run's model folder and its cached ONNX graphs, safe to change."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(run / "model", dest / "model")
    if (run / "export").is_dir():
        shutil.copytree(run / "export", dest / "export")
    return dest


def png(image: Image.Image | np.ndarray) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sample_image(data: Path, product: str, kind: str = "good", index: int = 0) -> Path:
    return sorted((data / product / "test" / kind).glob("*.png"))[index]


def elongated(path: Path) -> Image.Image:
    """The image stretched to 2.5 : 1, so that `data.tiling=aspect` cuts it into 3 tiles."""
    image = Image.open(path).convert("RGB")
    return image.resize((280, 112))


def wait_ready(client, timeout: float = 120.0) -> dict:
    """Poll GET /ready until 200 (the model loads in the background); return its JSON."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get("/ready")
        if response.status_code == 200:
            return response.json()
        time.sleep(0.1)
    raise AssertionError(f"not ready after {timeout} s: {client.get('/health').json()}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(app) -> Iterator[str]:
    """A real uvicorn server for `app` on a free loopback port, in a thread; yields its base URL."""
    import httpx
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError("the server did not become ready")
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
