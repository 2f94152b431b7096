"""Dynamic batching: images of concurrent requests are gathered into batches for one model thread.

    batcher = Batcher(process, max_batch=16, max_wait_ms=5)     # process(items) -> one result per item
    await batcher.start()
    results = await batcher.submit([item, item])                # a request's items; exceptions in place
    await batcher.stop()

One asyncio task collects: it waits for a first item, then takes whatever else is queued, and waits up to
`max_wait_ms` for more until `max_batch` items are gathered; the batch then runs in the one model thread
(the event loop keeps accepting requests meanwhile, so under load the next batch is full at once). If a
batch raises, its items are run one by one, so one bad item fails only its own request. A full queue
(`max_queue` items) refuses new work at once (`QueueFull`) instead of letting latency grow without bound.
`stop` drains: what was accepted is answered, what comes later is refused (`BatcherStopped`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class QueueFull(Exception):
    """More items are waiting than the batcher accepts."""


class BatcherStopped(Exception):
    """The batcher is not running (the service is starting or shutting down)."""


_STOP = object()  # put on the queue by `stop`: the collector runs what it has gathered, then returns


@dataclass
class BatchStats:
    """Counters of the batches run so far (for /health and the benchmarks)."""

    batches: int = 0
    items: int = 0
    largest: int = 0
    failed_batches: int = 0
    model_seconds: float = 0.0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> how many batches had it

    def to_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "items": self.items, "largest": self.largest,
                "mean_size": self.items / self.batches if self.batches else 0.0,
                "failed_batches": self.failed_batches, "model_seconds": self.model_seconds,
                "sizes": {str(k): v for k, v in sorted(self.sizes.items())}}


class Batcher(Generic[Item, Result]):
    """Runs `process(items) -> results` (same length and order) on batches of submitted items in one thread."""

    def __init__(self, process: Callable[[list[Item]], list[Result]], max_batch: int = 16,
                 max_wait_ms: float = 5.0, max_queue: int = 256) -> None:
        self.process, self.max_batch, self.max_wait = process, max_batch, max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._stopping

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        self._stopping = False
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moleflow-model")
        self._task = asyncio.create_task(self._collect(), name="moleflow-batcher")

    async def stop(self) -> None:
        """Stop accepting items; everything accepted before is still run (the queue is drained in order),
        then the model thread ends. `submit` raises `BatcherStopped` from now on."""
        if self._task is None or self._queue is None:
            return
        self._stopping = True
        self._queue.put_nowait(_STOP)
        await self._task
        while not self._queue.empty():
            entry = self._queue.get_nowait()
            if entry is not _STOP and not entry[1].done():
                entry[1].set_exception(BatcherStopped("the service is shutting down"))
        if self._executor is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
        self._task = None

    async def submit(self, items: list[Item]) -> list[Result | BaseException]:
        """Queue `items` (one request's) and wait for their results; a failed item's result is its exception."""
        if not self.running or self._queue is None:
            raise BatcherStopped("the model is not running")
        if self._queue.qsize() + len(items) > self.max_queue:
            raise QueueFull(f"{self._queue.qsize()} images are already waiting (--max-queue {self.max_queue})")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        for item, future in zip(items, futures):
            self._queue.put_nowait((item, future))
        return list(await asyncio.gather(*futures, return_exceptions=True))

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._queue is not None
        stop = False
        while not stop:
            first = await self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    entry = self._queue.get_nowait()
                else:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        entry = await asyncio.wait_for(self._queue.get(), left)
                    except asyncio.TimeoutError:
                        break
                if entry is _STOP:
                    stop = True
                    break
                batch.append(entry)
            live = [(item, future) for item, future in batch if not future.done()]  # a caller may have gone
            if not live:
                continue
            results = await loop.run_in_executor(self._executor, self._run, [item for item, _ in live])
            for (_, future), result in zip(live, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _run(self, items: list[Item]) -> list[Result | BaseException]:
        """In the model thread: the whole batch, or on failure each item alone."""
        start = time.perf_counter()
        try:
            results = list(self.process(items))
            if len(results) != len(items):
                raise RuntimeError(f"the model returned {len(results)} results for {len(items)} items")
        except Exception as exc:  # noqa: BLE001 - isolate the item at fault
            log.warning("a batch of %d failed (%s: %s); running its items one by one", len(items),
                        type(exc).__name__, exc)
            self.stats.failed_batches += 1
            results = [self._one(item) for item in items]
        self.stats.batches += 1
        self.stats.items += len(items)
        self.stats.largest = max(self.stats.largest, len(items))
        self.stats.sizes[len(items)] = self.stats.sizes.get(len(items), 0) + 1
        self.stats.model_seconds += time.perf_counter() - start
        return results

    def _one(self, item: Item) -> Result | BaseException:
        try:
            (result,) = self.process([item])
            return result
        except Exception as exc:  # noqa: BLE001 - becomes this item's error
            return exc
