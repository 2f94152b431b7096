"""The FastAPI app of `moleflow serve`: one `ServeContext`, its background tasks, and the routes.

    routes.py   POST /predict, GET /tasks, /health, /ready, POST /reload, GET /verdicts
    review.py   GET /reviews/queue, POST /reviews, GET /reviews, GET /verdicts/{id}/image,
                GET /products/{name}/quality, GET /drift, GET /unknowns (the review side, on the verdict store)
    GET /       the review page;  GET /docs  the OpenAPI docs

Every error is JSON `{"error": "one line naming the problem"}` with a 4xx (the request) or 5xx (the
service) status; a refused request never stops the service. The app holds all its state in its
`ServeContext`: nothing is global, so tests and uvicorn workers each build their own.

With `settings.store`, every verdict is also recorded in the verdict store by the app's writer thread
(`recorder.py`: one transaction per burst of requests) before the answer is sent, and its row id is returned
as `verdict_id`; a store that cannot be written is logged and counted in /health (`store.errors`), and the
verdicts are still answered. With `settings.keep_images` the uploaded bytes are kept in that folder (named by
their SHA-256) and that file is the recorded path; with `settings.thumbnails` a small overlay PNG of every
part the review queue will show (flagged, unknown product, audit sample) is kept in the store. With
`settings.tokens`, every endpoint but /health, /ready and the review page's own files needs
`Authorization: Bearer <token>` (`auth.BearerTokens`). /health reports the products in drift alert
(`drift.py`), checked every `settings.drift_interval` seconds.
"""

from __future__ import annotations

import asyncio
from collections import deque
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from .. import __version__
from ..errors import MoleflowError
from .batcher import Batcher
from .context import ServeContext
from .holder import ModelHolder
from .inference import Item, run_batch
from .recorder import VerdictRecorder
from .review import check_drift
from .review import router as review_router
from .routes import install_error_handlers
from .routes import router as inspection_router
from .settings import ServeSettings

STATIC = Path(__file__).parent / "static"


def build_context(settings: ServeSettings) -> ServeContext:
    """The app's state: model holder, batcher, and the verdict store with its writer (created or migrated now:
    a bad --store stops the start)."""
    holder = ModelHolder(settings)
    batcher: Batcher[Item, Any] = Batcher(partial(run_batch, holder), settings.max_batch, settings.max_wait_ms,
                                          settings.max_queue)
    ctx = ServeContext(settings, holder, batcher, recent=deque(maxlen=settings.recent))
    if settings.store:
        from ..store.verdicts import VerdictStore

        ctx.store = VerdictStore(settings.store)
        ctx.recorder = VerdictRecorder(ctx.store, settings)
    return ctx


async def _reload_quietly(holder: ModelHolder) -> None:
    try:
        await asyncio.to_thread(holder.reload)
    except MoleflowError:
        pass  # logged and kept in holder.last_error


async def _watch_model(ctx: ServeContext) -> None:
    """Reload when RUN/model/manifest.json changes (add-task, remove-task, calibrate)."""
    holder = ctx.holder
    while True:
        await asyncio.sleep(ctx.settings.watch_interval)
        if holder.current is None and holder.last_attempt is None:
            continue  # the first load is still running
        if await asyncio.to_thread(holder.manifest_changed):
            await _reload_quietly(holder)


async def _watch_drift(ctx: ServeContext) -> None:
    """Check every product for drift (for /health) every `drift_interval` seconds, once a model is served."""
    while True:
        if ctx.holder.current is not None:
            await check_drift(ctx.holder, ctx.store, ctx.drift)
            await asyncio.sleep(ctx.settings.drift_interval)
        else:
            await asyncio.sleep(0.5)


def _lifespan(ctx: ServeContext):
    """Start the batcher, the writer, the first model load and the watchers; stop them in reverse."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await ctx.batcher.start()
        if ctx.recorder is not None:
            ctx.recorder.start()
        background = [asyncio.create_task(_reload_quietly(ctx.holder))]
        if ctx.settings.watch_interval > 0:
            background.append(asyncio.create_task(_watch_model(ctx)))
        if ctx.store is not None and ctx.settings.drift_interval > 0:
            background.append(asyncio.create_task(_watch_drift(ctx)))
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await ctx.batcher.stop()
            if ctx.recorder is not None:
                await asyncio.to_thread(ctx.recorder.close)
            if ctx.store is not None:
                ctx.store.close()

    return lifespan


def create_app(settings: ServeSettings) -> FastAPI:
    """A new app serving `settings.run`; the model loads in the background once the app starts."""
    ctx = build_context(settings)
    app = FastAPI(title="moleflow", version=__version__, lifespan=_lifespan(ctx),
                  description="Continual industrial anomaly detection (MoLE-Flow): each image is routed to the "
                              "product it shows, scored and decided against that product's calibrated threshold.")
    app.state.context, app.state.settings = ctx, settings
    if settings.tokens:
        from .auth import BearerTokens

        app.add_middleware(BearerTokens, tokens=settings.tokens)
    install_error_handlers(app)
    app.include_router(inspection_router)
    app.include_router(review_router)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def app_from_env() -> FastAPI:
    """The app factory uvicorn workers call (`moleflow serve --workers N`): settings from the environment."""
    return create_app(ServeSettings.from_env())
