"""Image files as industrial cameras write them (16-bit, float, palette, alpha, CMYK), masks of any bit
depth resized nearest-neighbour, and `validate_split` before training."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moleflow.data import ImageTransform, load_class, load_mask, load_rgb
from moleflow.data.datasets import validate_samples, validate_split
from moleflow.data.transforms import mask_to_l, to_rgb8
from moleflow.errors import MoleflowError

# --------------------------------------------------------------------------------------- helpers


def _png16(path: Path, arr: np.ndarray) -> Path:
    """Write a 16-bit PNG (grey, grey+alpha, RGB or RGBA by channel count) byte by byte: PIL cannot save
    16-bit colour, and 16-bit grey through PIL would not test what a camera writes."""
    arr = np.asarray(arr, dtype=">u2")
    if arr.ndim == 2:
        arr = arr[..., None]
    h, w, c = arr.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def _gradient16(width=1024, height=4) -> np.ndarray:
    """A full-range horizontal 16-bit gradient 0..65535."""
    row = np.round(np.linspace(0, 65535, width)).astype(np.uint16)
    return np.tile(row, (height, 1))


def _assert_gradient(rgb: Image.Image) -> None:
    arr = np.asarray(rgb)
    assert rgb.mode == "RGB" and arr.dtype == np.uint8 and arr.shape[2] == 3
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    row = arr[0, :, 0].astype(int)
    assert len(np.unique(row)) >= 200  # convert("RGB") gives 2 levels (0 and 255)
    assert (np.diff(row) >= 0).all() and row[0] == 0 and row[-1] == 255
    mid = row[len(row) // 2]
    assert abs(mid - 128) <= 1


def _raises(path, fn, *args) -> str:
    with pytest.raises(MoleflowError) as info:
        fn(*args)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------------------- 16-bit and float


def test_16bit_grey_png_gradient_keeps_its_levels(tmp_path):
    path = _png16(tmp_path / "grad.png", _gradient16())
    assert Image.open(path).mode.startswith("I")  # what PIL gives: a 16-bit integer mode
    _assert_gradient(load_rgb(path))


@pytest.mark.parametrize("compression", [None, "tiff_lzw"])
def test_16bit_grey_tiff_gradient_keeps_its_levels(tmp_path, compression):
    path = tmp_path / "grad.tif"
    kwargs = {"compression": compression} if compression else {}
    Image.fromarray(_gradient16()).save(path, **kwargs)
    assert Image.open(path).mode == "I;16"
    _assert_gradient(load_rgb(path))


def test_16bit_big_endian_tiff(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path / "be.tif"
    tifffile.imwrite(path, _gradient16().astype(">u2"), byteorder=">")
    assert Image.open(path).mode == "I;16B"
    _assert_gradient(load_rgb(path))


def test_16bit_scaling_is_value_over_257_rounded():
    values = np.array([[0, 128, 129, 257, 32767, 65535]], np.uint16)
    out = np.asarray(to_rgb8(Image.fromarray(values)))[0, :, 0]
    assert out.tolist() == [0, 0, 1, 1, 127, 255]


def test_32bit_integer_mode_i(tmp_path):
    ok = Image.fromarray(_gradient16().astype(np.int32))
    assert ok.mode == "I"
    _assert_gradient(to_rgb8(ok))
    path = tmp_path / "big.tif"
    Image.fromarray(np.array([[0, 70000]], np.int32)).save(path)
    msg = _raises(path, load_rgb, path)
    assert "mode I" in msg and "8-bit" in msg
    neg = tmp_path / "neg.tif"
    Image.fromarray(np.array([[-5, 7]], np.int32)).save(neg)
    _raises(neg, load_rgb, neg)


def test_float_rule(tmp_path):
    """F: all values in [0, 1] -> x 255; else all in [0, 255] -> kept; else refused."""
    unit = tmp_path / "unit.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F").save(unit)
    assert Image.open(unit).mode == "F"
    assert np.asarray(load_rgb(unit))[0, :, 0].tolist() == [0, 128, 255]
    byte = tmp_path / "byte.tif"
    Image.fromarray(np.array([[0.0, 2.4, 200.0, 255.0]], np.float32), "F").save(byte)
    assert np.asarray(load_rgb(byte))[0, :, 1].tolist() == [0, 2, 200, 255]
    for name, values in [("big", [0.0, 300.0]), ("neg", [-0.1, 0.5]), ("nan", [np.nan, 0.5])]:
        path = tmp_path / f"{name}.tif"
        Image.fromarray(np.array([values], np.float32), "F").save(path)
        msg = _raises(path, load_rgb, path)
        assert "mode F" in msg and "convert it to" in msg


def test_tiff_pil_cannot_represent_is_refused(tmp_path):
    """A 2-channel 16-bit TIFF (or a float colour TIFF): one line naming the file and the fix."""
    tifffile = pytest.importorskip("tifffile")
    two = tmp_path / "two.tif"
    tifffile.imwrite(two, np.zeros((4, 5, 2), np.uint16), photometric="minisblack", planarconfig="contig")
    assert "TIFF with 2 samples of 16-bit unsigned integer" in _raises(two, load_rgb, two)
    rgbf = tmp_path / "rgbf.tif"
    tifffile.imwrite(rgbf, np.zeros((4, 5, 3), np.float32), photometric="rgb")
    msg = _raises(rgbf, load_rgb, rgbf)
    assert "3 samples of 32-bit float" in msg and "convert it to an 8-bit" in msg
    not_tiff = tmp_path / "x.tif"
    not_tiff.write_bytes(b"garbage" * 20)
    assert "replace or remove" in _raises(not_tiff, load_mask, not_tiff)


def test_16bit_colour_png_reads_as_8bit_colour(tmp_path):
    rgb16 = np.zeros((2, 3, 3), np.uint16)
    rgb16[0, 0] = (65535, 0, 32768)
    path = _png16(tmp_path / "rgb16.png", rgb16)
    arr = np.asarray(load_rgb(path))
    assert arr.shape == (2, 3, 3) and arr.dtype == np.uint8
    assert arr[0, 0].tolist() == [255, 0, 128] and not arr[1].any()


def test_in_memory_16bit_image_goes_through_the_transform():
    """`ImageTransform` on a PIL image that never went through `load_rgb` (e.g. `Detector.predict(arrays)`)."""
    img = Image.fromarray(_gradient16(64, 64))
    arr = ImageTransform(32).to_array(img)
    assert arr.shape == (32, 32, 3) and len(np.unique(arr)) > 20


# --------------------------------------------------------------------------------------- 8-bit modes

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 200, 30)]


def _colour_image() -> Image.Image:
    arr = np.zeros((4, 4, 3), np.uint8)
    for i, c in enumerate(COLOURS):
        arr[i] = c
    return Image.fromarray(arr)


def _check_colours(path: Path, tol: int = 0) -> None:
    arr = np.asarray(load_rgb(path))
    assert arr.shape == (4, 4, 3) and arr.dtype == np.uint8
    for i, c in enumerate(COLOURS):
        assert np.abs(arr[i].astype(int) - c).max() <= tol, (arr[i], c)


def test_rgba_drops_alpha(tmp_path):
    rgba = _colour_image().convert("RGBA")
    rgba.putalpha(Image.new("L", (4, 4), 0))  # fully transparent: colours still come through
    rgba.save(tmp_path / "a.png")
    _check_colours(tmp_path / "a.png")


def test_palette(tmp_path):
    pal = _colour_image().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    pal.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    _check_colours(tmp_path / "p.png")
    pa = pal.convert("PA")
    assert pa.mode == "PA" and np.array_equal(np.asarray(to_rgb8(pa)), np.asarray(_colour_image()))


def test_cmyk(tmp_path):
    _colour_image().convert("CMYK").save(tmp_path / "c.tif")
    assert Image.open(tmp_path / "c.tif").mode == "CMYK"
    _check_colours(tmp_path / "c.tif")
    _colour_image().convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    arr = np.asarray(load_rgb(tmp_path / "c.jpg"))
    assert arr.shape == (4, 4, 3) and arr[0, 0, 0] > 200 and arr[2, 0, 2] > 200  # lossy: red, blue


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_grey_with_alpha_and_one_bit(tmp_path, suffix):
    grey = np.array([[0, 60], [130, 255]], np.uint8)
    la = Image.fromarray(grey).convert("LA")
    la.save(tmp_path / f"la.{suffix}")
    assert Image.open(tmp_path / f"la.{suffix}").mode == "LA"
    arr = np.asarray(load_rgb(tmp_path / f"la.{suffix}"))
    assert arr.shape == (2, 2, 3) and (arr == grey[..., None]).all()
    Image.fromarray(grey > 100).save(tmp_path / f"b.{suffix}")
    assert Image.open(tmp_path / f"b.{suffix}").mode == "1"
    arr = np.asarray(load_rgb(tmp_path / f"b.{suffix}"))
    assert arr.shape == (2, 2, 3) and arr.dtype == np.uint8
    assert (arr == np.where(grey > 100, 255, 0)[..., None]).all()


def test_truncated_and_garbage_jpeg_name_the_file(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    Image.open(cut)  # the header alone is fine: only a full decode sees it
    assert "replace or remove" in _raises(cut, load_rgb, cut)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    _raises(junk, load_rgb, junk)
    _raises(tmp_path / "gone.jpg", load_rgb, tmp_path / "gone.jpg")


# --------------------------------------------------------------------------------------- masks


def test_16bit_mask_with_value_one_is_anomalous(tmp_path):
    raw = np.zeros((6, 8), np.uint16)
    raw[2, 3] = 1
    raw[4, 5] = 65535
    path = _png16(tmp_path / "m16.png", raw)
    m = load_mask(path)
    assert m.mode == "L" and m.size == (8, 6)
    assert np.array_equal(np.asarray(m) > 0, raw > 0)
    tensor = ImageTransform(8, "squash").mask(Image.open(path))  # a raw 16-bit PIL image as well
    assert tensor.shape == (8, 8)


def test_mask_modes(tmp_path):
    hit = np.zeros((4, 4), bool)
    hit[1, 2] = True
    assert np.array_equal(np.asarray(mask_to_l(Image.fromarray(hit))) > 0, hit)  # mode 1
    floats = np.where(hit, 0.3, 0.0).astype(np.float32)
    assert np.array_equal(np.asarray(mask_to_l(Image.fromarray(floats, "F"))) > 0, hit)
    blue = np.zeros((4, 4, 3), np.uint8)
    blue[1, 2] = (0, 0, 1)  # convert("L") would make this 0
    assert np.array_equal(np.asarray(mask_to_l(Image.fromarray(blue))) > 0, hit)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 255  # opaque black is normal: alpha is ignored
    rgba[1, 2, 0] = 255
    assert np.array_equal(np.asarray(mask_to_l(Image.fromarray(rgba))) > 0, hit)


def test_nearest_mask_resize_keeps_a_thin_line_thin():
    arr = np.zeros((40, 40), np.uint8)
    arr[21, :] = 255  # a 1-pixel horizontal crack
    arr[:, 9] = 255  # a 1-pixel vertical crack
    m = ImageTransform(20, "squash").mask(Image.fromarray(arr)).numpy()
    assert m[10].all() and m[:, 4].all()
    assert m.sum(axis=0).tolist() == [20 if x == 4 else 1 for x in range(20)]  # one row, one column: not widened
    assert m.sum() == 20 + 20 - 1
    # a 2-pixel line becomes exactly 1 pixel; an area mask keeps its area
    two = np.zeros((40, 40), np.uint8)
    two[10:12, :] = 1
    assert ImageTransform(20).mask(Image.fromarray(two)).numpy().sum(axis=1).tolist() == \
        [20 if y == 5 else 0 for y in range(20)]
    box = np.zeros((40, 40), np.uint8)
    box[8:24, 4:20] = 255
    assert int(ImageTransform(20).mask(Image.fromarray(box)).sum()) == 8 * 8
    # same geometry as the image in the other modes; letterbox pads are normal
    wide = np.zeros((20, 40), np.uint8)
    wide[11, :] = 255
    lb = ImageTransform(20, "letterbox").mask(Image.fromarray(wide)).numpy()
    assert lb.sum() == 20 and lb.sum(axis=1).max() == 20 and not lb[:5].any() and not lb[15:].any()
    rc = ImageTransform(10, "resize_crop").mask(Image.fromarray(wide)).numpy()
    assert rc.sum() == 10 and rc[5].all()


# --------------------------------------------------------------------------------------- validate_split


def _img(path: Path, size=(40, 40), seed=0, fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, fmt)
    return path


def _mask(path: Path, size=(40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = np.zeros((h, w), np.uint8)
    arr[5:15, 5:15] = 255
    Image.fromarray(arr).save(path)
    return path


def _make_class(root: Path, name: str = "part", n_train=3, n_good=2, n_crack=3, ext="png") -> Path:
    """MVTec layout: train/good, test/good, test/crack, ground_truth/crack/*_mask.png."""
    cdir = root / name
    for i in range(n_train):
        _img(cdir / "train" / "good" / f"{i:03d}.{ext}", seed=i)
    for i in range(n_good):
        _img(cdir / "test" / "good" / f"{i:03d}.{ext}", seed=100 + i)
    for i in range(n_crack):
        _img(cdir / "test" / "crack" / f"{i:03d}.{ext}", seed=200 + i)
        _mask(cdir / "ground_truth" / "crack" / f"{i:03d}_mask.png")
    return cdir


def test_validate_split_passes_on_a_good_folder(tmp_path):
    _make_class(tmp_path)
    split = load_class(tmp_path, "part", "folder")
    validate_split(split)
    validate_split(split, workers=1)
    validate_samples([])


def test_validate_split_finds_a_corrupt_test_jpeg(tmp_path):
    cdir = _make_class(tmp_path, ext="jpg")
    bad = cdir / "test" / "crack" / "001.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated: the header still parses
    split = load_class(tmp_path, "part", "folder")  # listing does not decode
    msg = _raises(bad, validate_split, split)
    assert msg.startswith(str(bad)) and "replace or remove" in msg and "more bad" not in msg


def test_validate_split_finds_a_wrong_size_mask(tmp_path):
    cdir = _make_class(tmp_path)
    wrong = _mask(cdir / "ground_truth" / "crack" / "002_mask.png", (41, 40))
    split = load_class(tmp_path, "part", "folder")
    msg = _raises(wrong, validate_split, split)
    assert msg.startswith(str(wrong)) and "41x40" in msg and str(cdir / "test" / "crack" / "002.png") in msg


def test_validate_split_reports_the_first_and_counts_the_rest(tmp_path):
    cdir = _make_class(tmp_path, n_train=6)
    first = cdir / "train" / "good" / "001.png"
    first.write_bytes(b"not an image")
    (cdir / "train" / "good" / "004.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    Image.fromarray(np.array([[0.0, 1000.0]], np.float32), "F").save(cdir / "test" / "good" / "000.tif")
    _mask(cdir / "ground_truth" / "crack" / "000_mask.png", (20, 20))
    split = load_class(tmp_path, "part", "folder")
    for workers in (1, 2):
        msg = _raises(first, validate_split, split, workers)
        assert msg.startswith(str(first))
        assert "(3 more bad files: " in msg
        for other in ("train/good/004.png", "ground_truth/crack/000_mask.png", "test/good/000.tif"):
            assert str(cdir / other) in msg, other


@pytest.mark.parametrize("mode", ["squash", "letterbox", "resize_crop"])
def test_grey_images_resize_as_their_rgb_copies(mode):
    """A grey image is resized before its channel is tripled (cheaper): the same bytes as resizing its RGB copy."""
    from moleflow.data.transforms import ImageTransform

    grey = Image.fromarray(np.random.default_rng(0).integers(0, 256, (61, 97), dtype=np.uint8), "L")
    transform = ImageTransform(32, mode)
    assert np.array_equal(transform.to_array(grey), transform.to_array(grey.convert("RGB")))
