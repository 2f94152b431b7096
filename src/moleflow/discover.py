"""Product discovery: split an unlabelled folder of good images of several products into products.

    feats = model.image_features(paths).numpy()      # (N, D): one routing feature vector per image
    found = discover_products(feats)                  # found.labels (N,), found.k, found.criterion
    contact_sheet([p for p, c in zip(paths, found.labels) if c == 0], "product0.png")

Method
------
Each image's routing feature (the coordinate-wise median of the backbone's patch tokens; with tiling,
the mean over the image's tiles) is scaled to unit length, so distances are cosine distances measured
from the backbone's own origin (changes that only scale a feature do not count). k-means
(scikit-learn, `n_init=10`, seeded) splits the images into k = 2 .. `max_products` clusters, never
more than N // 2 (a product needs at least 2 images). A partition is *valid* when

  * every cluster has at least 2 images (a lone odd image stays in its nearest product),
  * its mean silhouette is at least `SILHOUETTE_MIN` = 0.47: one product with some inner variety must
    stay one product, so k = 1 is the answer unless some valid partition clears this bar, and
  * every pair of its clusters, taken alone, has a silhouette of at least `PAIR_SILHOUETTE_MIN` = 0.37
    (a product with two looks, in a pool of very different products, is not cut in two just because
    that raises the pool's average a little).

The valid partition with the highest mean silhouette wins; without one, k = 1. `Discovery.criterion`
holds the mean silhouette of every k tried (criterion[1] is the bar `SILHOUETTE_MIN`, so k is the
valid k with the highest criterion) and `Discovery.separation` the smallest pair silhouette.

Why this method (measured; the scripts are not part of the package)
--------------------------------------------------------------------
Features: the `tiny` preset (D = 32) and the `cpu` preset (D = 152) on 40 (and 15) generated images
of each of the 15 `moleflow.data.synthetic` products, 75 cases per setting (each product alone, and 10
random pools each of 2, 3, 4, 5, 6 and 8 products); and the `cpu` preset on the training images of 4
real products (magnetic_tile 666, kolektor 260, pcb_deeppcb 400, cubes 80): each alone, every pair,
every triple and all 4 (15 cases). A case is right when k is the true number of products and purity
is >= 0.99.

  * Gaussian mixture on standardised + PCA features, k by BIC (full / diagonal / tied / spherical
    covariance, 8-32 components): diagonal covariance on 16 components was right in 37/40 synthetic
    cases, but on the real products BIC kept splitting every product (0-1/15 right; k = 3-10 for a
    single product): with hundreds of images per product the real distributions are not Gaussian and
    the likelihood keeps paying for more components. Full covariance over-split even the synthetic ones.
  * Gaussian mixture, k by 2-fold held-out log-likelihood: the same over-splitting on real data (0/15).
  * Gap statistic (k-means, uniform reference in the PCA box): 0/15 real, 14-19/39 synthetic.
  * k-means + silhouette on standardised (+ PCA) features with a bar for k = 1: no bar works: single
    real products reach 0.46 (cubes: four cube colours) while a pair of real products can score 0.42.
  * k-means + silhouette on unit-length features (this module): single products stay below 0.44
    (real) and 0.41 (synthetic), pools of products score at least 0.52, and the best k was the true
    one in every real pool. Silhouette bar alone: 15/15 real, 75/75 `cpu`, 68/75 and 63/75 `tiny`
    (40 / 15 images per product; mostly the `tissue` product split in pools). With the pair rule too:
    15/15 real (also with tiled features), 75/75 `cpu`, 74/75 `tiny` at 40 and at 15 images per
    product (the miss: moon + camera, two grey pictures, merge in the 32-dimensional tiny features);
    the same for k-means seeds 0-4; purity 1.000 whenever k was right. Right for SILHOUETTE_MIN in
    0.44-0.50 and PAIR_SILHOUETTE_MIN in 0.36-0.40; the values chosen are the middle. Removing the
    mean before normalising broke the real pools: the backbone's origin matters. With `n_init=4` one
    product (hubble, `cpu`) was split for one seed: a poor k-means optimum that cut off 4 images;
    `n_init=10` fixed it for every seed tried.
  * Held-out check (not used to choose anything): new generated images (generator seed 7, 30 per
    product, 105 new pools): 105/105 `cpu`, 103/105 `tiny`. Random subsets of the real products,
    5 draws of every subset: 75/75 with 5 or 40 images per product, 72/75 with 10 and 71/75 with 20
    (a single kolektor or pcb_deeppcb split in 2, one cubes in 6; one pool with one image misplaced).

Limits: the bars were measured with EfficientNet-Lite0 features (the `tiny` and `cpu` presets); other
backbones (`main`: WRN50) were not measured and may need other bars. A product made of visibly
different variants (the 4 cube colours) stays one product, alone (its silhouette 0.44 is under the
bar) and pooled, but a product with more distinct variants can be split, more so with few images.
Distinct products that look alike to the backbone can be merged. Always look at the contact sheets.

Cost: k-means (one thread: scikit-learn's threads made it 30x slower on a busy 2-core machine) and
one N x N distance matrix (N <= 4000; above, the silhouettes are estimated on a seeded sample of
4000 images). 1406 images, D = 152: 0.9 s; 3000 x 1024: 4 s; 6000 x 1024: 13 s (2 cores).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .errors import MoleflowError

SILHOUETTE_MIN = 0.47  # mean silhouette a partition needs to claim more than one product
PAIR_SILHOUETTE_MIN = 0.37  # silhouette every pair of found products needs, taken alone
MIN_CLUSTER = 2  # images a product needs
SILHOUETTE_SAMPLE = 4000  # silhouettes on at most this many images (seeded sample above it)
KMEANS_INIT = 10


@dataclass
class Discovery:
    """The products found in N images.

    labels: (N,) int64 product of each image, 0..k-1, numbered by size (largest = 0; ties: the product
        holding the earliest image first).
    k: number of products found.
    criterion: {k: mean silhouette} of the k-means partition for every k tried (k >= 2), in the cosine
        geometry of unit-length features; higher is better; criterion[1] is the bar `SILHOUETTE_MIN` a
        partition must reach to beat "one product". The chosen k is the valid k with the highest value.
        NaN (here and in `separation`): the partition was not valid because some cluster had < 2 images
        or k-means found fewer than k distinct clusters (duplicate images).
    method: short human description of the method.
    separation: {k: smallest silhouette of any pair of clusters, taken alone} for every k >= 2 tried;
        higher is better; a partition needs `PAIR_SILHOUETTE_MIN`.
    """

    labels: np.ndarray
    k: int
    criterion: dict[int, float]
    method: str
    separation: dict[int, float] = field(default_factory=dict)

    @property
    def sizes(self) -> list[int]:
        """Images per product, (k,), largest first."""
        return np.bincount(self.labels, minlength=self.k).tolist()


def _check_features(features: Any) -> np.ndarray:
    try:
        x = np.asarray(features, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MoleflowError(f"features: expected an (N, D) array of numbers ({exc})") from None
    if x.ndim != 2 or x.shape[1] < 1:
        raise MoleflowError(f"features: expected an (N, D) array, one row per image; got shape {x.shape}")
    if len(x) < 2:
        raise MoleflowError(f"product discovery needs at least 2 images; got {len(x)}")
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(1))
        raise MoleflowError(f"features: rows {bad[:5].tolist()} hold NaN or infinite values")
    return x


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def _number_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters 0..k-1 by size (largest first), ties by the earliest image."""
    ids, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))  # primary: size descending, then first index
    new = np.empty(ids.max() + 1, np.int64)
    new[ids[order]] = np.arange(len(ids))
    return new[labels]


def _silhouettes(dist: np.ndarray, labels: np.ndarray, k: int) -> tuple[float, float]:
    """Mean silhouette of `labels` (n,) given distances (n, n), and the smallest mean silhouette of any
    pair of clusters taken alone (the silhouette of their points with only those two clusters)."""
    onehot = np.zeros((len(labels), k))
    onehot[np.arange(len(labels)), labels] = 1.0
    counts = onehot.sum(0)
    sums = dist @ onehot  # (n, k): summed distance of each point to each cluster
    own = counts[labels]
    a = sums[np.arange(len(labels)), labels] / np.maximum(own - 1, 1)  # self-distance is 0
    mean_to = sums / np.maximum(counts, 1)  # (n, k)

    def sil(b: np.ndarray, a_: np.ndarray, own_: np.ndarray) -> np.ndarray:
        top = np.maximum(a_, b)
        s = np.divide(b - a_, top, out=np.zeros_like(b), where=top > 0)
        return np.where(own_ > 1, s, 0.0)  # a point alone in its cluster scores 0 (as scikit-learn)

    other = mean_to.copy()
    other[np.arange(len(labels)), labels] = np.inf
    overall = float(sil(other.min(1), a, own).mean())
    pair = math.inf
    for i in range(k):
        for j in range(i + 1, k):
            mi, mj = labels == i, labels == j
            s_i = sil(mean_to[mi, j], a[mi], own[mi])
            s_j = sil(mean_to[mj, i], a[mj], own[mj])
            pair = min(pair, float((s_i.sum() + s_j.sum()) / (mi.sum() + mj.sum())))
    return overall, pair


def discover_products(features: np.ndarray, max_products: int = 10, seed: int = 0) -> Discovery:
    """Split N images into products by their routing features.

    features: (N, D) float, N >= 2: one routing feature vector per image (the router's coordinate-wise
        median of the backbone's patch tokens; with tiling, the mean over the image's tiles: see
        `MoleFlow.image_features`). Only these features are used (no labels).
    max_products: the most products to consider (>= 1); at most N // 2 are tried (a product needs 2 images).
    seed: k-means initialisation and silhouette sampling; the same inputs and seed give the same result.

    Returns a `Discovery`: labels (N,) int64 in 0..k-1, largest product 0. See the module docstring for
    the method and its measurements. Raises `MoleflowError` for N < 2, a bad `max_products` or features
    that are not a finite (N, D) array.
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import pairwise_distances
    from threadpoolctl import threadpool_limits

    x = _check_features(features)
    if isinstance(max_products, bool) or not isinstance(max_products, (int, np.integer)) or max_products < 1:
        raise MoleflowError(f"max_products={max_products!r}: must be a whole number >= 1")
    n = len(x)
    method = (f"k-means on unit-length features, k by silhouette (>= {SILHOUETTE_MIN}, "
              f"every pair >= {PAIR_SILHOUETTE_MIN}, >= {MIN_CLUSTER} images each)")
    criterion: dict[int, float] = {1: SILHOUETTE_MIN}
    separation: dict[int, float] = {}
    k_max = min(int(max_products), n // MIN_CLUSTER)
    best_k, best_labels, best_score = 1, np.zeros(n, np.int64), -math.inf
    if k_max >= 2:
        z = _unit(x)
        rng = np.random.default_rng(seed)
        sample = np.arange(n)
        if n > SILHOUETTE_SAMPLE:
            sample = np.sort(rng.choice(n, SILHOUETTE_SAMPLE, replace=False))
        dist = pairwise_distances(z[sample])
        for k in range(2, k_max + 1):
            # one thread: on a busy machine scikit-learn's OpenMP/BLAS threads made k-means 30x slower
            with threadpool_limits(1), warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)  # duplicate images: fewer distinct clusters
                labels = KMeans(k, n_init=KMEANS_INIT, random_state=seed).fit(z).labels_.astype(np.int64)
            counts = np.bincount(labels, minlength=k)
            sampled = np.bincount(labels[sample], minlength=k)
            if counts.min() < MIN_CLUSTER or sampled.min() < 1:
                # too small a cluster, or k-means found fewer than k distinct clusters (duplicate images)
                criterion[k], separation[k] = (float("nan"),) * 2
                continue
            overall, pair = _silhouettes(dist, labels[sample], k)
            criterion[k], separation[k] = overall, pair
            if overall >= SILHOUETTE_MIN and pair >= PAIR_SILHOUETTE_MIN and overall > best_score:
                best_k, best_labels, best_score = k, labels, overall
    return Discovery(_number_by_size(best_labels), best_k, criterion, method, separation)


def purity(labels: np.ndarray, truth: Sequence) -> float:
    """Fraction of images whose cluster's most common true label is their own. labels (N,) ints,
    truth (N,) any hashable labels. For reporting on labelled data only."""
    labels = np.asarray(labels)
    truth = list(truth)
    if labels.ndim != 1 or len(labels) != len(truth):
        raise MoleflowError(f"purity: labels {labels.shape} and truth ({len(truth)} labels) must be two "
                            "lists of one length")
    if not len(truth):
        raise MoleflowError("purity: no images")
    right = 0
    for c in np.unique(labels):
        members = [t for t, l in zip(truth, labels) if l == c]
        right += max(members.count(t) for t in dict.fromkeys(members))
    return right / len(truth)


def cluster_summary(discovery: Discovery, names: Sequence[str]) -> list[dict[str, Any]]:
    """One dict per product, in label order: {"product": c, "size": n, "fraction": n / N,
    "members": [names of its images, in input order], "examples": the first 8 of them}.
    names (N,): one name (e.g. a file path) per image, as given to `discover_products`."""
    names = [str(n) for n in names]
    if len(names) != len(discovery.labels):
        raise MoleflowError(f"cluster_summary: {len(names)} names for {len(discovery.labels)} images")
    out = []
    for c in range(discovery.k):
        members = [nm for nm, l in zip(names, discovery.labels) if l == c]
        out.append({"product": c, "size": len(members), "fraction": len(members) / len(names),
                    "members": members, "examples": members[:8]})
    return out


def _thumbnail(image: str | Path | Image.Image, size: int) -> Image.Image:
    from .data.transforms import load_rgb, to_rgb8

    if isinstance(image, Image.Image):
        img = to_rgb8(image)
    elif isinstance(image, (str, Path)):
        img = load_rgb(image)
    else:
        raise MoleflowError(f"contact_sheet: expected image paths or PIL images, got {type(image).__name__}")
    img = img.copy()
    img.thumbnail((size, size), Image.Resampling.LANCZOS)  # keeps the aspect ratio, never enlarges
    if max(img.size) < size:  # small images are enlarged to fill the tile
        f = size / max(img.size)
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.LANCZOS)
    return img


def contact_sheet(images: Sequence[str | Path | Image.Image], path: str | Path, columns: int = 8,
                  thumb: int = 96) -> Path:
    """A PNG grid of thumbnails of `images` (aspect kept, centred and padded on dark grey), written
    atomically to `path`; returns path.

    The sheet is (rows * thumb) x (cols * thumb) pixels (height x width) with cols = min(columns, n) and
    rows = ceil(n / cols), images row by row; each picture fits in thumb - 4 pixels, leaving a 2-pixel
    border. Raises `MoleflowError` for no images, columns < 1, thumb < 8 or an unreadable image."""
    from .store.atomic import atomic_write_bytes

    images = list(images)
    if not images:
        raise MoleflowError("contact_sheet: no images")
    if isinstance(columns, bool) or not isinstance(columns, (int, np.integer)) or columns < 1:
        raise MoleflowError(f"contact_sheet: columns={columns!r} must be a whole number >= 1")
    if isinstance(thumb, bool) or not isinstance(thumb, (int, np.integer)) or thumb < 8:
        raise MoleflowError(f"contact_sheet: thumb={thumb!r} must be a whole number >= 8")
    cols = min(int(columns), len(images))
    rows = math.ceil(len(images) / cols)
    thumb, pad = int(thumb), 2
    sheet = Image.new("RGB", (cols * thumb, rows * thumb), (40, 40, 40))
    for i, image in enumerate(images):
        t = _thumbnail(image, thumb - 2 * pad)
        r, c = divmod(i, cols)
        sheet.paste(t, (c * thumb + (thumb - t.width) // 2, r * thumb + (thumb - t.height) // 2))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=False)
    data = buf.getvalue()
    return atomic_write_bytes(Path(path), lambda fh: fh.write(data))


SHEET_IMAGES = 24  # sample images on a found product's contact sheet


def split_products(model: Any, images: Sequence[str | Path | Image.Image], out_dir: str | Path | None,
                   prefix: str = "product-", max_products: int = 10, seed: int = 0
                   ) -> tuple[dict[str, list], np.ndarray, dict[str, Any]]:
    """Split unnamed good images of one or more products into products for `MoleFlow.fit_step`.

    Routing features from `model.image_features` (the router's own), `discover_products` on them, and per
    product found a contact sheet of up to `SHEET_IMAGES` evenly spaced samples in `out_dir` (skipped when
    None). Returns ({"<prefix>1": images, ...} largest first, labels (N,), a JSON-able summary)."""
    images = list(images)
    features = model.image_features(images).numpy()
    found = discover_products(features, max_products=max_products, seed=seed)
    names = [f"{prefix}{i + 1}" for i in range(found.k)]
    groups = {name: [images[j] for j in np.flatnonzero(found.labels == i)] for i, name in enumerate(names)}
    clusters = []
    for name, members in groups.items():
        entry: dict[str, Any] = {"name": name, "n": len(members)}
        if out_dir is not None:
            picks = np.unique(np.linspace(0, len(members) - 1, min(SHEET_IMAGES, len(members))).round().astype(int))
            entry["sheet"] = str(contact_sheet([members[i] for i in picks], Path(out_dir) / f"{name}.png"))
        clusters.append(entry)
    summary = {"k": found.k, "method": found.method, "n_images": len(images), "clusters": clusters,
               "criterion": {str(k): (None if v != v else v) for k, v in found.criterion.items()},
               "separation": {str(k): (None if v != v else v) for k, v in found.separation.items()}}
    return groups, found.labels, summary
