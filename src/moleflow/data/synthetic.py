"""Generated "products" with exact defect masks, built only from pictures bundled with installed
packages (scikit-image's `skimage.data` images that ship in the wheel, scikit-learn's sample
images). Nothing is downloaded.

A product is a named source picture. Its normal images are random views of the source (position
jitter, small rotation, flips for textures, brightness/contrast/colour jitter, a little noise), so
they vary but come from one distribution. Defective test images are normal images with one
defect painted in; the mask marks exactly the pixels that the defect changed:

  * `scratch`: a thin bright or dark polyline;
  * `spot`: an irregular blob of a foreign colour;
  * `hole`: an irregular dark (on dark material: bright) blob;
  * `crack`: a thin random-walk path, possibly branched;
  * `stain`: a colour shift in a soft blob (mask: where the change exceeds a quarter of its maximum);
  * `missing`: a patch replaced by a flat colour or by a turned, shifted copy of elsewhere.

Mask areas are kept within 0.5-5 % of the image. Everything is deterministic given the seed: each
image has its own `numpy.random.Generator` derived from (seed, product, split, index), so asking
for more training images does not change the test images.
"""

from __future__ import annotations

import functools
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ..errors import MoleflowError

DEFECT_KINDS = ("scratch", "spot", "hole", "crack", "stain", "missing")
AREA_RANGE = (0.005, 0.05)  # mask area as a fraction of the image
MIN_CONTRAST = 0.15  # mean absolute change inside the mask (0..1 scale) at severity 1
_MARKER = ".moleflow_synthetic"
_SS = 4  # supersampling factor for drawing anti-aliased shapes


# --------------------------------------------------------------------------------------- sources


def _skimage_source(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        return getattr(data, name)()

    return load


def _sklearn_source(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)

    return load


@dataclass(frozen=True)
class Product:
    """A named source picture. Calling it returns the source as uint8 RGB (H, W, 3)."""

    name: str
    source: Callable[[], np.ndarray]
    texture: bool  # texture: anywhere in the source, flips and larger rotations allowed
    crop: float  # side of a view as a fraction of the source's short side
    tint: tuple[float, float, float] | None = None  # colour given to a grey source

    def __call__(self) -> np.ndarray:
        arr = np.asarray(self.source())
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
            if self.tint is not None:
                arr = np.clip(arr.astype(np.float32) * np.asarray(self.tint, np.float32), 0, 255).round()
        return np.ascontiguousarray(arr[..., :3]).astype(np.uint8)


PRODUCTS: dict[str, Product] = {
    p.name: p
    for p in (
        Product("brick", _skimage_source("brick"), True, 0.5, (1.15, 0.68, 0.52)),
        Product("grass", _skimage_source("grass"), True, 0.5, (0.72, 1.0, 0.5)),
        Product("gravel", _skimage_source("gravel"), True, 0.5, (1.0, 0.94, 0.82)),
        Product("moon", _skimage_source("moon"), True, 0.5, (1.0, 0.98, 0.92)),
        Product("tissue", _skimage_source("immunohistochemistry"), True, 0.5),
        Product("hubble", _skimage_source("hubble_deep_field"), True, 0.4),
        Product("coins", _skimage_source("coins"), False, 0.9, (1.0, 0.9, 0.7)),
        Product("coffee", _skimage_source("coffee"), False, 0.85),
        Product("camera", _skimage_source("camera"), False, 0.85),
        Product("chelsea", _skimage_source("chelsea"), False, 0.85),
        Product("astronaut", _skimage_source("astronaut"), False, 0.85),
        Product("rocket", _skimage_source("rocket"), False, 0.85),
        Product("retina", _skimage_source("retina"), False, 0.9),
        Product("china", _sklearn_source("china.jpg"), False, 0.85),
        Product("flower", _sklearn_source("flower.jpg"), False, 0.85),
    )
}


def _product(name: str) -> Product:
    if name not in PRODUCTS:
        raise MoleflowError(f"unknown synthetic product {name!r}; choose from {', '.join(PRODUCTS)}")
    return PRODUCTS[name]


@functools.lru_cache(maxsize=32)
def _prepared_source(name: str, size: int) -> Image.Image:
    """The source (RGB PIL image) scaled so that a nominal view is `size` pixels wide."""
    prod = _product(name)
    src = prod()
    h, w = src.shape[:2]
    f = size / (prod.crop * min(h, w))
    nw, nh = max(size, round(w * f)), max(size, round(h * f))
    return Image.fromarray(src).resize((nw, nh), Image.Resampling.LANCZOS)


# --------------------------------------------------------------------------------------- normal images


def _normal_image(src: Image.Image, texture: bool, size: int, rng: np.random.Generator) -> np.ndarray:
    """One normal view (float32 (size, size, 3), 0..1)."""
    W, H = src.size
    if texture:
        angle = np.deg2rad(rng.uniform(-8.0, 8.0))
        scale = rng.uniform(0.93, 1.07)
        fx, fy = rng.choice([-1.0, 1.0], 2)
        ext = 0.5 * size * scale * (abs(np.cos(angle)) + abs(np.sin(angle)))
        cy = rng.uniform(ext, H - ext) if H > 2 * ext + 1 else H / 2
        cx = rng.uniform(ext, W - ext) if W > 2 * ext + 1 else W / 2
    else:
        angle = np.deg2rad(rng.uniform(-3.0, 3.0))
        scale = rng.uniform(0.97, 1.03)
        fx = fy = 1.0
        ext = 0.5 * size * scale * (abs(np.cos(angle)) + abs(np.sin(angle)))
        cy, cx = np.array([H / 2, W / 2]) + np.clip(rng.normal(0, 0.02 * size, 2), -0.05 * size, 0.05 * size)
        # keep the view inside the source where it fits (no black corners)
        cy = float(np.clip(cy, ext, H - ext)) if H > 2 * ext else H / 2
        cx = float(np.clip(cx, ext, W - ext)) if W > 2 * ext else W / 2
    c, s, h = np.cos(angle) * scale, np.sin(angle) * scale, size / 2
    # output (X, Y) -> source: centre + R(angle) * scale * flip * ((X, Y) - size / 2)
    coeffs = (c * fx, -s * fy, cx - c * fx * h + s * fy * h,
              s * fx, c * fy, cy - s * fx * h - c * fy * h)
    view = src.transform((size, size), Image.Transform.AFFINE, tuple(float(v) for v in coeffs),
                         resample=Image.Resampling.BILINEAR)
    img = np.asarray(view, np.float32) * np.float32(1 / 255)
    mean = img.mean()
    img = (img - mean) * np.float32(rng.uniform(0.88, 1.12)) + np.float32(mean + rng.uniform(-0.05, 0.05))
    img *= rng.uniform(0.97, 1.03, 3).astype(np.float32)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(0.01)
    return np.clip(img, 0.0, 1.0, out=img)


# --------------------------------------------------------------------------------------- defects


def _coverage(h: int, w: int, draw: Callable[[ImageDraw.ImageDraw, int], None]) -> np.ndarray:
    """Anti-aliased coverage (float32 (h, w), 0..1) of shapes drawn in pixel units (supersampled)."""
    canvas = Image.new("L", (w * _SS, h * _SS), 0)
    draw(ImageDraw.Draw(canvas), _SS)
    return np.asarray(canvas.resize((w, h), Image.Resampling.BOX), np.float32) / 255.0


def _region_mean(img: np.ndarray, cov: np.ndarray) -> np.ndarray:
    sel = cov > 0.5
    if not sel.any():
        return img.reshape(-1, 3).mean(0)
    return img[sel].mean(0)


def _dark_or_bright(img: np.ndarray, cov: np.ndarray, dark_factor: float) -> np.ndarray:
    """A dark version of the texture on bright material, a bright one on dark material."""
    if _region_mean(img, cov).mean() > 0.4:
        return img * dark_factor
    return 0.82 + 0.18 * img


def _blend(img: np.ndarray, cov: np.ndarray, target: np.ndarray, severity: float) -> np.ndarray:
    """Paint `target` where the shape covers the pixel. The mask is `cov >= 0.5`; pixels that the
    shape only grazes get a faint anti-aliasing (at most 1/8 of the defect's contrast)."""
    alpha = np.where(cov >= 0.5, cov, 0.25 * cov)
    return np.clip(img + severity * alpha[..., None] * (target - img), 0.0, 1.0)


def _point(rng: np.random.Generator, h: int, w: int, margin: float) -> np.ndarray:
    return np.array([rng.uniform(margin * w, (1 - margin) * w), rng.uniform(margin * h, (1 - margin) * h)])


def _blob_polygon(rng: np.random.Generator, centre: np.ndarray, a: float, b: float) -> list[tuple[float, float]]:
    """An irregular ellipse (x, y points)."""
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    r = np.ones_like(t)
    for k in (2, 3, 5):
        r += rng.uniform(0.0, 0.12 / k * 2) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    rot = rng.uniform(0, np.pi)
    x, y = a * r * np.cos(t), b * r * np.sin(t)
    px = centre[0] + x * np.cos(rot) - y * np.sin(rot)
    py = centre[1] + x * np.sin(rot) + y * np.cos(rot)
    return list(zip(px.tolist(), py.tolist()))


def _scale_poly(pts, k):
    return [(x * k, y * k) for x, y in pts]


def _scratch(img, rng, severity):
    h, w = img.shape[:2]
    S = min(h, w)
    n = int(rng.integers(2, 5))
    length = rng.uniform(0.35, 0.7) * S
    width = max(1.3, rng.uniform(0.011, 0.018) * S)
    pts = [_point(rng, h, w, 0.15)]
    ang = rng.uniform(0, 2 * np.pi)
    for _ in range(n - 1):
        ang += rng.normal(0, 0.35)
        p = pts[-1] + length / (n - 1) * np.array([np.cos(ang), np.sin(ang)])
        pts.append(np.clip(p, [0.05 * w, 0.05 * h], [0.95 * w, 0.95 * h]))
    pts = [tuple(p) for p in pts]
    cov = _coverage(h, w, lambda d, k: d.line(_scale_poly(pts, k), fill=255, width=max(1, round(width * k)),
                                              joint="curve"))
    target = _dark_or_bright(img, cov, 0.15)
    return _blend(img, cov, target, severity), cov >= 0.5


def _crack(img, rng, severity):
    h, w = img.shape[:2]
    S = min(h, w)
    step = max(1.0, S / 112)
    width0 = max(1.2, rng.uniform(0.008, 0.014) * S)

    def walk(start, ang, length):
        pts, p = [start], start
        for _ in range(max(2, int(length / step))):
            ang += rng.normal(0, 0.3)
            p = p + step * np.array([np.cos(ang), np.sin(ang)])
            if not (0.05 * w < p[0] < 0.95 * w and 0.05 * h < p[1] < 0.95 * h):
                break
            pts.append(p)
        return pts, ang

    main, ang = walk(_point(rng, h, w, 0.2), rng.uniform(0, 2 * np.pi), rng.uniform(0.35, 0.6) * S)
    paths = [(main, width0)]
    if rng.random() < 0.6 and len(main) > 6:
        i = int(rng.integers(len(main) // 4, 3 * len(main) // 4))
        branch, _ = walk(main[i], ang + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1), rng.uniform(0.15, 0.3) * S)
        paths.append((branch, 0.7 * width0))
    widths = [np.clip(wd * (1 + 0.3 * rng.standard_normal(len(p))), 0.6 * wd, 1.4 * wd) for p, wd in paths]

    def draw(d, k):
        for (pts, _), ws in zip(paths, widths):
            for j in range(len(pts) - 1):
                wj = max(1.0, ws[j] * k)
                d.line([tuple(pts[j] * k), tuple(pts[j + 1] * k)], fill=255, width=round(wj))
                r = wj / 2
                x, y = pts[j + 1] * k
                d.ellipse([x - r, y - r, x + r, y + r], fill=255)

    cov = _coverage(h, w, draw)
    target = _dark_or_bright(img, cov, rng.uniform(0.08, 0.2))
    return _blend(img, cov, target, severity), cov >= 0.5


def _blob(img, rng, lo, hi):
    h, w = img.shape[:2]
    S = min(h, w)
    a = rng.uniform(lo, hi) * S
    b = a * rng.uniform(0.6, 1.0)
    centre = _point(rng, h, w, 0.12)
    pts = _blob_polygon(rng, centre, a, b)
    return _coverage(h, w, lambda d, k: d.polygon(_scale_poly(pts, k), fill=255))


def _hole(img, rng, severity):
    cov = _blob(img, rng, 0.045, 0.09)
    if _region_mean(img, cov).mean() > 0.3:
        # dark, darkest in the middle
        depth = ndimage.gaussian_filter(cov, max(1.0, min(img.shape[:2]) / 100))
        target = img * 0.12 * (1.3 - 0.6 * depth[..., None]) + 0.01
    else:
        target = 0.85 + 0.15 * img
    return _blend(img, cov, target, severity), cov >= 0.5


_SPOT_COLOURS = np.array([
    (0.95, 0.85, 0.15), (0.15, 0.3, 0.95), (0.9, 0.15, 0.1), (0.97, 0.97, 0.97),
    (0.03, 0.03, 0.03), (0.15, 0.8, 0.25), (0.85, 0.2, 0.85),
], np.float32)


def _spot(img, rng, severity):
    cov = _blob(img, rng, 0.035, 0.08)
    m = _region_mean(img, cov)
    dist = np.abs(_SPOT_COLOURS - m).sum(1)
    cands = np.argsort(dist)[-3:]  # one of the three most different colours
    colour = _SPOT_COLOURS[rng.choice(cands)]
    target = colour + 0.2 * (img - m)
    return _blend(img, cov, target, severity), cov >= 0.5


_STAIN_SHIFTS = np.array([
    (0.4, 0.3, -0.15), (-0.35, -0.38, -0.42), (-0.1, -0.3, -0.45), (-0.3, 0.05, 0.4),
    (0.4, -0.2, 0.3), (0.4, 0.42, 0.45),
], np.float32)


def _stain(img, rng, severity):
    h, w = img.shape[:2]
    S = min(h, w)
    r = rng.uniform(0.06, 0.11) * S
    c = _point(rng, h, w, 0.15)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    field = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(3, 6))):
        cx, cy = c + rng.normal(0, 0.45 * r, 2)
        sg = r * rng.uniform(0.5, 0.9)
        field = np.maximum(field, np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sg * sg)))
    t = np.clip((field - 0.35) / 0.3, 0, 1)
    alpha = t * t * (3 - 2 * t)  # smoothstep: a soft but narrow rim
    core = alpha > 0.5
    gains = [np.abs(np.clip(img[core] + d, 0, 1) - img[core]).max(1).mean() if core.any() else 0.0
             for d in _STAIN_SHIFTS]
    cands = np.argsort(gains)[-3:]
    delta = _STAIN_SHIFTS[rng.choice(cands)]
    out = np.clip(img + severity * alpha[..., None] * delta, 0, 1)
    change = np.abs(out - img).max(2)
    return out, change > 0.25 * severity * float(np.abs(delta).max())


def _missing(img, rng, severity):
    h, w = img.shape[:2]
    S = min(h, w)
    bw, bh = rng.uniform(0.08, 0.2, 2) * S
    c = _point(rng, h, w, 0.15)
    rot = rng.uniform(0, np.pi)
    corners = np.array([(-bw, -bh), (bw, -bh), (bw, bh), (-bw, bh)]) / 2
    corners = corners * rng.uniform(0.85, 1.15, corners.shape)
    R = np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]])
    pts = [tuple(c + R @ p) for p in corners]
    cov = _coverage(h, w, lambda d, k: d.polygon(_scale_poly(pts, k), fill=255))
    m = _region_mean(img, cov).mean()
    if rng.random() < 0.5:  # flat colour (the part is gone, background shows)
        level = rng.uniform(0.03, 0.12) if m > 0.45 else rng.uniform(0.85, 0.95)
        target = np.full_like(img, level) + rng.normal(0, 0.01, img.shape).astype(np.float32)
    else:  # a turned copy from elsewhere, brightness shifted away from the material
        other = np.rot90(img) if h == w else img[::-1, ::-1]
        shift = (int(rng.integers(S // 3, S - S // 3)), int(rng.integers(S // 3, S - S // 3)))
        other = np.roll(other, shift, axis=(0, 1))
        target = other + (-0.25 if m > 0.5 else 0.25)
    return _blend(img, cov, target, severity), cov >= 0.5


_DEFECTS = {"scratch": _scratch, "spot": _spot, "hole": _hole, "crack": _crack, "stain": _stain, "missing": _missing}


def _check_kinds(kinds: Sequence[str] | None) -> tuple[str, ...]:
    if kinds is None:
        return DEFECT_KINDS
    if isinstance(kinds, str):
        kinds = [kinds]
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in _DEFECTS]
    if bad or not kinds:
        raise MoleflowError(f"unknown defect kind(s) {', '.join(map(repr, bad)) or '(none given)'}; "
                            f"choose from {', '.join(DEFECT_KINDS)}")
    return kinds


def _as_float(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    return image.astype(np.float32)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255.0 + 0.5).astype(np.uint8)


def _apply_defect_float(img: np.ndarray, kind: str, rng: np.random.Generator,
                        severity: float) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = AREA_RANGE
    best, best_score = None, -np.inf
    for _ in range(40):
        out, mask = _DEFECTS[kind](img, rng, severity)
        if not mask.any():
            continue
        area = float(mask.mean())
        contrast = float(np.abs(out - img).max(2)[mask].mean())
        if lo <= area <= hi and contrast >= MIN_CONTRAST * severity:
            return out, mask
        # fall-back: the candidate closest to the bounds
        score = -max(lo - area, area - hi, 0) / lo - max(MIN_CONTRAST * severity - contrast, 0)
        if score > best_score:
            best, best_score = (out, mask), score
    if best is None:  # practically impossible (40 empty masks); make a plain spot
        out, mask = _hole(img, rng, max(severity, 1.0))
        return out, mask
    return best


def apply_defect(image: np.ndarray, kind: str, rng: np.random.Generator | int = 0,
                 severity: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of `kind` into an RGB image (uint8 or float 0..1, (H, W, 3)).

    Returns the defective image as uint8 and its exact bool mask (H, W), area within `AREA_RANGE`.
    `severity` scales the contrast of the defect (1: clearly visible; 0.3: subtle)."""
    (kind,) = _check_kinds([kind])
    if not severity > 0:
        raise MoleflowError(f"severity={severity}: must be > 0")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    out, mask = _apply_defect_float(_as_float(image), kind, rng, float(severity))
    return _to_uint8(out), mask


# --------------------------------------------------------------------------------------- products


@dataclass
class SyntheticClass:
    """One generated product in memory. Test images: first the good ones, then the defective ones."""

    name: str
    train_images: np.ndarray  # uint8 (n_train, S, S, 3)
    test_images: np.ndarray  # uint8 (n_test, S, S, 3)
    test_labels: np.ndarray  # int64 (n_test,): 0 good, 1 defective
    test_masks: np.ndarray  # bool (n_test, S, S)
    test_kinds: list[str]  # "good" or the defect kind, per test image

    @property
    def size(self) -> int:
        return int(self.train_images.shape[1])


def _rng(seed: int, product: str, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(product.encode()), stream, index]))


def _check_counts(**counts: int) -> None:
    for name, n in counts.items():
        if int(n) != n or n < 0:
            raise MoleflowError(f"{name}={n}: must be a whole number >= 0")


def generate_product(product: str, n_train: int, n_test_good: int, n_test_defect: int, size: int = 224,
                     seed: int = 0, defect_kinds: Sequence[str] | None = None,
                     severity: float = 1.0) -> SyntheticClass:
    """Generate one product: `n_train` normal train images, `n_test_good` normal and `n_test_defect`
    defective test images (defect kinds cycle through `defect_kinds`, default all of `DEFECT_KINDS`)."""
    prod = _product(product)
    kinds = _check_kinds(defect_kinds)
    _check_counts(n_train=n_train, n_test_good=n_test_good, n_test_defect=n_test_defect, seed=seed)
    if int(size) != size or size < 16:
        raise MoleflowError(f"size={size}: must be a whole number >= 16")
    if not severity > 0:
        raise MoleflowError(f"severity={severity}: must be > 0")
    size, seed = int(size), int(seed)
    src = _prepared_source(product, size)

    def normal(stream: int, i: int) -> tuple[np.ndarray, np.random.Generator]:
        rng = _rng(seed, product, stream, i)
        return _normal_image(src, prod.texture, size, rng), rng

    train = np.zeros((n_train, size, size, 3), np.uint8)
    for i in range(n_train):
        train[i] = _to_uint8(normal(0, i)[0])
    n_test = n_test_good + n_test_defect
    test = np.zeros((n_test, size, size, 3), np.uint8)
    masks = np.zeros((n_test, size, size), bool)
    labels = np.zeros(n_test, np.int64)
    test_kinds = ["good"] * n_test_good
    for i in range(n_test_good):
        test[i] = _to_uint8(normal(1, i)[0])
    for i in range(n_test_defect):
        kind = kinds[i % len(kinds)]
        img, rng = normal(2, i)
        out, mask = _apply_defect_float(img, kind, rng, float(severity))
        j = n_test_good + i
        test[j], masks[j], labels[j] = _to_uint8(out), mask, 1
        test_kinds.append(kind)
    return SyntheticClass(product, train, test, labels, masks, test_kinds)


def _prepare_dir(pdir: Path) -> None:
    if pdir.exists():
        if (pdir / _MARKER).is_file():
            shutil.rmtree(pdir)
        elif not pdir.is_dir() or any(pdir.iterdir()):
            raise MoleflowError(f"{pdir}: exists and was not written by moleflow's generator; "
                                f"choose an empty output folder")
    pdir.mkdir(parents=True, exist_ok=True)
    (pdir / _MARKER).write_text("written by moleflow.data.synthetic; rewritten on the next run\n")


def _save_png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, compress_level=1)


def write_mvtec_layout(root: str | Path, products: Sequence[str], n_train: int = 40, n_test_good: int = 10,
                       n_test_defect: int = 10, size: int = 224, seed: int = 0,
                       defect_kinds: Sequence[str] | None = None, severity: float = 1.0) -> Path:
    """Write generated products as an MVTec AD tree under `root` and return `root`:
    `<product>/train/good/000.png`, `test/good/*.png`, `test/<kind>/*.png`,
    `ground_truth/<kind>/<stem>_mask.png` (0/255 L-mode PNG of the image's size).

    A product folder written earlier by this function is replaced; any other non-empty folder of
    that name is an error (nothing of the user's is deleted)."""
    root = Path(root).expanduser()
    if isinstance(products, str):
        products = [products]
    for name in products:
        _product(name)
    for name in products:
        data = generate_product(name, n_train, n_test_good, n_test_defect, size, seed, defect_kinds, severity)
        pdir = root / name
        _prepare_dir(pdir)
        width = max(3, len(str(max(n_train, n_test_good, n_test_defect, 1) - 1)))
        (pdir / "train" / "good").mkdir(parents=True)
        (pdir / "test" / "good").mkdir(parents=True)
        for i, img in enumerate(data.train_images):
            _save_png(img, pdir / "train" / "good" / f"{i:0{width}d}.png")
        counters: dict[str, int] = {}
        for img, mask, kind in zip(data.test_images, data.test_masks, data.test_kinds):
            k = counters.get(kind, 0)
            counters[kind] = k + 1
            stem = f"{k:0{width}d}"
            (pdir / "test" / kind).mkdir(parents=True, exist_ok=True)
            _save_png(img, pdir / "test" / kind / f"{stem}.png")
            if kind != "good":
                gdir = pdir / "ground_truth" / kind
                gdir.mkdir(parents=True, exist_ok=True)
                _save_png(mask.astype(np.uint8) * 255, gdir / f"{stem}_mask.png")
    return root
