"""The FastAPI app of `moleflow serve`.

    POST /predict[?maps=true]   images (multipart files, or one raw image body) -> one verdict per image
    GET  /tasks                 the learned products: name, threshold and its source, unknown-product limit
    GET  /health                state, served model, last reload, batching and store counters (200 once a model
                                is served; 503, same body, while loading or when no model could be loaded)
    GET  /ready                 200 once a model is loaded, else 503 (for load balancers)
    POST /reload                load RUN's model again (after add-task / remove-task / calibrate)
    GET  /verdicts              the most recent verdicts (newest first), for the review page
    GET  /reviews/queue, POST /reviews, GET /reviews, GET /verdicts/{id}/image, GET /products/{name}/quality,
    GET  /drift, GET /unknowns  the review side, on the verdict store (`review.py`)
    GET  /                      the review page;  GET /docs  the OpenAPI docs

Every error is JSON `{"error": "one line naming the problem"}` with a 4xx (the request) or 5xx (the
service) status; a refused request never stops the service. The app holds all its state (model holder,
batcher, recent verdicts, verdict store) itself: nothing is global, so tests and uvicorn workers each build
their own.

With `settings.store`, every verdict is also recorded in the verdict store (`store.verdicts`) before the
answer is sent, and its row id is returned as `verdict_id`; a store that cannot be written is logged and
counted in /health (`store.errors`), and the verdicts are still answered. With `settings.keep_images` the
uploaded bytes are kept in that folder (named by their SHA-256) and that file is the recorded path; with
`settings.thumbnails` a small overlay PNG of every part the review queue will show (flagged, unknown product,
audit sample) is kept in the store. With `settings.tokens`, every endpoint but /health, /ready and the
review page's own files needs `Authorization: Bearer <token>` (`auth.BearerTokens`). /health reports the
products in drift alert (`drift.py`), checked every `settings.drift_interval` seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import threading
import time
from collections import deque
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import MoleflowError
from .batcher import Batcher, BatcherStopped, QueueFull
from .holder import ModelHolder
from .inference import Item, prepare_item, run_batch
from .review import check_drift, review_routes, thumbnail_png
from .settings import ServeSettings
from .uploads import Upload, UploadError, check_content_type, check_count, decode
from .verdicts import heat_images, verdict

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


# ------------------------------------------------------------------------------------------ schemas (docs)
class Verdict(BaseModel):
    file: str = Field(description="upload file name ('image' for a raw body)")
    product: str = Field(description="the routed product, or 'unknown product'")
    nearest_product: str = Field(description="the product whose prototype is nearest")
    task_id: int
    score: float | None = Field(description="image anomaly score")
    threshold: float | None = Field(description="the product's calibrated decision threshold")
    threshold_source: str = Field(description="how the threshold was set (calibration rule or images)")
    decision: str = Field(description="normal, anomalous or unknown product")
    unknown_product: bool
    router_distance: float | None
    route_margin: float | None = Field(None, description="how much worse the runner-up product fits (patch misfit); "
                                       "null when the prototype router alone decided")
    route_ambiguous: bool = Field(False, description="routing was in doubt: the part was scored under every "
                                  "plausible product and flagged only if flagged under all of them")
    plausible_products: list[str] = Field(default_factory=list, description="the other plausible products")
    width: int
    height: int
    model: str = Field(description="version of the model that scored it (manifest SHA-256, 12 digits)")
    verdict_id: int | None = Field(None, description="the verdict's row in the verdict store (when recording)")
    heatmap_png: str | None = Field(None, description="base64 PNG of the pixel anomaly map (?maps=true)")
    overlay_png: str | None = Field(None, description="base64 PNG of the map over the image (?maps=true)")


class PredictResponse(BaseModel):
    model: str
    engine: str
    elapsed_ms: float
    results: list[Verdict]


class ErrorResponse(BaseModel):
    error: str


IMAGE_BODY = {"schema": {"type": "string", "format": "binary"}}
PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "image/png": IMAGE_BODY, "image/jpeg": IMAGE_BODY, "image/tiff": IMAGE_BODY,
    "application/octet-stream": IMAGE_BODY}}}
ERRORS = {code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 503)}


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split()), **extra}, status_code=status)


# ------------------------------------------------------------------------------------------ body
async def read_uploads(request: Request, settings: ServeSettings) -> list[Upload]:
    """The files of a multipart body, or the one image of a raw body; limits checked (UploadError)."""
    kind = check_content_type(request.headers.get("content-type"))
    limit = settings.max_body_bytes
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise UploadError(413, f"request body of {int(length):,} bytes is larger than the {limit:,} accepted "
                               "(--max-body-mb)")
    if kind == "raw":
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise UploadError(413, f"request body larger than the {limit:,} bytes accepted (--max-body-mb)")
            chunks.append(chunk)
        data = b"".join(chunks)
        if not data:
            raise UploadError(400, "empty request body; send the bytes of an image")
        name = request.headers.get("x-filename") or "image"
        return [Upload(name, data)]
    try:
        form = await request.form(max_files=settings.max_images, max_fields=settings.max_images + 16)
    except HTTPException as exc:
        detail = str(exc.detail)
        if "Too many files" in detail:
            raise UploadError(413, f"more than {settings.max_images} images in one request (--max-images); "
                                   "split the request") from None
        raise UploadError(400, f"cannot read the multipart form ({detail})") from None
    try:
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        check_count(len(files), settings.max_images)
        uploads = []
        for i, f in enumerate(files):
            uploads.append(Upload(f.filename or f"image{i}", await f.read()))
        return uploads
    finally:
        await form.close()


# ------------------------------------------------------------------------------------------ app
def create_app(settings: ServeSettings) -> FastAPI:
    """A new app serving `settings.run`; the model loads in the background once the app starts."""
    holder = ModelHolder(settings)
    batcher: Batcher[Item, Any] = Batcher(partial(run_batch, holder), settings.max_batch, settings.max_wait_ms,
                                          settings.max_queue)
    recent: deque[dict[str, Any]] = deque(maxlen=settings.recent)
    store = None
    if settings.store:
        from ..store.verdicts import VerdictStore

        store = VerdictStore(settings.store)  # created or migrated now: a bad --store stops the start
    recording: dict[str, Any] = {"recorded": 0, "errors": 0, "last_error": None}
    if settings.thumbnails:
        recording["thumbnails"] = 0
    drift_cache: dict[str, Any] = {"checked_at": None, "alert": [], "error": None, "model": None}
    recording_lock = threading.Lock()  # the counters are updated from the threadpool

    async def reload_quietly() -> None:
        try:
            await asyncio.to_thread(holder.reload)
        except MoleflowError:
            pass  # logged and kept in holder.last_error

    async def watch() -> None:
        """Reload when RUN/model/manifest.json changes (add-task, remove-task, calibrate)."""
        while True:
            await asyncio.sleep(settings.watch_interval)
            if holder.current is None and holder.last_attempt is None:
                continue  # the first load is still running
            if await asyncio.to_thread(holder.manifest_changed):
                await reload_quietly()

    async def watch_drift() -> None:
        """Check every product for drift (for /health) every `drift_interval` seconds, once a model is served."""
        while True:
            if holder.current is not None:
                await check_drift(holder, store, drift_cache)
                await asyncio.sleep(settings.drift_interval)
            else:
                await asyncio.sleep(0.5)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        background = [asyncio.create_task(reload_quietly())]
        if settings.watch_interval > 0:
            background.append(asyncio.create_task(watch()))
        if store is not None and settings.drift_interval > 0:
            background.append(asyncio.create_task(watch_drift()))
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await batcher.stop()
            if store is not None:
                store.close()

    app = FastAPI(title="moleflow", version=__version__, lifespan=lifespan,
                  description="Continual industrial anomaly detection (MoLE-Flow): each image is routed to the "
                              "product it shows, scored and decided against that product's calibrated threshold.")
    app.state.settings, app.state.holder, app.state.batcher, app.state.recent = settings, holder, batcher, recent
    app.state.store = store
    if settings.tokens:
        from .auth import BearerTokens

        app.add_middleware(BearerTokens, tokens=settings.tokens)

    # ---------------------------------------------------------------------- errors: one JSON line each
    @app.exception_handler(UploadError)
    async def upload_error(request: Request, exc: UploadError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return _error(422, f"invalid request ({problems})")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}: {exc})")

    def served_or_503():
        served = holder.current
        if served is None:
            why = f"the model could not be loaded: {holder.last_error}" if holder.last_error else \
                "the model is still loading; retry in a few seconds (GET /ready)"
            raise UploadError(503, why)
        return served

    def record(rows: list[dict[str, Any]], results: list[Any], hashes: list[str], latency_ms: float,
               kept: list[str | None]) -> list[int]:
        """Write a request's verdicts to the store in one transaction; their ids ([] if the store failed)."""
        from ..store.verdicts import verdict_record

        records = [verdict_record({**row, "route_margin": result.route_margin,
                                   "route_ambiguous": result.route_ambiguous},
                                  sha256=sha, path=where or row["file"], model_sha256=result.served.manifest_sha256,
                                  engine=settings.engine, latency_ms=latency_ms, source="serve")
                   for row, result, sha, where in zip(rows, results, hashes, kept)]
        try:
            ids = store.add_many(records, return_ids=True)
        except MoleflowError as exc:  # the verdicts are still answered; /health shows the failure
            with recording_lock:
                recording["errors"] += len(records)
                recording["last_error"] = str(exc)
            log.error("%d verdicts not recorded: %s", len(records), exc)
            return []
        with recording_lock:
            recording["recorded"] += len(records)
        return ids

    def keep(uploads: list[Upload], hashes: list[str]) -> list[str | None]:
        """`settings.keep_images`: each upload's bytes in DIR/<sha256[:2]>/<sha256><suffix> (written once)."""
        if not settings.keep_images:
            return [None] * len(uploads)
        paths = []
        for upload, sha in zip(uploads, hashes):
            target = Path(settings.keep_images) / sha[:2] / f"{sha}{_suffix(upload.data, upload.name)}"
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

    def keep_thumbnails(rows: list[dict[str, Any]], results: list[Any], items: list[Item],
                        pictures: list[dict[str, str]] | None) -> None:
        """`settings.thumbnails`: a small overlay of each part the review queue will show, kept in the store."""
        from ..feedback import why_queued

        kept: dict[int, tuple[bytes, int, int]] = {}
        for i, row in enumerate(rows):
            vid = row.get("verdict_id")
            if vid is None or why_queued({"id": vid, "decision": row["decision"]}, settings.audit_rate) is None:
                continue
            overlay = pictures[i]["overlay_png"] if pictures else heat_images(results[i], items[i].decoded.image)[
                "overlay_png"]
            kept[vid] = thumbnail_png(overlay)
        try:
            store.add_thumbnails(kept)
        except MoleflowError as exc:
            log.error("%d thumbnails not kept: %s", len(kept), exc)
            with recording_lock:
                recording["last_error"] = str(exc)
            return
        with recording_lock:
            recording["thumbnails"] += len(kept)

    # ---------------------------------------------------------------------- routes
    @app.post("/predict", response_model=PredictResponse, response_model_exclude_none=True,
              openapi_extra=PREDICT_BODY, responses=ERRORS,
              summary="route, score and decide one or more images")
    async def predict(request: Request, maps: bool = Query(False, description="add heat map and overlay PNGs")
                      ) -> Any:
        start = time.perf_counter()
        served = served_or_503()
        uploads = await read_uploads(request, settings)

        def decode_all() -> tuple[list[Item], list[str]]:
            items = [prepare_item(decode(u, settings.max_pixels), served) for u in uploads]
            return items, [hashlib.sha256(u.data).hexdigest() for u in uploads] if store is not None else []

        items, hashes = await run_in_threadpool(decode_all)
        try:
            results = await batcher.submit(items)
        except QueueFull as exc:
            raise UploadError(503, f"the service is busy ({exc}); retry shortly") from None
        except BatcherStopped as exc:
            raise UploadError(503, str(exc)) from None
        for item, result in zip(items, results):
            if isinstance(result, BaseException):
                message = " ".join(str(result).split()) or type(result).__name__
                return _error(500, f"{item.decoded.name}: inference failed ({type(result).__name__}: {message})")

        rows = [verdict(result, item.decoded.name, item.decoded.width, item.decoded.height)
                for item, result in zip(items, results)]
        if store is not None:
            kept = await run_in_threadpool(keep, uploads, hashes)
            ids = await run_in_threadpool(record, rows, results, hashes, 1000 * (time.perf_counter() - start), kept)
            if ids:
                rows = [{**row, "verdict_id": i} for row, i in zip(rows, ids)]
        now = time.time()
        recent.extendleft({**row, "at": now} for row in rows)  # in the event loop: no lock needed
        pictures = None
        if maps:
            pictures = await run_in_threadpool(
                lambda: [heat_images(result, item.decoded.image) for item, result in zip(items, results)])
        if settings.thumbnails and store is not None:
            await run_in_threadpool(keep_thumbnails, rows, results, items, pictures)
        if pictures:
            rows = [{**row, **picture} for row, picture in zip(rows, pictures)]
        return {"model": results[0].served.version, "engine": settings.engine,
                "elapsed_ms": 1000 * (time.perf_counter() - start), "results": rows}

    @app.get("/tasks", responses=ERRORS, summary="the learned products")
    async def tasks() -> dict[str, Any]:
        served = served_or_503()
        return {"model": served.version, "tasks": served.task_rows()}

    @app.get("/health", responses={503: {"description": "no model served yet (status loading or error); same body"}},
             summary="state: 200 once a model is served, 503 while loading or when no model could be loaded")
    async def health() -> Any:
        served = holder.current
        body = jsonable_encoder({
            "status": "ok" if served is not None else ("error" if holder.last_error else "loading"),
            "version": __version__, "run": settings.run, "engine": settings.engine,
            "model": served.version if served else None,
            "products": [t.name for t in served.model.tasks] if served else [],
            "reloads": holder.reloads, "last_reload": holder.last_attempt, "reload_error": holder.last_error,
            "queued": batcher.queued, "batching": {"max_batch": settings.max_batch,
                                                   "max_wait_ms": settings.max_wait_ms, **batcher.stats.to_dict()},
            "store": {"database": store.dialect, **recording} if store is not None else None,
            "drift": {**drift_cache, "interval": settings.drift_interval} if store is not None else None,
            "access": "token" if settings.tokens else "open"})
        return body if served is not None else JSONResponse(body, status_code=503)

    @app.get("/ready", responses={503: {"model": ErrorResponse}}, summary="200 once a model is loaded")
    async def ready() -> dict[str, Any]:
        served = served_or_503()
        return {"ready": True, "model": served.version}

    @app.post("/reload", responses={500: {"model": ErrorResponse}}, summary="load the run's model again")
    async def reload() -> Any:
        previous = holder.current.version if holder.current else None
        try:
            served = await asyncio.to_thread(holder.reload)
        except MoleflowError as exc:
            return _error(500, str(exc), model=previous)
        return {"reloaded": True, "model": served.version, "previous": previous, "changed": served.version != previous,
                "products": [t.name for t in served.model.tasks], "seconds": served.load_seconds}

    @app.get("/verdicts", summary="the most recent verdicts, newest first")
    async def verdicts(limit: int = Query(50, ge=1, le=1000)) -> dict[str, Any]:
        return {"verdicts": list(recent)[:limit]}

    app.include_router(review_routes(settings, holder, batcher, store, drift_cache, served_or_503))

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _suffix(data: bytes, name: str) -> str:
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


def app_from_env() -> FastAPI:
    """The app factory uvicorn workers call (`moleflow serve --workers N`): settings from the environment."""
    return create_app(ServeSettings.from_env())
