"""The request and response shapes of `moleflow serve`, for validation and the OpenAPI docs."""

from __future__ import annotations

from pydantic import BaseModel, Field


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
    route_margin: float | None = Field(None, description="how much worse the runner-up product fits, in log units "
                                       "(the router's evidence); null when no runner-up was weighed")
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


class ReviewIn(BaseModel):
    verdict_id: int = Field(description="the verdict's id (verdict_id of POST /predict, id in the queue)")
    label: str = Field(description="defect_confirmed, false_alarm (flagged but good), good_confirmed (passed and "
                                   "good) or wrong_product")
    correct_product: str | None = Field(None, description="with wrong_product: the product it is")
    note: str | None = Field(None, max_length=2000)
