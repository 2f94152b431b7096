"""What the model thread does with a batch: prepared images of several requests -> one engine call.

    item = prepare_item(decoded, served)              # in the request's thread: resize, normalise, tiles
    results = run_batch(holder, [item, item, ...])    # in the model thread: one `Engine.inspect` call

Preprocessing runs in the request threads, in parallel with the model. A batch runs on the model that is
current when it starts (`holder.current`); an item prepared by an earlier model is prepared again for it
(a reload may change the input size or tiling), so an image is always scored by one model end to end.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.batch import Prepared
from ..decisions import route_fields
from ..errors import MoleflowError
from .holder import ModelHolder, Served
from .uploads import Decoded
from .verdicts import ImageResult


@dataclass
class Item:
    """One image waiting for the model: decoded, and prepared by the model `version`."""

    decoded: Decoded
    prep: Prepared
    version: str


def prepare_item(decoded: Decoded, served: Served) -> Item:
    return Item(decoded, served.model.prepare([decoded.image]), served.version)


def run_batch(holder: ModelHolder, items: list[Item]) -> list[ImageResult]:
    """Inspect the images of `items` in one engine call on the current model; one result per item."""
    served = holder.current
    if served is None:
        raise MoleflowError("no model is loaded")
    preps = [item.prep if item.version == served.version else served.model.prepare([item.decoded.image])
             for item in items]
    out = served.engine.inspect(Prepared.concat(preps))
    return [ImageResult(task_id=int(out.task_ids[i]), score=float(out.scores[i]), threshold=float(out.thresholds[i]),
                        known=bool(out.known[i]), anomalous=bool(out.anomalous[i]),
                        router_distance=float(out.router_distance[i]), map=out.maps[i].numpy(), served=served,
                        **route_fields(out, i))
            for i in range(len(items))]
