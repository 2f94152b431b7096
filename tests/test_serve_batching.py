"""Dynamic batching: the batcher alone, then a real uvicorn server under concurrent httpx clients."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from moleflow.serve.app import create_app
from moleflow.serve.batcher import Batcher, BatcherStopped, QueueFull
from moleflow.serve.settings import ServeSettings
from serve_support import copy_run, running_server, sample_image, shared_run


def run_async(coro):
    return asyncio.run(coro)


def test_concurrent_items_are_gathered_into_batches_of_at_most_max_batch():
    seen: list[list[int]] = []

    def process(items: list[int]) -> list[int]:
        seen.append(list(items))
        time.sleep(0.02)  # the model is busy: more requests queue up meanwhile
        return [10 * i for i in items]

    async def scenario():
        batcher = Batcher(process, max_batch=4, max_wait_ms=50)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit([i]) for i in range(10)))
        many = await batcher.submit([20, 21, 22])  # one request with several images
        await batcher.stop()
        return results, many, batcher.stats

    results, many, stats = run_async(scenario())
    assert [r[0] for r in results] == [10 * i for i in range(10)]  # each caller gets its own result
    assert many == [200, 210, 220]
    assert max(len(b) for b in seen) == 4 and sum(len(b) for b in seen) == 13
    assert len(seen) <= 5  # 13 items in batches of up to 4, not 11 calls
    assert stats.items == 13 and stats.largest == 4


def test_one_bad_item_fails_only_its_own_request():
    def process(items: list[str]) -> list[str]:
        if "bad" in items:
            raise ValueError("cannot score 'bad'")
        return [s.upper() for s in items]

    async def scenario():
        batcher = Batcher(process, max_batch=8, max_wait_ms=30)
        await batcher.start()
        results = await asyncio.gather(batcher.submit(["a"]), batcher.submit(["bad"]), batcher.submit(["c"]))
        await batcher.stop()
        return results, batcher.stats

    (a, bad, c), stats = run_async(scenario())
    assert a == ["A"] and c == ["C"]
    assert isinstance(bad[0], ValueError) and "bad" in str(bad[0])
    assert stats.failed_batches == 1


def test_a_full_queue_refuses_at_once_and_stop_drains_what_was_accepted():
    gate = threading.Event()

    def process(items: list[int]) -> list[int]:
        gate.wait(5)
        return items

    async def scenario():
        batcher = Batcher(process, max_batch=1, max_wait_ms=0, max_queue=2)
        await batcher.start()
        first = asyncio.create_task(batcher.submit([1]))  # taken by the model thread, which waits at the gate
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(batcher.submit([2, 3]))  # fills the queue
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await batcher.submit([4])
        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0.05)
        gate.set()
        await stopping
        with pytest.raises(BatcherStopped):
            await batcher.submit([5])
        return await first, await waiting

    first, waiting = run_async(scenario())
    assert first == [1] and waiting == [2, 3]  # accepted before the stop: answered


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return shared_run(tmp_path_factory)


def test_batched_requests_get_the_scores_of_single_requests(run):
    """8 concurrent clients against a real uvicorn server: the requests are scored in shared batches, and
    every score equals that image's score when it is sent alone."""
    data, run_dir = run
    bodies = [sample_image(data, product, kind).read_bytes() for product in ("brick", "grass")
              for kind in ("good", "scratch", "spot")]
    bodies += [sample_image(data, "brick", "good", 1).read_bytes(), sample_image(data, "grass", "good", 1).read_bytes()]
    app = create_app(ServeSettings(run=str(run_dir), max_batch=8, max_wait_ms=300, watch_interval=0))
    with running_server(app) as url:
        single = []
        for body in bodies:  # one at a time: batches of one
            reply = httpx.post(f"{url}/predict", content=body, headers={"content-type": "image/png"}, timeout=60)
            single.append(reply.json()["results"][0])
        assert httpx.get(f"{url}/health").json()["batching"]["largest"] == 1

        async def together():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                replies = await asyncio.gather(*(client.post("/predict", content=b,
                                                             headers={"content-type": "image/png"}) for b in bodies))
                return [r.json()["results"][0] for r in replies]

        batched = asyncio.run(together())
        batching = httpx.get(f"{url}/health").json()["batching"]
    assert batching["largest"] > 1, batching  # really batched
    for alone, shared in zip(single, batched):
        assert shared["score"] == pytest.approx(alone["score"], rel=1e-5, abs=1e-5)
        assert shared["decision"] == alone["decision"] and shared["nearest_product"] == alone["nearest_product"]


def test_requests_during_reloads_are_all_answered(run, tmp_path):
    """Reloads (new model loaded off the request path, then swapped) while clients keep sending: no request
    fails, and each answer names the model version that scored it."""
    data, run_dir = run
    work = copy_run(run_dir, tmp_path / "run")
    body = sample_image(data, "grass").read_bytes()
    app = create_app(ServeSettings(run=str(work), watch_interval=0, max_wait_ms=2))
    with running_server(app) as url:
        version = httpx.get(f"{url}/ready").json()["model"]

        async def load_while_reloading():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                async def sender():
                    codes = []
                    for _ in range(6):
                        r = await client.post("/predict", content=body, headers={"content-type": "image/png"})
                        codes.append((r.status_code, r.json()["results"][0]["model"]))
                    return codes

                reloads = asyncio.gather(*(client.post("/reload") for _ in range(2)))
                answers = await asyncio.gather(*(sender() for _ in range(3)))
                return await reloads, answers

        reloads, answers = asyncio.run(load_while_reloading())
    assert [r.status_code for r in reloads] == [200, 200]
    assert all(code == 200 and model == version for codes in answers for code, model in codes)
