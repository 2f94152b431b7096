"""The service's verdict writer: requests that wait together are committed together, and a failing write
answers the waiting requests without ids instead of leaving them hanging or stopping the writer."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from moleflow.serve.recorder import VerdictRecorder
from moleflow.serve.uploads import Upload

SETTINGS = SimpleNamespace(engine="torch", keep_images=None, thumbnails=False, audit_rate=0.05)
RESULT = SimpleNamespace(route_margin=None, route_ambiguous=False, served=SimpleNamespace(manifest_sha256="m"))


class FlakyStore:
    """Fails the first write with an unexpected error, then hands out increasing ids."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.next_id = 1

    def add_many(self, records, return_ids=False):
        self.calls.append(len(records))
        if len(self.calls) == 1:
            raise RuntimeError("disk on fire")
        ids = list(range(self.next_id, self.next_id + len(records)))
        self.next_id += len(records)
        return ids


async def _request(recorder: VerdictRecorder, n: int) -> list[int]:
    rows = [{"file": f"{i}.png", "product": "brick", "decision": "normal", "score": 1.0} for i in range(n)]
    return await recorder.record(rows, [RESULT] * n, [None] * n, [Upload(f"{i}.png", b"x%d" % i) for i in range(n)],
                                 1.0)


def test_a_failed_write_answers_without_ids_and_the_writer_goes_on():
    store = FlakyStore()
    recorder = VerdictRecorder(store, SETTINGS)
    recorder.start()

    async def scenario():
        first = await asyncio.wait_for(_request(recorder, 2), 10)
        later = await asyncio.wait_for(asyncio.gather(_request(recorder, 1), _request(recorder, 3)), 10)
        return first, later

    try:
        first, (one, three) = asyncio.run(scenario())
    finally:
        recorder.close()
    assert first == []  # answered, not recorded
    assert len(one) == 1 and len(three) == 3 and sorted(one + three) == [1, 2, 3, 4]  # each its own ids
    counts = recorder.counters()
    assert counts["errors"] == 2 and "disk on fire" in counts["last_error"] and counts["recorded"] == 4
    assert sum(store.calls[1:]) == 4 and counts["transactions"] == len(store.calls) - 1
