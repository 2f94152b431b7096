"""The verdict rule, in one place: an inspection of N images -> one verdict per image.

    decision(known, anomalous)                 "normal", "anomalous" or "unknown product"
    image_verdict(pred, i, tasks)              image i of an `inspector.Inspection` as a dict: product,
                                               nearest product, task id, score, threshold and its source,
                                               decision, router distance, routing margin and ambiguity
    route_fields(pred, i)                      {"route_margin", "route_ambiguous", "alternatives"}: how sure
                                               routing was, and the other plausible products' task ids

`moleflow predict`, `moleflow watch` and `moleflow serve` all decide through these functions.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

UNKNOWN = "unknown product"
UNREADABLE = "unreadable"
NORMAL, ANOMALOUS = "normal", "anomalous"
DECISIONS = (NORMAL, ANOMALOUS, UNKNOWN, UNREADABLE)


def decision(known: bool, anomalous: bool) -> str:
    """An image that fits no learned product is "unknown product"; otherwise its score against the routed
    product's calibrated threshold decides."""
    return UNKNOWN if not known else (ANOMALOUS if anomalous else NORMAL)


def _at(values: Any, i: int) -> Any:
    if values is None:
        return None
    value = values[i]
    return value.item() if hasattr(value, "item") else value


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def route_fields(pred: Any, i: int) -> dict[str, Any]:
    """Image i's routing margin (how much worse the runner-up product's patch memory fits than the routed one's;
    None when the prototype router alone decided or the product was given), whether routing was ambiguous (the
    part was then scored under every plausible product, `Inspector.decide`) and the other plausible products'
    task ids."""
    return {"route_margin": _finite(_at(pred.route_margin, i)), "route_ambiguous": bool(pred.ambiguous[i]),
            "alternatives": list(pred.alternatives[i])}


def image_verdict(pred: Any, i: int, tasks: Mapping[int, Any]) -> dict[str, Any]:
    """Image i of an `Inspection` (`tasks`: task id -> TaskInfo) as a verdict dict. Scores and distances are
    plain floats (nan stays nan: the caller decides how to write it)."""
    from .calibration import threshold_source

    info = tasks[int(pred.task_ids[i])]
    known = bool(pred.known[i])
    return {"product": info.name if known else UNKNOWN, "nearest_product": info.name, "task_id": int(info.task_id),
            "score": float(pred.scores[i]), "threshold": float(pred.thresholds[i]),
            "threshold_source": threshold_source(info.calibration),
            "decision": decision(known, bool(pred.anomalous[i])), "unknown_product": not known,
            "router_distance": float(pred.router_distance[i]), **route_fields(pred, i),
            "plausible_products": " ".join(tasks[t].name for t in pred.alternatives[i])}


def unreadable_verdict(reason: str) -> dict[str, Any]:
    """The verdict of an image that could not be decoded (not inspected)."""
    nan = float("nan")
    return {"product": "", "nearest_product": "", "task_id": None, "score": nan, "threshold": nan,
            "threshold_source": "", "decision": UNREADABLE, "unknown_product": False, "router_distance": nan,
            "route_margin": None, "route_ambiguous": None, "alternatives": [], "plausible_products": "",
            "reason": reason}
