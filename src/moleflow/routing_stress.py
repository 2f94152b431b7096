"""Routing stress test: does a defect move an image to another product's expert?

    defective = paste_area_defect(image_uint8, area=0.05, rng=rng, donor=other_uint8)   # (H, W, 3) uint8
    variant = look_alike(pil_image, "brightness")        # the same part under a small global change
    table = routing_under_defects(route, {"tile": imgs, ...}, {"tile": 0, ...}, areas=AREAS, seed=0)
    table["tile"] = {"n": 20, "good": 1.0, "defective": {"0.02": 1.0, "0.05": 0.95, ...}}

`route(images) -> (N,) task ids` is any router: the trained model's (`inspector_route`) or a bare
prototype router over backbone features (what `moleflow bench routing` uses to compare routing
statistics on held-out training normals). Defects are rectangles covering an exact share of the image
(aspect 1:2 to 2:1), filled with one of four contents in turn: a turned patch of another good image of the
product (cut-paste), a dark hole, a bright spot, or noise. Nothing here looks at test labels.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance

AREAS = (0.02, 0.05, 0.10, 0.20)
FILLS = ("cutpaste", "hole", "spot", "noise")
LOOK_ALIKE_KINDS = ("brightness", "colour", "scale")


def paste_area_defect(image: np.ndarray, area: float, rng: np.random.Generator, donor: np.ndarray | None = None,
                      fill: str | None = None) -> np.ndarray:
    """`image` (H, W, 3) uint8 with a rectangle covering `area` of it replaced (see module doc)."""
    h, w = image.shape[:2]
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    ph = int(np.clip(round(np.sqrt(area * h * w * aspect)), 1, h))
    pw = int(np.clip(round(area * h * w / ph), 1, w))
    y, x = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    fill = fill or FILLS[int(rng.integers(0, len(FILLS)))]
    out = image.copy()
    if fill == "cutpaste" and donor is not None:
        src = np.asarray(Image.fromarray(donor).resize((w, h)))
        sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        patch = np.rot90(src, 2)[sy:sy + ph, sx:sx + pw]
    elif fill == "hole" or fill == "cutpaste":
        patch = np.full((ph, pw, 3), rng.integers(0, 40), dtype=np.uint8)
    elif fill == "spot":
        patch = np.full((ph, pw, 3), rng.integers(215, 256), dtype=np.uint8)
    else:
        patch = rng.integers(0, 256, (ph, pw, 3), dtype=np.uint8)
    out[y:y + ph, x:x + pw] = patch
    return out


def look_alike(image: Image.Image, kind: str, strength: float = 0.15) -> Image.Image:
    """The same part under a small global change: `brightness` (x 1 + strength), `colour` (red up, blue
    down by strength), or `scale` (zoomed in by 1 + strength, same size: a finer texture scale)."""
    image = image.convert("RGB")
    if kind == "brightness":
        return ImageEnhance.Brightness(image).enhance(1.0 + strength)
    if kind == "colour":
        arr = np.asarray(image).astype(np.float32)
        arr *= np.array([1.0 + strength, 1.0, 1.0 - strength], dtype=np.float32)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if kind == "scale":
        w, h = image.size
        cw, ch = round(w / (1.0 + strength)), round(h / (1.0 + strength))
        left, top = (w - cw) // 2, (h - ch) // 2
        return image.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BICUBIC)
    raise ValueError(f"unknown look-alike kind {kind!r}; choose from {', '.join(LOOK_ALIKE_KINDS)}")


def routing_under_defects(route: Callable[[list[Image.Image]], np.ndarray], products: dict[str, Sequence[Image.Image]],
                          task_of: dict[str, int], areas: Sequence[float] = AREAS, seed: int = 0) -> dict:
    """Routing accuracy per product of its good images and of copies with one pasted defect per area."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, images in products.items():
        arrays = [np.asarray(im.convert("RGB")) for im in images]
        truth = task_of[name]
        entry = {"n": len(arrays), "good": float(np.mean(route(list(images)) == truth)), "defective": {}}
        for area in areas:
            pasted = [Image.fromarray(paste_area_defect(a, area, rng, donor=arrays[(i + 1) % len(arrays)]))
                      for i, a in enumerate(arrays)]
            entry["defective"][f"{area:g}"] = float(np.mean(route(pasted) == truth))
        out[name] = entry
    return out


def inspector_route(model, batch_size: int = 32) -> Callable[[list[Image.Image]], np.ndarray]:
    """The trained model's routing only (backbone, router and, for `router.mode` patch or gated, the candidate
    products' patch memories; no flow): images -> (N,) task ids."""

    @torch.no_grad()
    def route(images: list[Image.Image]) -> np.ndarray:
        ids, tasks = [], model.inspector.task_ids
        for start in range(0, len(images), batch_size):
            prep = model.prepare(images[start:start + batch_size])
            tokens, routing = model.inspector.extract(prep.pixels, batch_size)
            routed = model.inspector.route(tokens.float(), routing.float(), prep.owner.to(routing.device),
                                           prep.n_images, tasks)
            ids.append(torch.tensor(tasks)[routed.index.cpu()].numpy())
        return np.concatenate(ids)

    return route
