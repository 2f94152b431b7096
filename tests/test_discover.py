"""Product discovery (moleflow.discover): k and purity on generated products with the real (tiny preset)
backbone, small inputs, determinism, errors, and the contact sheet."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import silhouette_score

from moleflow import discover
from moleflow.config import Config
from moleflow.data.synthetic import generate_product
from moleflow.detector import MoleFlow
from moleflow.discover import Discovery, cluster_summary, contact_sheet, discover_products, purity
from moleflow.errors import MoleflowError

# four generated products of different sizes (so that the numbering by size is checked too)
PRODUCTS = {"grass": 24, "coins": 20, "chelsea": 16, "flower": 12}


@pytest.fixture(scope="module")
def products():
    """Features (N, D) of the generated products' images, in an interleaved order, their true names,
    and the images themselves (uint8 (N, 112, 112, 3))."""
    images, truth = [], []
    for name, n in PRODUCTS.items():
        images += list(generate_product(name, n, 0, 0, size=112, seed=0).train_images)
        truth += [name] * n
    order = np.random.default_rng(0).permutation(len(images))  # not grouped by product
    images = [images[i] for i in order]
    truth = np.array([truth[i] for i in order])
    model = MoleFlow(Config.from_preset("tiny"))
    _, routing = model.extract([Image.fromarray(a) for a in images])
    feats = routing.numpy()
    assert feats.shape == (len(images), model.extractor.embed_dim)
    return feats, truth, images


def _subset(products, names):
    feats, truth, _ = products
    idx = np.flatnonzero(np.isin(truth, names))
    return feats[idx], truth[idx]


def _blobs(sizes, dim=16, spread=0.05, seed=0):
    """Well separated clusters of the given sizes in different directions (positive coordinates)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 1, (len(sizes), dim)) ** 4 * 5 + np.eye(len(sizes), dim) * 5
    x = np.concatenate([c + spread * rng.standard_normal((n, dim)) for c, n in zip(centres, sizes)])
    return x, np.repeat(np.arange(len(sizes)), sizes)


# ------------------------------------------------------------------------------ generated products


def test_four_products_found_and_numbered_by_size(products):
    feats, truth, _ = products
    found = discover_products(feats)
    assert isinstance(found, Discovery)
    assert found.k == 4
    assert purity(found.labels, truth) >= 0.99
    assert found.labels.dtype == np.int64 and found.labels.shape == (len(truth),)
    assert found.sizes == sorted(PRODUCTS.values(), reverse=True)
    # largest product is 0, then by size
    for rank, name in enumerate(PRODUCTS):
        assert set(found.labels[truth == name]) == {rank}
    # the criterion: every k tried, k=1 scored at the bar, the chosen k scores highest among the valid
    assert set(found.criterion) == set(range(1, 11))
    assert found.criterion[1] == discover.SILHOUETTE_MIN
    assert found.criterion[4] == max(v for v in found.criterion.values() if v == v)
    assert found.separation[4] >= discover.PAIR_SILHOUETTE_MIN
    assert "silhouette" in found.method


@pytest.mark.parametrize("r", [2, 3])
def test_subsets_of_products(products, r):
    for names in itertools.combinations(PRODUCTS, r):
        feats, truth = _subset(products, list(names))
        found = discover_products(feats)
        assert found.k == r, names
        assert purity(found.labels, truth) >= 0.99, names


@pytest.mark.parametrize("name", list(PRODUCTS))
def test_one_product_gives_k1(products, name):
    feats, _ = _subset(products, [name])
    found = discover_products(feats)
    assert found.k == 1
    assert (found.labels == 0).all()
    assert max(v for k, v in found.criterion.items() if k > 1) < discover.SILHOUETTE_MIN


def test_deterministic(products):
    feats, truth, _ = products
    a, b = discover_products(feats, seed=3), discover_products(feats, seed=3)
    assert np.array_equal(a.labels, b.labels) and a.k == b.k
    assert a.criterion == pytest.approx(b.criterion, nan_ok=True)
    c = discover_products(feats, seed=1)  # another seed: the same answer on clear data
    assert c.k == 4 and np.array_equal(a.labels, c.labels)


def test_max_products_caps_k(products):
    feats, truth, _ = products
    assert discover_products(feats, max_products=1).k == 1
    assert set(discover_products(feats, max_products=1).criterion) == {1}
    found = discover_products(feats, max_products=2)
    assert found.k <= 2 and set(found.criterion) <= {1, 2}


def test_small_inputs(products):
    feats, truth, _ = products
    grass = feats[truth == "grass"]
    coins = feats[truth == "coins"]
    for n in (2, 3):  # fewer than 2 images per product for k=2: only k=1 is possible
        found = discover_products(grass[:n])
        assert found.k == 1 and found.criterion == {1: discover.SILHOUETTE_MIN} and len(found.labels) == n
    assert discover_products(grass[:5]).k == 1
    found = discover_products(np.concatenate([grass[:2], coins[:3]]))
    assert found.k == 2 and found.labels.tolist() == [1, 1, 0, 0, 0]  # the larger product is 0
    found = discover_products(np.concatenate([grass[:3], coins[:3]]))  # a tie in size: first image's product is 0
    assert found.labels.tolist() == [0, 0, 0, 1, 1, 1]


# ------------------------------------------------------------------------------ constructed features


def test_blobs_and_tie_numbering():
    x, truth = _blobs([10, 10, 10])
    found = discover_products(x[::-1])  # the last blob comes first: it becomes product 0
    assert found.k == 3
    assert found.labels.tolist() == [0] * 10 + [1] * 10 + [2] * 10


def test_silhouette_sampling_for_large_inputs(monkeypatch):
    x, truth = _blobs([120, 80, 40], seed=1)
    monkeypatch.setattr(discover, "SILHOUETTE_SAMPLE", 60)
    found = discover_products(x)
    assert found.k == 3 and purity(found.labels, truth) == 1.0


def test_duplicates_and_degenerate_features():
    same = np.ones((8, 5))
    assert discover_products(same).k == 1  # identical images: one product, no crash
    assert discover_products(np.zeros((6, 5))).k == 1  # all-zero features
    two = np.repeat(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), [4, 3], axis=0)
    found = discover_products(two)
    assert found.k == 2 and found.labels.tolist() == [0] * 4 + [1] * 3
    assert np.isnan(found.criterion[3])  # k-means cannot find 3 distinct clusters among 2 distinct points


def test_silhouettes_match_scikit_learn():
    x, _ = _blobs([7, 9, 5], spread=0.6, seed=2)
    from sklearn.metrics import pairwise_distances

    z = discover._unit(x)
    labels = np.array([0] * 7 + [1] * 9 + [2] * 5)
    labels[[0, 8]] = labels[[8, 0]]  # not a perfect partition
    dist = pairwise_distances(z)
    overall, pair = discover._silhouettes(dist, labels, 3)
    assert overall == pytest.approx(silhouette_score(z, labels))
    pairs = []
    for i, j in itertools.combinations(range(3), 2):
        sel = np.isin(labels, [i, j])
        pairs.append(silhouette_score(z[sel], labels[sel]))
    assert pair == pytest.approx(min(pairs))


@pytest.mark.parametrize("bad", [np.zeros((1, 4)), np.zeros((0, 4)), np.zeros(5), np.zeros((3, 2, 2)),
                                 np.array([[1.0, np.nan], [1.0, 2.0], [0.0, 1.0]]), [["a", "b"], ["c", "d"]]])
def test_bad_features(bad):
    with pytest.raises(MoleflowError):
        discover_products(bad)


def test_fewer_than_two_images_message():
    with pytest.raises(MoleflowError, match="at least 2 images"):
        discover_products(np.zeros((1, 8)))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3", None])
def test_bad_max_products(bad):
    with pytest.raises(MoleflowError, match="max_products"):
        discover_products(np.random.default_rng(0).random((6, 4)), max_products=bad)


# ------------------------------------------------------------------------------ reporting


def test_purity():
    assert purity(np.array([0, 0, 1, 1]), ["a", "a", "b", "b"]) == 1.0
    assert purity(np.array([0, 0, 0, 1]), ["a", "a", "b", "b"]) == 0.75
    assert purity(np.array([0, 0, 0, 0]), ["a", "a", "b", "b"]) == 0.5
    with pytest.raises(MoleflowError):
        purity(np.array([0, 1]), ["a"])


def test_cluster_summary():
    x, _ = _blobs([3, 5])
    found = discover_products(x)
    names = [f"img{i}.png" for i in range(8)]
    summary = cluster_summary(found, names)
    assert [s["product"] for s in summary] == [0, 1]
    assert [s["size"] for s in summary] == [5, 3]
    assert summary[0]["members"] == names[3:] and summary[1]["members"] == names[:3]
    assert summary[0]["fraction"] == pytest.approx(5 / 8)
    with pytest.raises(MoleflowError):
        cluster_summary(found, names[:3])


# ------------------------------------------------------------------------------ contact sheet


def test_contact_sheet(tmp_path, products):
    _, _, images = products
    files = []
    for i in range(3):
        files.append(tmp_path / f"in{i}.png")
        Image.fromarray(images[i]).save(files[-1])
    wide = Image.new("L", (200, 50), 255)  # elongated, grey: kept in aspect, padded
    tall = Image.new("RGB", (30, 90), (255, 0, 0))
    pil = [Image.fromarray(a) for a in images[3:9]]
    out = contact_sheet([*files, wide, tall, *pil], tmp_path / "sheets" / "p0.png", columns=4, thumb=40)
    assert out == tmp_path / "sheets" / "p0.png"
    assert sorted(p.name for p in out.parent.iterdir()) == ["p0.png"]  # no temporary file left
    with Image.open(out) as sheet:
        assert sheet.format == "PNG" and sheet.mode == "RGB"
        assert sheet.size == (4 * 40, 3 * 40)  # 11 images, 4 columns -> 3 rows
        px = np.asarray(sheet)
    # tile 3 (row 0, column 3): the wide white image, 36 px wide, 9 px high, centred
    tile = px[0:40, 120:160]
    assert (tile[20, 5:35] == 255).all() and (tile[5, 20] < 100).all()
    # tile 4 (row 1, column 0): the tall red image, 12 px wide, 36 px high
    tile = px[40:80, 0:40]
    assert tuple(tile[20, 20]) == (255, 0, 0) and tuple(tile[20, 5]) != (255, 0, 0)
    # fewer images than columns: one row of that many
    out = contact_sheet(files[:2], tmp_path / "two.png", columns=8, thumb=32)
    with Image.open(out) as sheet:
        assert sheet.size == (64, 32)


def test_contact_sheet_errors(tmp_path):
    img = Image.new("RGB", (10, 10))
    with pytest.raises(MoleflowError):
        contact_sheet([], tmp_path / "a.png")
    with pytest.raises(MoleflowError):
        contact_sheet([img], tmp_path / "a.png", columns=0)
    with pytest.raises(MoleflowError):
        contact_sheet([img], tmp_path / "a.png", thumb=4)
    with pytest.raises(MoleflowError, match="missing.png"):
        contact_sheet([tmp_path / "missing.png"], tmp_path / "a.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(MoleflowError, match="junk.png"):
        contact_sheet([tmp_path / "junk.png"], tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()
