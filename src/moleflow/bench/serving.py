"""Load benchmark of the service (`moleflow bench serve`): a real uvicorn server, a real HTTP client (httpx).

    server = start_server(["runs/real", "--engine", "onnx"], port)   # `moleflow serve` in a child process
    levels = [load_level(url, images, clients, n_requests) for clients in (1, 4, 16)]
    stop_server(server)

Each level runs `n_requests` POST /predict requests (one PNG each, as a camera sends them) from `clients`
concurrent clients after a warm-up, and reports requests/s and the p50 / p99 latency seen by the client,
plus the batch sizes the server formed meanwhile (from GET /health). Only the loopback address is used.
"""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
from PIL import Image

from ..errors import MoleflowError

SERVE_MAIN = "import sys; from moleflow.cli import main; sys.exit(main(sys.argv[1:]))"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def png_bytes(images: list[Image.Image]) -> list[bytes]:
    out = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def start_server(serve_args: list[str], port: int, timeout: float = 300.0) -> subprocess.Popen:
    """`moleflow serve SERVE_ARGS --host 127.0.0.1 --port PORT` in a child process; returns once /ready is 200."""
    import httpx

    cmd = [sys.executable, "-c", SERVE_MAIN, "-q", "serve", *serve_args, "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning"]
    log = tempfile.TemporaryFile(mode="w+")  # the server's messages, shown if it fails to start
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            message = " ".join(log.read().split())[-500:]
            raise MoleflowError(f"the service stopped before it was ready: {message}")
        try:
            if httpx.get(f"{url}/ready", timeout=2.0).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_server(process)
    raise MoleflowError(f"the service was not ready after {timeout:.0f} s")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def _level(url: str, bodies: list[bytes], clients: int, n_requests: int, warmup: int) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120.0) as client:
        async def one(i: int) -> float:
            start = time.perf_counter()
            response = await client.post("/predict", content=bodies[i % len(bodies)],
                                         headers={"content-type": "image/png"})
            if response.status_code != 200:
                raise MoleflowError(f"POST /predict answered {response.status_code}: {response.text[:200]}")
            return time.perf_counter() - start

        await asyncio.gather(*(one(i) for i in range(warmup)))
        before = (await client.get("/health")).json()["batching"]
        latencies: list[float] = []
        counter = iter(range(n_requests))

        async def worker() -> None:
            for i in counter:
                latencies.append(await one(i))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
        after = (await client.get("/health")).json()["batching"]
    batches, items = after["batches"] - before["batches"], after["items"] - before["items"]
    ms = 1000 * np.asarray(latencies)
    return {"clients": clients, "requests": n_requests, "seconds": wall, "requests_per_second": n_requests / wall,
            "latency_ms_p50": float(np.percentile(ms, 50)), "latency_ms_p99": float(np.percentile(ms, 99)),
            "latency_ms_mean": float(ms.mean()), "mean_batch_size": items / batches if batches else 0.0}


def load_level(url: str, bodies: list[bytes], clients: int, n_requests: int, warmup: int = 4) -> dict[str, Any]:
    """One load level: `n_requests` requests from `clients` concurrent clients (after `warmup` requests)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one log line per request
    return asyncio.run(_level(url, bodies, clients, n_requests, warmup))
