"""Recording the service's verdicts in the verdict store, off the request threads.

    recorder = VerdictRecorder(store, settings); recorder.start()
    ids = await recorder.record(rows, results, items, uploads, latency_ms, pictures)   # verdict ids, in order
    recorder.counters()                                                              # for /health
    recorder.close()                                                                 # drains, then stops

One writer thread owns every write. Requests that arrive while it writes wait together and are committed in
one transaction (group commit), so the database sees one commit per burst instead of one per request, and no
request thread waits on the database's write lock. A request still gets its verdicts' ids (`verdict_id`)
before it is answered. What is only for the review page (kept image files, thumbnails of the parts the review
queue shows) is done by the writer after the ids are handed back, off every request's path.

A store that cannot be written is logged and counted (`errors`, `last_error`); the request is answered
without ids. Nothing is global: each app builds its own recorder.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import MoleflowError
from .settings import ServeSettings
from .uploads import Upload

log = logging.getLogger(__name__)
MAX_GROUP = 512  # verdicts committed in one transaction at most


@dataclass
class _Job:
    """One request's verdicts, waiting for the writer."""

    rows: list[dict[str, Any]]
    results: list[Any]  # verdicts.ImageResult per row
    images: list[Any]  # the decoded PIL image per row (thumbnails)
    uploads: list[Upload]
    latency_ms: float
    pictures: list[dict[str, str]] | None  # the request's heat images when it asked for maps
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future


class VerdictRecorder:
    """The writer thread of one app's verdict store; see the module docstring."""

    def __init__(self, store: Any, settings: ServeSettings) -> None:
        self.store, self.settings = store, settings
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # counters: written by the writer, read by /health
        self._counts: dict[str, Any] = {"recorded": 0, "errors": 0, "last_error": None, "transactions": 0}
        if settings.thumbnails:
            self._counts["thumbnails"] = 0

    # ------------------------------------------------------------------ the request side
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="verdict-writer", daemon=True)
            self._thread.start()

    async def record(self, rows: list[dict[str, Any]], results: list[Any], images: list[Any],
                     uploads: list[Upload], latency_ms: float, pictures: list[dict[str, str]] | None = None
                     ) -> list[int]:
        """Queue one request's verdicts; their store ids once committed ([] when the store failed)."""
        loop = asyncio.get_running_loop()
        job = _Job(rows, results, images, uploads, latency_ms, pictures, loop, loop.create_future())
        self._jobs.put(job)
        return await job.done

    def counters(self) -> dict[str, Any]:
        with self._lock:
            return {**self._counts, "queued": self._jobs.qsize()}

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    # ------------------------------------------------------------------ the writer thread
    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            group, rows, stop = [job], len(job.rows), False
            while rows < MAX_GROUP:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                group.append(nxt)
                rows += len(nxt.rows)
            try:
                self._write(group)
            except Exception as exc:  # noqa: BLE001 - the writer must outlive any one group: requests wait on it
                log.exception("recording %d verdicts failed", rows)
                self._count(errors=rows, last_error=f"{type(exc).__name__}: {exc}")
                for waiting in group:  # answered without ids, as when the store cannot be written
                    waiting.loop.call_soon_threadsafe(_resolve, waiting.done, [])
            if stop:
                return

    def _write(self, group: list[_Job]) -> None:
        """Commit a group's verdicts in one transaction, hand each request its ids, then keep its review pictures."""
        hashes = [[_sha256(u) for u in job.uploads] for job in group]
        kept = [self._keep_images(job, sha) for job, sha in zip(group, hashes)]
        records = [r for job, sha, paths in zip(group, hashes, kept) for r in self._records(job, sha, paths)]
        try:
            ids = self.store.add_many(records, return_ids=True)
        except MoleflowError as exc:  # the verdicts are still answered; /health shows the failure
            self._count(errors=len(records), last_error=str(exc))
            log.error("%d verdicts not recorded: %s", len(records), exc)
            ids = []
        else:
            self._count(recorded=len(records), transactions=1)
        start = 0
        for job in group:
            own = ids[start:start + len(job.rows)]
            start += len(job.rows)
            job.loop.call_soon_threadsafe(_resolve, job.done, own)
        if self.settings.thumbnails and ids:
            try:
                self._keep_thumbnails(group, ids)
            except Exception as exc:  # noqa: BLE001 - the verdicts are recorded; only their pictures are missing
                log.exception("thumbnails of %d verdicts not kept", len(ids))
                self._count(last_error=f"thumbnails: {type(exc).__name__}: {exc}")

    def _records(self, job: _Job, hashes: list[str], paths: list[str | None]) -> list[dict[str, Any]]:
        from ..store.verdicts import verdict_record

        return [verdict_record({**row, "route_margin": result.route_margin, "route_ambiguous": result.route_ambiguous},
                               sha256=sha, path=where or row["file"],
                               model_sha256=result.served.manifest_sha256, engine=self.settings.engine,
                               latency_ms=job.latency_ms, source="serve")
                for row, result, sha, where in zip(job.rows, job.results, hashes, paths)]

    def _keep_images(self, job: _Job, hashes: list[str]) -> list[str | None]:
        """`settings.keep_images`: each upload's bytes in DIR/<sha256[:2]>/<sha256><suffix> (written once)."""
        if not self.settings.keep_images:
            return [None] * len(job.uploads)
        paths = []
        for upload, sha in zip(job.uploads, hashes):
            target = Path(self.settings.keep_images) / sha[:2] / f"{sha}{image_suffix(upload.data, upload.name)}"
            try:
                if not target.is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    tmp = target.with_name(f".{target.name}.{threading.get_ident()}.tmp")
                    tmp.write_bytes(upload.data)
                    tmp.replace(target)
                paths.append(str(target))
            except OSError as exc:
                log.error("%s: cannot keep the image in %s (%s)", upload.name, target.parent, exc.strerror or exc)
                paths.append(None)
        return paths

    def _keep_thumbnails(self, group: list[_Job], ids: Sequence[int]) -> None:
        """`settings.thumbnails`: a small overlay of each part the review queue will show, kept in the store."""
        from ..feedback import why_queued
        from .verdicts import heat_images, thumbnail_png

        kept: dict[int, tuple[bytes, int, int]] = {}
        rows = [(job, i) for job in group for i in range(len(job.rows))]
        for vid, (job, i) in zip(ids, rows):
            if why_queued({"id": vid, "decision": job.rows[i]["decision"]}, self.settings.audit_rate) is None:
                continue
            overlay = (job.pictures[i] if job.pictures else heat_images(job.results[i], job.images[i]))["overlay_png"]
            kept[vid] = thumbnail_png(overlay)
        if not kept:
            return
        try:
            self.store.add_thumbnails(kept)
        except MoleflowError as exc:
            log.error("%d thumbnails not kept: %s", len(kept), exc)
            self._count(last_error=str(exc))
            return
        self._count(thumbnails=len(kept))

    def _count(self, last_error: str | None = None, **added: int) -> None:
        with self._lock:
            for key, n in added.items():
                self._counts[key] += n
            if last_error is not None:
                self._counts["last_error"] = last_error


def _resolve(future: asyncio.Future, ids: list[int]) -> None:
    if not future.done():  # the request may have been cancelled (client gone)
        future.set_result(ids)


def _sha256(upload: Upload) -> str:
    return hashlib.sha256(upload.data).hexdigest()


def image_suffix(data: bytes, name: str) -> str:
    """The file suffix of image bytes (by their content; else the upload name's; else .png)."""
    from PIL import Image

    suffixes = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "BMP": ".bmp"}
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format in suffixes:
                return suffixes[img.format]
    except Exception:  # noqa: BLE001 - decoded already; this only names the file
        pass
    suffix = Path(name).suffix.lower()
    return suffix if suffix in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff") else ".png"
