"""Tests of the data layer: folder/VisA loading, validation errors, the lazy dataset and the
synthetic product generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moleflow.data import (
    MPDD_CLASSES,
    MVTEC_CLASSES,
    VISA_CLASSES,
    ImageDataset,
    ImageTransform,
    MaskDataset,
    default_classes,
    list_classes,
    load_class,
    load_images,
    load_masks,
    load_mvtec_layout,
    load_visa,
)
from moleflow.data.synthetic import (
    AREA_RANGE,
    DEFECT_KINDS,
    PRODUCTS,
    apply_defect,
    generate_product,
    write_mvtec_layout,
)
from moleflow.errors import MoleflowError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


# --------------------------------------------------------------------------------------- helpers


def _img(path: Path, size=(40, 40), mode="RGB", value=128, seed=0) -> Path:
    """Write a small noisy image; `size` is (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    shape = (h, w) if mode == "L" else (h, w, 3)
    arr = np.clip(value + rng.integers(-20, 20, shape), 0, 255).astype(np.uint8)
    Image.fromarray(arr, mode if mode == "L" else None).save(path)
    return path


def _mask(path: Path, size=(40, 40), box=(5, 5, 15, 15)) -> Path:
    """Write a 0/255 mask with a filled box (x0, y0, x1, y1, exclusive ends)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = 255
    Image.fromarray(arr).save(path)
    return path


def _make_class(root: Path, name: str, n_train=3, tests=None, masks=True, size=(40, 40)) -> Path:
    """A hand-made MVTec-layout class; `tests` maps defect type -> count."""
    tests = {"good": 2, "crack": 2} if tests is None else tests
    cdir = root / name
    for i in range(n_train):
        _img(cdir / "train" / "good" / f"{i:03d}.png", size, seed=i)
    for kind, n in tests.items():
        (cdir / "test" / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _img(cdir / "test" / kind / f"{i:03d}.png", size, seed=100 + i)
            if masks and kind != "good":
                _mask(cdir / "ground_truth" / kind / f"{i:03d}_mask.png", size)
    return cdir


def _raises(match_path, fn, *args, **kwargs) -> str:
    with pytest.raises(MoleflowError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert str(match_path) in msg, msg
    assert "\n" not in msg
    return msg


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    return write_mvtec_layout(root, ["brick", "coins"], n_train=5, n_test_good=3, n_test_defect=4, size=48,
                              seed=3, defect_kinds=("scratch", "hole"))


# --------------------------------------------------------------------------------------- folder layout


def test_generated_tree_loads(synth_root):
    assert list_classes(synth_root, "folder") == ["brick", "coins"]
    assert default_classes("folder", synth_root) == ["brick", "coins"]
    split = load_class(synth_root, "brick", "folder")
    assert split.class_name == "brick" and split.has_masks
    assert len(split.train) == 5 and all(s.label == 0 and s.split == "train" for s in split.train)
    assert [s.image.name for s in split.train] == [f"{i:03d}.png" for i in range(5)]
    assert len(split.test) == 7
    assert sorted(s.defect_type for s in split.test) == ["good"] * 3 + ["hole"] * 2 + ["scratch"] * 2
    for s in split.test:
        assert s.split == "test" and s.class_name == "brick"
        if s.defect_type == "good":
            assert s.label == 0 and s.mask is None
        else:
            assert s.label == 1
            assert s.mask == synth_root / "brick" / "ground_truth" / s.defect_type / f"{s.image.stem}_mask.png"

    # files on disk equal the in-memory generation; masks pair with their images
    data = generate_product("brick", 5, 3, 4, size=48, seed=3, defect_kinds=("scratch", "hole"))
    tf = ImageTransform(48)
    by_kind = {k: [i for i, kk in enumerate(data.test_kinds) if kk == k] for k in ("good", "scratch", "hole")}
    masks = load_masks(split.test, tf)
    for s, m in zip(split.test, masks):
        j = by_kind[s.defect_type][int(s.image.stem)]
        assert np.array_equal(np.asarray(Image.open(s.image)), data.test_images[j])
        assert np.array_equal(m.numpy(), data.test_masks[j])
        assert bool(m.any()) == (s.label == 1)

    ds = ImageDataset(split.test, ImageTransform(32))
    assert len(ds) == 7
    item = ds[3]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (32, 32) and item["mask"].dtype == torch.bool
    assert item["index"] == 3 and item["label"] == split.test[3].label
    assert load_images(split.train, ImageTransform(32)).shape == (5, 3, 32, 32)


def test_builtin_class_lists():
    assert default_classes("mvtec") == list(MVTEC_CLASSES) == sorted(MVTEC_CLASSES)
    assert len(MVTEC_CLASSES) == 15 and len(VISA_CLASSES) == 12 and len(MPDD_CLASSES) == 6
    assert default_classes("visa")[0] == "candle" and default_classes("mpdd")[-1] == "tubes"


def test_class_without_ground_truth(tmp_path):
    _make_class(tmp_path, "cube", tests={"good": 2, "defect": 3}, masks=False)
    split = load_class(tmp_path, "cube", "folder")
    assert not split.has_masks
    assert [s.label for s in split.test] == [1, 1, 1, 0, 0]  # sorted by folder: defect, good
    assert all(s.mask is None for s in split.test)
    item = ImageDataset(split.test, ImageTransform(16))[0]
    assert item["label"] == 1 and not item["mask"].any()


def test_extensions_hidden_files_and_sorting(tmp_path):
    cdir = _make_class(tmp_path, "part", n_train=0, tests={"good": 1}, masks=False)
    _img(cdir / "train" / "good" / "b.JPG")
    _img(cdir / "train" / "good" / "a.tiff")
    _img(cdir / "train" / "good" / "c.bmp")
    _img(cdir / "train" / "good" / "._d.png")  # macOS resource fork: skipped
    (cdir / "train" / "good" / "notes.txt").write_text("x")
    split = load_mvtec_layout(tmp_path, "part")
    assert [s.image.name for s in split.train] == ["a.tiff", "b.JPG", "c.bmp"]


def test_grey_image_becomes_three_channels(tmp_path):
    cdir = _make_class(tmp_path, "grey", n_train=0, tests={"good": 1}, masks=False)
    _img(cdir / "train" / "good" / "000.png", (30, 30), mode="L", value=90)
    split = load_class(tmp_path, "grey", "folder")
    x = ImageDataset(split.train, ImageTransform(24))[0]["image"]
    assert x.shape == (3, 24, 24)
    raw = x * ImageTransform(24).std + ImageTransform(24).mean  # undo normalisation: channels are equal
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[1], raw[2], atol=1e-5)


def test_non_square_image_and_mask_follow_geometry(tmp_path):
    size = (60, 150)  # width 60, height 150: tall
    cdir = _make_class(tmp_path, "tall", n_train=1, tests={"defect": 1}, masks=False, size=size)
    _mask(cdir / "ground_truth" / "defect" / "000_mask.png", size, box=(0, 130, 60, 150))  # bottom block
    split = load_class(tmp_path, "tall", "folder")
    sample = split.test[0]
    item = ImageDataset([sample], ImageTransform(30, "squash"))[0]
    assert item["image"].shape == (3, 30, 30)
    m = item["mask"]
    assert m[-1].all() and m[-2].all() and not m[:20].any()  # still there, at the bottom
    assert abs(int(m.sum()) - 30 * 30 * 20 / 150) <= 30
    cropped = ImageDataset([sample], ImageTransform(30, "resize_crop"))[0]
    assert cropped["image"].shape == (3, 30, 30) and not cropped["mask"].any()  # cut away
    boxed = ImageDataset([sample], ImageTransform(30, "letterbox"))[0]
    assert boxed["mask"].any() and not boxed["mask"][:, :8].any()  # padded sides are normal


# --------------------------------------------------------------------------------------- errors


def test_missing_root(tmp_path):
    _raises(tmp_path / "nope", load_class, tmp_path / "nope", "a", "folder")
    _raises(tmp_path / "nope", list_classes, tmp_path / "nope", "folder")


def test_missing_class_lists_existing(tmp_path):
    _make_class(tmp_path, "alpha")
    _make_class(tmp_path, "beta")
    msg = _raises(tmp_path / "gamma", load_class, tmp_path, "gamma", "mvtec")
    assert "alpha, beta" in msg


def test_no_train_images(tmp_path):
    cdir = _make_class(tmp_path, "empty", n_train=0)
    _raises(cdir / "train" / "good", load_class, tmp_path, "empty", "folder")
    (tmp_path / "bare").mkdir()  # no train folder at all
    _raises(tmp_path / "bare" / "train" / "good", load_class, tmp_path, "bare", "folder")


def test_empty_test_folder(tmp_path):
    cdir = _make_class(tmp_path, "notest", tests={"good": 0, "crack": 0})
    _raises(cdir / "test", load_class, tmp_path, "notest", "folder")
    cdir2 = _make_class(tmp_path, "notestdir", tests={})
    _raises(cdir2 / "test", load_class, tmp_path, "notestdir", "folder")


def test_corrupt_image(tmp_path):
    cdir = _make_class(tmp_path, "bad")
    bad = cdir / "test" / "good" / "000.png"
    bad.write_bytes(b"this is not a png at all" * 10)
    split = load_class(tmp_path, "bad", "folder")  # listing does not decode
    idx = [s.image for s in split.test].index(bad)
    ds = ImageDataset(split.test, ImageTransform(16))
    _raises(bad, ds.__getitem__, idx)
    _raises(bad, load_images, split.test, ImageTransform(16))


def test_mask_size_mismatch(tmp_path):
    cdir = _make_class(tmp_path, "mis", tests={"crack": 1})
    wrong = _mask(cdir / "ground_truth" / "crack" / "000_mask.png", (41, 40))
    split = load_class(tmp_path, "mis", "folder")
    msg = _raises(wrong, ImageDataset(split.test, ImageTransform(16)).__getitem__, 0)
    assert str(cdir / "test" / "crack" / "000.png") in msg
    _raises(wrong, load_masks, split.test, ImageTransform(16))
    _raises(wrong, MaskDataset(split.test, ImageTransform(16)).__getitem__, 0)


def test_mask_dataset_reads_masks_without_decoding_images(tmp_path):
    """Under tiling the evaluation reads the masks alone (the model decodes each image itself): the masks
    and labels equal the image dataset's, and an image whose pixel data is cut off (header intact) is not
    decoded here."""
    _make_class(tmp_path, "cut", tests={"good": 1, "crack": 2})
    split = load_class(tmp_path, "cut", "folder")
    transform = ImageTransform(16)
    full, masks = ImageDataset(split.test, transform), MaskDataset(split.test, transform)
    for i in range(len(split.test)):
        assert torch.equal(full[i]["mask"], masks[i]["mask"])
        assert (full[i]["label"], full[i]["index"]) == (masks[i]["label"], masks[i]["index"])
        assert "image" not in masks[i]
    assert masks[[s.label for s in split.test].index(1)]["mask"].any()
    cut = split.test[0].image
    cut.write_bytes(cut.read_bytes()[:60])  # the header survives, the pixels do not
    assert masks[0]["mask"].shape == (16, 16)
    _raises(cut, full.__getitem__, 0)


def test_missing_mask_error_or_empty(tmp_path):
    cdir = _make_class(tmp_path, "bracket", tests={"good": 1, "bent": 2})
    gone = cdir / "ground_truth" / "bent" / "001_mask.png"
    gone.unlink()
    msg = _raises(gone, load_mvtec_layout, tmp_path, "bracket")
    assert "add the mask or remove the image" in msg
    _raises(gone, load_class, tmp_path, "bracket", "folder")
    for split in (load_mvtec_layout(tmp_path, "bracket", missing_mask="empty"),
                  load_class(tmp_path, "bracket", "mpdd")):
        assert split.has_masks
        s = next(s for s in split.test if s.image.name == "001.png" and s.defect_type == "bent")
        assert s.label == 1 and s.mask is None
        i = split.test.index(s)
        assert not ImageDataset(split.test, ImageTransform(16))[i]["mask"].any()
        assert ImageDataset(split.test, ImageTransform(16))[i - 1]["mask"].any()  # 000 keeps its mask


def test_bad_arguments(tmp_path):
    _make_class(tmp_path, "a")
    with pytest.raises(MoleflowError, match="unknown dataset 'mvtek'"):
        load_class(tmp_path, "a", "mvtek")
    with pytest.raises(MoleflowError, match="unknown dataset"):
        default_classes("imagenet")
    with pytest.raises(MoleflowError, match="missing_mask"):
        load_mvtec_layout(tmp_path, "a", missing_mask="zero")


# --------------------------------------------------------------------------------------- VisA


def _make_visa(root: Path) -> None:
    rows = ["object,split,label,image,mask"]
    for obj in ("pcb1", "candle"):
        base = root / obj / "Data"
        for i in range(3):
            _img(base / "Images" / "Normal" / f"{i:04d}.JPG", seed=i)
            rows.append(f"{obj},{'train' if i < 2 else 'test'},normal,{obj}/Data/Images/Normal/{i:04d}.JPG,")
        for i in range(2):
            _img(base / "Images" / "Anomaly" / f"{i:03d}.JPG", seed=10 + i)
            _mask(base / "Masks" / "Anomaly" / f"{i:03d}.png")
            rows.append(f"{obj},test,anomaly,{obj}/Data/Images/Anomaly/{i:03d}.JPG,{obj}/Data/Masks/Anomaly/{i:03d}.png")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")


def test_visa_csv(tmp_path):
    _make_visa(tmp_path)
    assert list_classes(tmp_path, "visa") == ["pcb1", "candle"]  # first-seen order
    split = load_class(tmp_path, "candle", "visa")
    assert split.has_masks
    assert len(split.train) == 2 and all(s.label == 0 and s.mask is None for s in split.train)
    assert [s.label for s in split.test] == [0, 1, 1]
    assert split.test[0].mask is None and split.test[0].defect_type == "good"
    assert split.test[1].mask == tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / "000.png"
    assert split.test[1].image == tmp_path / "candle" / "Data" / "Images" / "Anomaly" / "000.JPG"
    masks = load_masks(split.test, ImageTransform(20))
    assert not masks[0].any() and masks[1].any() and masks[2].any()
    msg = _raises(tmp_path / "split_csv" / "1cls.csv", load_visa, tmp_path, "cashew")
    assert "pcb1, candle" in msg


def test_visa_missing_csv_and_files(tmp_path):
    (tmp_path / "candle").mkdir()
    msg = _raises(tmp_path / "split_csv" / "1cls.csv", load_class, tmp_path, "candle", "visa")
    assert "VisA needs the official split_csv/1cls.csv" in msg
    _make_visa(tmp_path)
    gone = tmp_path / "pcb1" / "Data" / "Masks" / "Anomaly" / "001.png"
    gone.unlink()
    _raises(gone, load_visa, tmp_path, "pcb1")


# --------------------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic():
    a = generate_product("gravel", 3, 2, 3, size=40, seed=7)
    b = generate_product("gravel", 3, 2, 3, size=40, seed=7)
    for x, y in [(a.train_images, b.train_images), (a.test_images, b.test_images), (a.test_masks, b.test_masks),
                 (a.test_labels, b.test_labels)]:
        assert np.array_equal(x, y)
    assert a.test_kinds == b.test_kinds == ["good", "good", "scratch", "spot", "hole"]
    c = generate_product("gravel", 3, 2, 3, size=40, seed=8)
    assert not np.array_equal(a.train_images, c.train_images)
    # per-image streams: more train images leave the first ones and the test set unchanged
    d = generate_product("gravel", 5, 2, 3, size=40, seed=7)
    assert np.array_equal(d.train_images[:3], a.train_images) and np.array_equal(d.test_images, a.test_images)
    # normal images vary but stay one distribution
    assert a.train_images.dtype == np.uint8 and a.train_images.shape == (3, 40, 40, 3)
    assert not np.array_equal(a.train_images[0], a.train_images[1])


@pytest.mark.parametrize("product", ["brick", "coins"])
def test_synthetic_masks(product):
    kinds = list(DEFECT_KINDS)
    data = generate_product(product, 0, 3, 2 * len(kinds), size=64, seed=1)
    assert data.test_masks.dtype == bool and data.test_masks.shape == (3 + 2 * len(kinds), 64, 64)
    assert list(data.test_labels) == [0] * 3 + [1] * (2 * len(kinds))
    assert data.test_kinds[3:] == kinds * 2
    lo, hi = AREA_RANGE
    for m, y in zip(data.test_masks, data.test_labels):
        if y == 0:
            assert not m.any()
        else:
            assert lo <= m.mean() <= hi, m.mean()


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_synthetic_mask_marks_the_change(kind):
    data = generate_product("grass", 3, 0, 0, size=64, seed=2)
    for i, clean in enumerate(data.train_images):
        bad, mask = apply_defect(clean, kind, np.random.default_rng(i))
        diff = np.abs(bad.astype(np.int16) - clean.astype(np.int16)).max(2)
        assert mask.any() and AREA_RANGE[0] <= mask.mean() <= AREA_RANGE[1]
        inside, outside = diff[mask].mean(), diff[~mask].mean()
        assert inside >= 0.15 * 255 * 0.9, (kind, inside)  # clearly visible
        assert inside > 8 * outside + 5, (kind, inside, outside)
        assert np.mean(diff[~mask] > 40) < 0.005  # almost nothing changes outside the mask
    # deterministic, and severity lowers the contrast
    a = apply_defect(data.train_images[0], kind, np.random.default_rng(5))
    b = apply_defect(data.train_images[0], kind, np.random.default_rng(5))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_synthetic_products_and_errors(tmp_path):
    assert {"brick", "grass", "gravel", "coins", "coffee", "camera"} <= set(PRODUCTS)
    for name in ("coffee", "camera"):
        assert generate_product(name, 1, 0, 1, size=32).test_images.shape == (1, 32, 32, 3)
    with pytest.raises(MoleflowError, match="unknown synthetic product 'bricks'"):
        generate_product("bricks", 1, 1, 1)
    with pytest.raises(MoleflowError, match="unknown defect kind"):
        generate_product("brick", 1, 1, 1, defect_kinds=["dent"])
    # a folder written by the generator is rewritten; someone else's is left alone
    write_mvtec_layout(tmp_path, ["grass"], n_train=3, n_test_good=1, n_test_defect=2, size=32)
    write_mvtec_layout(tmp_path, ["grass"], n_train=2, n_test_good=1, n_test_defect=1, size=32)
    split = load_class(tmp_path, "grass", "folder")
    assert len(split.train) == 2 and len(split.test) == 2
    mask = Image.open(split.test[1].mask if split.test[1].label else split.test[0].mask)
    assert mask.mode == "L" and mask.size == (32, 32) and set(np.unique(np.asarray(mask))) == {0, 255}
    _img(tmp_path / "coins" / "mine.png")
    _raises(tmp_path / "coins", write_mvtec_layout, tmp_path, ["coins"], 1, 1, 1, 32)
    assert (tmp_path / "coins" / "mine.png").exists()


# --------------------------------------------------------------------------------------- real data


REAL = {  # name: (train, test, has_masks)
    "magnetic_tile": (666, 678, True),
    "kolektor": (260, 139, True),
    "pcb_deeppcb": (400, 250, True),
    "cubes": (80, 108, False),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_shared_datasets(name):
    if not (SHARED / name).is_dir():
        pytest.skip(f"shared test data not found at {SHARED / name}")
    n_train, n_test, has_masks = REAL[name]
    assert name in list_classes(SHARED, "folder")
    split = load_class(SHARED, name, "folder")
    assert (len(split.train), len(split.test), split.has_masks) == (n_train, n_test, has_masks)
    bad = [s for s in split.test if s.label == 1]
    assert bad and all((s.mask is not None) == has_masks for s in bad)
    ds = ImageDataset([bad[0], split.train[0]], ImageTransform(224))  # (thin kolektor cracks vanish at 32 px)
    first = ds[0]
    assert first["image"].shape == (3, 224, 224) and first["label"] == 1
    assert bool(first["mask"].any()) == has_masks
    assert not ds[1]["mask"].any()
