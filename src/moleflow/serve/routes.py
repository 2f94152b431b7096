"""The inspection side of `moleflow serve`: predict, products, health and readiness, reload, recent verdicts.

    POST /predict[?maps=true]   images (multipart files, or one raw image body) -> one verdict per image
    GET  /tasks                 the learned products: name, threshold and its source, unknown-product limit
    GET  /health                state, served model, last reload, batching and store counters (200 once a model
                                is served; 503, same body, while loading or when no model could be loaded)
    GET  /ready                 200 once a model is loaded, else 503 (for load balancers)
    POST /reload                load RUN's model again (after add-task / remove-task / calibrate)
    GET  /verdicts              the most recent verdicts (newest first), for the review page

`install_error_handlers` makes every error one JSON line (`context.error_response`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import MoleflowError
from .batcher import BatcherStopped, QueueFull
from .context import ServeContext, context, error_response
from .inference import Item, prepare_item
from .schemas import ERRORS, PREDICT_BODY, ErrorResponse, PredictResponse
from .uploads import Upload, UploadError, decode, read_uploads
from .verdicts import heat_images, verdict

log = logging.getLogger(__name__)
router = APIRouter()


async def inspect_uploads(ctx: ServeContext, uploads: list[Upload]) -> tuple[list[Item], list[Any]]:
    """Decode and prepare the uploads (request threads), then inspect them in the next batch (model thread)."""
    served = ctx.served_or_503()
    items = await run_in_threadpool(lambda: [prepare_item(decode(u, ctx.settings.max_pixels), served)
                                             for u in uploads])
    try:
        results = await ctx.batcher.submit(items)
    except QueueFull as exc:
        raise UploadError(503, f"the service is busy ({exc}); retry shortly") from None
    except BatcherStopped as exc:
        raise UploadError(503, str(exc)) from None
    for item, result in zip(items, results):
        if isinstance(result, BaseException):
            message = " ".join(str(result).split()) or type(result).__name__
            raise UploadError(500, f"{item.decoded.name}: inference failed ({type(result).__name__}: {message})")
    return items, results


@router.post("/predict", response_model=PredictResponse, response_model_exclude_none=True,
             openapi_extra=PREDICT_BODY, responses=ERRORS, summary="route, score and decide one or more images")
async def predict(request: Request, maps: bool = Query(False, description="add heat map and overlay PNGs"),
                  ctx: ServeContext = Depends(context)) -> Any:
    start = time.perf_counter()
    ctx.served_or_503()
    uploads = await read_uploads(request, ctx.settings)
    items, results = await inspect_uploads(ctx, uploads)
    rows = [verdict(result, item.decoded.name, item.decoded.width, item.decoded.height)
            for item, result in zip(items, results)]
    latency_ms = 1000 * (time.perf_counter() - start)
    pictures = None
    if maps:
        pictures = await run_in_threadpool(
            lambda: [heat_images(result, item.decoded.image) for item, result in zip(items, results)])
    if ctx.recorder is not None:
        ids = await ctx.recorder.record(rows, results, [item.decoded.image for item in items], uploads,
                                        latency_ms, pictures)
        if ids:
            rows = [{**row, "verdict_id": i} for row, i in zip(rows, ids)]
    now = time.time()
    ctx.recent.extendleft({**row, "at": now} for row in rows)  # in the event loop: no lock needed
    if pictures:
        rows = [{**row, **picture} for row, picture in zip(rows, pictures)]
    return {"model": results[0].served.version, "engine": ctx.settings.engine,
            "elapsed_ms": 1000 * (time.perf_counter() - start), "results": rows}


@router.get("/tasks", responses=ERRORS, summary="the learned products")
async def tasks(ctx: ServeContext = Depends(context)) -> dict[str, Any]:
    served = ctx.served_or_503()
    return {"model": served.version, "tasks": served.task_rows()}


@router.get("/health", responses={503: {"description": "no model served yet (status loading or error); same body"}},
            summary="state: 200 once a model is served, 503 while loading or when no model could be loaded")
async def health(ctx: ServeContext = Depends(context)) -> Any:
    holder, settings, served = ctx.holder, ctx.settings, ctx.holder.current
    store = ctx.store
    body = jsonable_encoder({
        "status": "ok" if served is not None else ("error" if holder.last_error else "loading"),
        "version": __version__, "run": settings.run, "engine": settings.engine,
        "model": served.version if served else None,
        "products": [t.name for t in served.model.tasks] if served else [],
        "reloads": holder.reloads, "last_reload": holder.last_attempt, "reload_error": holder.last_error,
        "queued": ctx.batcher.queued, "batching": {"max_batch": settings.max_batch,
                                                   "max_wait_ms": settings.max_wait_ms,
                                                   **ctx.batcher.stats.to_dict()},
        "store": {"database": store.dialect, **ctx.recorder.counters()} if ctx.recorder is not None else None,
        "drift": {**ctx.drift, "interval": settings.drift_interval} if store is not None else None,
        "access": "token" if settings.tokens else "open"})
    return body if served is not None else JSONResponse(body, status_code=503)


@router.get("/ready", responses={503: {"model": ErrorResponse}}, summary="200 once a model is loaded")
async def ready(ctx: ServeContext = Depends(context)) -> dict[str, Any]:
    served = ctx.served_or_503()
    return {"ready": True, "model": served.version}


@router.post("/reload", responses={500: {"model": ErrorResponse}}, summary="load the run's model again")
async def reload(ctx: ServeContext = Depends(context)) -> Any:
    previous = ctx.holder.current.version if ctx.holder.current else None
    try:
        served = await asyncio.to_thread(ctx.holder.reload)
    except MoleflowError as exc:
        return error_response(500, str(exc), model=previous)
    return {"reloaded": True, "model": served.version, "previous": previous, "changed": served.version != previous,
            "products": [t.name for t in served.model.tasks], "seconds": served.load_seconds}


@router.get("/verdicts", summary="the most recent verdicts, newest first")
async def verdicts(limit: int = Query(50, ge=1, le=1000), ctx: ServeContext = Depends(context)) -> dict[str, Any]:
    return {"verdicts": list(ctx.recent)[:limit]}


def install_error_handlers(app: FastAPI) -> None:
    """Every refused or failed request answers one JSON line with its status; the service keeps running."""

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, exc: UploadError) -> JSONResponse:
        return error_response(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return error_response(422, f"invalid request ({problems})")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return error_response(500, f"internal error ({type(exc).__name__}: {exc})")
