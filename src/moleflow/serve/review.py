"""The review side of `moleflow serve`: the review queue, reviews, realised rates, drift and unknown parts.

    GET  /reviews/queue           flagged, unknown-product and audit-sampled passed parts not reviewed yet
    POST /reviews                 {verdict_id, label, correct_product?, note?}: recorded with the token's name
    GET  /reviews                 reviews, filtered by label, product, reviewer, time
    GET  /verdicts/{id}/image     the part's overlay PNG: its kept thumbnail, or redrawn from its image file
    GET  /products/{name}/quality realised false-alarm and detection rates per day, from reviews
    GET  /drift                   every product's drift state (checked now)
    GET  /unknowns                the unknown-product pile, clustered into products once large enough

All of them read the verdict store (`settings.store`); without one they answer 404 saying so. The rules
(audit sample, estimates, pile) are in `feedback.py` and `drift.py`; this module only serves them.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ..drift import alerts, product_drift
from ..errors import MoleflowError
from ..feedback import cluster_pile, discover_command, quality, review_queue, unknown_pile
from .context import ServeContext, context
from .schemas import ReviewIn
from .uploads import Upload, UploadError

log = logging.getLogger(__name__)
router = APIRouter()
_RENDERED = 64  # redrawn overlays kept in memory


def picture_info(row: dict[str, Any], thumbs: set[int]) -> dict[str, Any]:
    """Where the part's picture comes from: its kept thumbnail, its image file (redrawn), or nowhere."""
    url = f"/verdicts/{row['id']}/image"
    if row["id"] in thumbs:
        return {"url": url, "source": "thumbnail"}
    path = Path(str(row.get("path") or ""))
    if row.get("path") and path.is_file():
        return {"url": url, "source": "file", "path": str(path)}
    return {"url": None, "source": None, "why": "no thumbnail kept (serve --thumbnails) and no image file at "
                                                f"{row.get('path')!r}"}


def _public(row: dict[str, Any]) -> dict[str, Any]:
    out = {("verdict_id" if k == "id" else k): v for k, v in row.items()}
    review = out.get("review")
    if review:
        out["review"] = {k: review.get(k) for k in ("id", "label", "correct_product", "reviewer", "at", "note")}
    return out


@router.get("/reviews/queue", summary="parts to review: flagged, unknown product, audit sample of passed parts")
async def queue(product: str | None = None, decision: str | None = Query(None, description="normal, anomalous "
                "or unknown product"), since: str | None = None, until: str | None = None,
                limit: int = Query(50, ge=1, le=500), include_reviewed: bool = False,
                ctx: ServeContext = Depends(context)) -> dict[str, Any]:
    db = ctx.need_store()
    if decision not in (None, "normal", "anomalous", "unknown product"):
        raise UploadError(422, f"decision {decision!r}: use normal, anomalous or unknown product")

    def build() -> list[dict[str, Any]]:
        rows = review_queue(db, ctx.settings.audit_rate, product=product, decision=decision, since=since,
                            until=until, limit=limit, include_reviewed=include_reviewed)
        thumbs = db.thumbnail_ids(r["id"] for r in rows)
        return [{**_public(r), "image": picture_info(r, thumbs)} for r in rows]

    try:
        items = await run_in_threadpool(build)
    except MoleflowError as exc:
        raise UploadError(422, str(exc)) from None
    return {"audit_rate": ctx.settings.audit_rate, "thumbnails": ctx.settings.thumbnails, "products": ctx.learned(),
            "items": items}


@router.post("/reviews", summary="record a person's review of a verdict (reviewer: the token's name)")
async def add_review(review: ReviewIn, request: Request, ctx: ServeContext = Depends(context)) -> dict[str, Any]:
    db = ctx.need_store()
    reviewer = getattr(request.state, "token_name", None) or "anonymous"
    correct = (review.correct_product or "").strip() or None
    note = (review.note or "").strip() or None

    def write() -> dict[str, Any]:
        db.add_review(review.verdict_id, review.label, reviewer=reviewer, correct_product=correct, note=note)
        return db.reviews(verdict_id=review.verdict_id, limit=1)[0]

    try:
        row = await run_in_threadpool(write)
    except MoleflowError as exc:
        raise UploadError(404 if "no verdict" in str(exc) else 422, str(exc)) from None
    return {"review": row}


@router.get("/reviews", summary="reviews, newest first")
async def reviews(label: str | None = None, product: str | None = None, reviewer: str | None = None,
                  since: str | None = None, until: str | None = None,
                  limit: int = Query(100, ge=1, le=5000), ctx: ServeContext = Depends(context)) -> dict[str, Any]:
    db = ctx.need_store()
    try:
        rows = await run_in_threadpool(db.reviews, None, label, since, until, limit, product, reviewer)
    except MoleflowError as exc:
        raise UploadError(422, str(exc)) from None
    return {"reviews": rows}


@router.get("/verdicts/{verdict_id}/image", summary="the part's overlay PNG (kept thumbnail, or redrawn)",
            response_class=Response)
async def image(verdict_id: int, ctx: ServeContext = Depends(context)) -> Response:
    db = ctx.need_store()
    png = await run_in_threadpool(db.thumbnail, verdict_id)
    if png is not None:
        return Response(png, media_type="image/png", headers={"x-image-source": "thumbnail"})
    row = await run_in_threadpool(db.verdict, verdict_id)
    if row is None:
        raise UploadError(404, f"no verdict {verdict_id}")
    path = Path(str(row.get("path") or ""))
    if not row.get("path") or not path.is_file():
        raise UploadError(404, f"verdict {verdict_id}: no thumbnail kept (serve --thumbnails) and its image file "
                               f"{row.get('path')!r} is not here (serve uploads: --keep-images)")
    served = ctx.served_or_503()
    key = (verdict_id, served.version)
    if key not in ctx.rendered:
        data = await run_in_threadpool(path.read_bytes)
        if row.get("sha256") and hashlib.sha256(data).hexdigest() != row["sha256"]:
            raise UploadError(404, f"verdict {verdict_id}: {path} changed since it was inspected")
        ctx.rendered[key] = await _redraw(ctx, data, path.name)
        while len(ctx.rendered) > _RENDERED:
            ctx.rendered.pop(next(iter(ctx.rendered)))
    return Response(ctx.rendered[key], media_type="image/png",
                    headers={"x-image-source": "file", "x-image-model": served.version})


async def _redraw(ctx: ServeContext, data: bytes, name: str) -> bytes:
    """The overlay of an image file, through the batcher as POST /predict?maps=true (not recorded)."""
    from .routes import inspect_uploads
    from .verdicts import heat_images

    items, results = await inspect_uploads(ctx, [Upload(name, data)])
    pictures = await run_in_threadpool(heat_images, results[0], items[0].decoded.image)
    return base64.b64decode(pictures["overlay_png"])


@router.get("/products/{name}/quality", summary="realised false-alarm and detection rates per day, from reviews")
async def product_quality(name: str, since: str | None = None, until: str | None = None,
                          ctx: ServeContext = Depends(context)) -> dict[str, Any]:
    db = ctx.need_store()
    try:
        found = await run_in_threadpool(lambda: quality(db, ctx.settings.audit_rate, product=name, since=since,
                                                        until=until))
    except MoleflowError as exc:
        raise UploadError(422, str(exc)) from None
    if name not in found and name not in ctx.learned():
        raise UploadError(404, f"no product {name!r}: learned products are {', '.join(ctx.learned()) or 'none yet'}")
    entry = found.get(name, {"days": [], "total": None})
    return {"product": name, "audit_rate": ctx.settings.audit_rate, **entry}


@router.get("/drift", summary="every product's drift state (CUSUM on conformal p-values), checked now")
async def drift(ctx: ServeContext = Depends(context)) -> dict[str, Any]:
    db = ctx.need_store()
    served = ctx.served_or_503()
    states = await run_in_threadpool(product_drift, db, served.model.tasks)
    ctx.drift.update(checked_at=time.time(), alert=alerts(states), error=None, model=served.version)
    return {"checked_at": ctx.drift["checked_at"], "model": served.version, "alert": ctx.drift["alert"],
            "products": [s.to_dict() for s in states]}


@router.get("/unknowns", summary="unknown-product parts not exported yet, clustered when there are enough")
async def unknowns(since: str | None = None, until: str | None = None, cluster: bool = True,
                   limit: int = Query(24, ge=0, le=500), ctx: ServeContext = Depends(context)) -> dict[str, Any]:
    db = ctx.need_store()
    run = ctx.settings.run
    pile = await run_in_threadpool(lambda: unknown_pile(db, run, ctx.learned(), since=since, until=until))
    with_files = [r for r in pile if r["file"]]
    thumbs = await run_in_threadpool(db.thumbnail_ids, [r["id"] for r in pile[-limit:]] if limit else [])
    body: dict[str, Any] = {
        "parts": len(pile), "with_files": len(with_files), "min_to_cluster": ctx.settings.min_pile,
        "first": pile[0]["at"] if pile else None, "last": pile[-1]["at"] if pile else None,
        "items": [{**_public({k: v for k, v in r.items() if k != "review"}), "image": picture_info(r, thumbs)}
                  for r in (pile[-limit:][::-1] if limit else [])],
        "commands": {"export": f"moleflow unknowns {run} --export",
                     "learn": discover_command(run, f"{run}/unknowns/<date>")},
        "clusters": None, "why_not_clustered": None}
    if not cluster:
        body["why_not_clustered"] = "not asked (cluster=false)"
    elif len(with_files) < ctx.settings.min_pile:
        body["why_not_clustered"] = (f"{len(with_files)} unknown parts with their image file; clustered from "
                                     f"{ctx.settings.min_pile}")
    else:
        served = ctx.served_or_503()
        key = (tuple(r["id"] for r in with_files), served.version)
        if key not in ctx.clusters:
            ctx.clusters.clear()
            try:
                ctx.clusters[key] = await run_in_threadpool(cluster_pile, served.model, with_files)
            except MoleflowError as exc:
                body["why_not_clustered"] = str(exc)
        body["clusters"] = ctx.clusters.get(key)
    return body


async def check_drift(holder: Any, store: Any, drift_cache: dict[str, Any]) -> None:
    """One drift check of every product for /health (errors kept, never raised)."""
    import asyncio

    served = holder.current
    if served is None or store is None:
        return
    try:
        states = await asyncio.to_thread(product_drift, store, served.model.tasks)
    except Exception as exc:  # noqa: BLE001 - /health reports it; the service keeps serving
        log.error("drift check failed: %s", exc)
        drift_cache.update(checked_at=time.time(), error=" ".join(str(exc).split()) or type(exc).__name__)
        return
    drift_cache.update(checked_at=time.time(), alert=alerts(states), error=None, model=served.version)
