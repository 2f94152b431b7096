"""The verdict rule, in one place: an inspection of N images -> one verdict per image.

    decision(known, anomalous)                 "normal", "anomalous" or "unknown product"
    verdict_fields(info, known, ...)           one verdict from its parts (the one rule)
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


def verdict_fields(info: Any, known: bool, anomalous: bool, score: float, threshold: float,
                   router_distance: float, route: Mapping[str, Any], plausible: list[str]) -> dict[str, Any]:
    """One verdict from its parts: `info` is the nearest product's TaskInfo, `route` is `route_fields`'s dict and
    `plausible` the other plausible products' names. Numbers as given (the caller decides how to write nan)."""
    from .calibration import threshold_source

    return {"product": info.name if known else UNKNOWN, "nearest_product": info.name, "task_id": int(info.task_id),
            "score": score, "threshold": threshold, "threshold_source": threshold_source(info.calibration),
            "decision": decision(known, anomalous), "unknown_product": not known,
            "router_distance": router_distance, **route, "plausible_products": plausible}


def image_verdict(pred: Any, i: int, tasks: Mapping[int, Any]) -> dict[str, Any]:
    """Image i of an `Inspection` (`tasks`: task id -> TaskInfo) as a verdict dict. Scores and distances are
    plain floats (nan stays nan: the caller decides how to write it); plausible products space-separated."""
    route = route_fields(pred, i)
    verdict = verdict_fields(tasks[int(pred.task_ids[i])], bool(pred.known[i]), bool(pred.anomalous[i]),
                             float(pred.scores[i]), float(pred.thresholds[i]), float(pred.router_distance[i]),
                             route, [tasks[t].name for t in route["alternatives"]])
    return {**verdict, "plausible_products": " ".join(verdict["plausible_products"])}


def unreadable_verdict(reason: str) -> dict[str, Any]:
    """The verdict of an image that could not be decoded (not inspected)."""
    nan = float("nan")
    return {"product": "", "nearest_product": "", "task_id": None, "score": nan, "threshold": nan,
            "threshold_source": "", "decision": UNREADABLE, "unknown_product": False, "router_distance": nan,
            "route_margin": None, "route_ambiguous": None, "alternatives": [], "plausible_products": "",
            "reason": reason}
