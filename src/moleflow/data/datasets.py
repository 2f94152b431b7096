"""Datasets as tables of samples (as anomalib does it), and a lazy torch `Dataset` over them.

Layouts:
  * MVTec AD (also MPDD and users' own folders, dataset name `folder`)::

        <root>/<class>/train/good/*.png|jpg|...
        <root>/<class>/test/good/*
        <root>/<class>/test/<defect_type>/*
        <root>/<class>/ground_truth/<defect_type>/<stem>_mask.png

    A class without a `ground_truth` folder is valid: it has image labels only (`has_masks` False).
  * VisA: the official split csv `<root>/split_csv/1cls.csv` with columns
    `object,split,label,image,mask` (paths relative to `<root>`).

Listing only looks at file names; images are decoded lazily by `ImageDataset`, so a corrupt file
or a mask whose size differs from its image is reported when that sample is loaded. `validate_split`
decodes every image and mask of a class up front (call it before training) and reports all bad files
in one error.
"""

from __future__ import annotations

import csv
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import MoleflowError
from .transforms import ImageTransform, load_mask, load_rgb

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DATASETS = ("mvtec", "visa", "mpdd", "folder")

MVTEC_CLASSES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
VISA_CLASSES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)
MPDD_CLASSES = (
    "bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes",
)
_BUILTIN = {"mvtec": MVTEC_CLASSES, "visa": VISA_CLASSES, "mpdd": MPDD_CLASSES}

VISA_SPLIT_CSV = "split_csv/1cls.csv"


@dataclass(frozen=True)
class Sample:
    """One image. `mask` None: no mask file (all-normal for good images; for anomalous images of a
    class without ground truth, pixel metrics are unavailable; see `ClassSplit.has_masks`)."""

    image: Path
    label: int  # 0 normal, 1 anomalous
    mask: Path | None
    class_name: str
    defect_type: str  # "good" for normal
    split: str  # "train" | "test"


@dataclass
class ClassSplit:
    """The train and test samples of one class (one task)."""

    class_name: str
    train: list[Sample]
    test: list[Sample]
    has_masks: bool  # False: no ground truth at all; pixel metrics are "not available" (never 0 / NaN)

    @property
    def test_labels(self) -> list[int]:
        return [s.label for s in self.test]


# --------------------------------------------------------------------------------------- helpers


def _check_dataset(dataset: str) -> str:
    if dataset not in DATASETS:
        raise MoleflowError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}")
    return dataset


def _check_root(root: str | Path) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "not found"
        raise MoleflowError(f"{root}: data folder {what}; check the dataset root path")
    return root


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def images_under(folder: str | Path) -> list[Path]:
    """Every image file under `folder`, at any depth, sorted by path (hidden files skipped); a clear error when
    the folder is missing or holds none."""
    root = Path(folder)
    if not root.is_dir():
        raise MoleflowError(f"{root}: {'not a folder' if root.exists() else 'not found'}; give a folder of images")
    found = sorted(p for p in root.rglob("*") if _is_image(p))
    if not found:
        raise MoleflowError(f"{root}: no images found (looked for {' '.join(IMAGE_EXTENSIONS)} at any depth)")
    return found


def _images_in(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name (hidden files skipped)."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _is_image(p)), key=lambda p: p.name)


def _subdirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _folder_classes(root: Path) -> list[str]:
    return [d.name for d in _subdirs(root) if (d / "train" / "good").is_dir()]


def _mask_index(gt_dir: Path) -> dict[str, Path]:
    """Mask files of one defect type keyed by image stem: `<stem>_mask.<ext>` (MVTec), else `<stem>.<ext>`."""
    index: dict[str, Path] = {}
    plain: dict[str, Path] = {}
    for p in _images_in(gt_dir):
        stem = p.stem
        if stem.endswith("_mask"):
            key = stem[: -len("_mask")]
            # prefer .png when several extensions exist
            if key not in index or p.suffix.lower() == ".png":
                index[key] = p
        elif stem not in plain or p.suffix.lower() == ".png":
            plain[stem] = p
    for key, p in plain.items():
        index.setdefault(key, p)
    return index


# --------------------------------------------------------------------------------------- loaders


def load_mvtec_layout(root: str | Path, class_name: str,
                      missing_mask: Literal["error", "empty"] = "error") -> ClassSplit:
    """Load one class of an MVTec-AD-style folder tree (MVTec AD, MPDD, users' own folders).

    `missing_mask`: what to do with an anomalous image whose mask file is missing while the class
    has a `ground_truth` folder: "error" (default) raises, "empty" treats it as an all-zero mask
    (MPDD convention).
    """
    if missing_mask not in ("error", "empty"):
        raise MoleflowError(f"missing_mask={missing_mask!r}: use 'error' or 'empty'")
    root = _check_root(root)
    cdir = root / class_name
    if not cdir.is_dir():
        found = _folder_classes(root)
        listing = ", ".join(found) if found else "none (no sub-folder has train/good)"
        raise MoleflowError(f"{cdir}: class folder not found; classes in {root}: {listing}")

    train_dir = cdir / "train" / "good"
    train_files = _images_in(train_dir)
    if not train_files:
        raise MoleflowError(
            f"{train_dir}: no train images found (looked for {' '.join(IMAGE_EXTENSIONS)}); "
            f"put the normal training images there")
    train = [Sample(p, 0, None, class_name, "good", "train") for p in train_files]

    test_dir = cdir / "test"
    gt_root = cdir / "ground_truth"
    has_masks = gt_root.is_dir()
    test: list[Sample] = []
    for tdir in _subdirs(test_dir):
        defect_type = tdir.name
        files = _images_in(tdir)
        if defect_type == "good":
            test.extend(Sample(p, 0, None, class_name, "good", "test") for p in files)
            continue
        masks = _mask_index(gt_root / defect_type) if has_masks else {}
        for p in files:
            mask = masks.get(p.stem)
            if mask is None and has_masks and missing_mask == "error":
                expected = gt_root / defect_type / f"{p.stem}_mask.png"
                raise MoleflowError(
                    f"{expected}: mask missing for anomalous image {p}; add the mask or remove the image")
            test.append(Sample(p, 1, mask, class_name, defect_type, "test"))
    if not test:
        raise MoleflowError(
            f"{test_dir}: no test images found; put them in test/good and test/<defect_type> folders")
    return ClassSplit(class_name, train, test, has_masks)


def _visa_csv(root: Path, split_csv: str | Path) -> Path:
    path = Path(split_csv)
    if not path.is_absolute():
        path = root / path
    if not path.is_file():
        raise MoleflowError(
            f"{path}: VisA split file not found; VisA needs the official split_csv/1cls.csv under the dataset root")
    return path


def _read_visa_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in (reader.fieldnames or [])]
        need = ("object", "split", "label", "image", "mask")
        missing = [c for c in need if c not in fields]
        if missing:
            raise MoleflowError(
                f"{path}: VisA split csv lacks column(s) {', '.join(missing)}; expected object,split,label,image,mask")
        rows = []
        for raw in reader:
            rows.append({(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()})
        return rows


def load_visa(root: str | Path, class_name: str, split_csv: str | Path = VISA_SPLIT_CSV) -> ClassSplit:
    """Load one VisA class from the official split csv (`object,split,label,image,mask`)."""
    root = _check_root(root)
    path = _visa_csv(root, split_csv)
    rows = _read_visa_rows(path)
    train: list[Sample] = []
    test: list[Sample] = []
    has_masks = False
    for line, row in enumerate(rows, start=2):
        if row["object"] != class_name:
            continue
        split, label = row["split"].lower(), row["label"].lower()
        if split not in ("train", "test"):
            raise MoleflowError(f"{path} line {line}: split {row['split']!r} is not train or test")
        if label not in ("normal", "anomaly"):
            raise MoleflowError(f"{path} line {line}: label {row['label']!r} is not normal or anomaly")
        image = root / row["image"]
        if not image.is_file():
            raise MoleflowError(f"{image}: image listed in {path} line {line} not found")
        mask = root / row["mask"] if row["mask"] else None
        if mask is not None:
            if not mask.is_file():
                raise MoleflowError(f"{mask}: mask listed in {path} line {line} not found")
            has_masks = True
        y = int(label == "anomaly")
        sample = Sample(image, y, mask, class_name, "anomaly" if y else "good", split)
        (train if split == "train" else test).append(sample)
    if not train and not test:
        objects = list(dict.fromkeys(r["object"] for r in rows))
        raise MoleflowError(f"{path}: no rows for class {class_name!r}; classes listed: {', '.join(objects)}")
    if not train:
        raise MoleflowError(f"{path}: no train images for class {class_name!r}")
    if not test:
        raise MoleflowError(f"{path}: no test images for class {class_name!r}")
    return ClassSplit(class_name, train, test, has_masks)


def list_classes(root: str | Path, dataset: str = "folder") -> list[str]:
    """Classes present on disk: sub-folders of `root` with `train/good` (sorted); VisA: csv order."""
    _check_dataset(dataset)
    root = _check_root(root)
    if dataset == "visa":
        rows = _read_visa_rows(_visa_csv(root, VISA_SPLIT_CSV))
        return list(dict.fromkeys(r["object"] for r in rows if r["object"]))
    return _folder_classes(root)


def default_classes(dataset: str, root: str | Path | None = None) -> list[str]:
    """The default task order: the built-in list for mvtec/visa/mpdd, `list_classes` for folder."""
    _check_dataset(dataset)
    if dataset in _BUILTIN:
        return list(_BUILTIN[dataset])
    if root is None:
        raise MoleflowError("dataset 'folder' has no built-in class list; give the data root")
    return list_classes(root, dataset)


def load_class(root: str | Path, class_name: str, dataset: str = "folder") -> ClassSplit:
    """Load one class of `dataset` ("mvtec", "visa", "mpdd" or "folder")."""
    _check_dataset(dataset)
    if dataset == "visa":
        return load_visa(root, class_name)
    return load_mvtec_layout(root, class_name, missing_mask="empty" if dataset == "mpdd" else "error")


# --------------------------------------------------------------------------------------- torch side


def _image_size(path: Path) -> tuple[int, int]:
    """Width and height from the file header (no full decode)."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise MoleflowError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise MoleflowError(f"{path}: cannot read this image ({exc}); replace or remove the file") from None


def _check_mask_size(sample: Sample, mask: Image.Image, image_size: tuple[int, int]) -> None:
    if mask.size != tuple(image_size):
        raise MoleflowError(
            f"{sample.mask}: mask is {mask.size[0]}x{mask.size[1]} but its image {sample.image} is "
            f"{image_size[0]}x{image_size[1]}; masks must have the size of their image")


def _load_pair(sample: Sample) -> tuple[Image.Image, Image.Image | None]:
    img = load_rgb(sample.image)
    mask = None
    if sample.mask is not None:
        mask = load_mask(sample.mask)
        _check_mask_size(sample, mask, img.size)
    return img, mask


def _sample_problem(sample: Sample) -> tuple[Path, str] | None:
    """(bad file, message) if the image or mask of `sample` cannot be used, else None (full decode)."""
    try:
        img = load_rgb(sample.image)
    except MoleflowError as exc:
        return sample.image, str(exc)
    if sample.mask is not None:
        try:
            mask = load_mask(sample.mask)
            _check_mask_size(sample, mask, img.size)
        except MoleflowError as exc:
            return sample.mask, str(exc)
    return None


def validate_samples(samples: Sequence[Sample], workers: int | None = None) -> None:
    """Decode every image and mask of `samples` once (fully, with the loaders training uses) and check
    each mask has its image's size. Raises one one-line `MoleflowError` naming the first bad file and
    its fix, plus how many other files are bad. `workers`: decoding threads (default: the CPU count;
    PIL decodes without holding the GIL)."""
    samples = list(samples)
    workers = max(1, min(workers or os.cpu_count() or 1, 8, len(samples) or 1))
    if workers == 1:
        results = [_sample_problem(s) for s in samples]
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="moleflow-validate") as pool:
            results = list(pool.map(_sample_problem, samples, chunksize=4))
    bad = [r for r in results if r is not None]
    if not bad:
        return
    message = bad[0][1]
    others = [str(path) for path, _ in bad[1:]]
    if others:
        listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        message += f" ({len(others)} more bad file{'s' if len(others) > 1 else ''}: {listed})"
    raise MoleflowError(message)


def validate_split(split: ClassSplit, workers: int | None = None) -> None:
    """`validate_samples` over the train and test samples of one class: every file decodes, masks fit."""
    validate_samples([*split.train, *split.test], workers)


class MaskDataset(Dataset):
    """Lazy torch dataset of samples' masks alone, for callers that read the images themselves (tiling cuts
    each file): items are dicts `{"mask": BoolTensor(S,S), "label": int, "index": int}`. The mask's size is
    checked against its image's header, so the image is not decoded here."""

    def __init__(self, samples: Sequence[Sample], transform: ImageTransform) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        return {"mask": header_checked_mask(sample, self.transform), "label": int(sample.label), "index": int(index)}


class ImageDataset(MaskDataset):
    """Lazy torch dataset over samples: items are dicts
    `{"image": FloatTensor(3,S,S), "mask": BoolTensor(S,S), "label": int, "index": int}`."""

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        img, mask = _load_pair(sample)
        size = self.transform.size
        mask_t = self.transform.mask(mask) if mask is not None else torch.zeros(size, size, dtype=torch.bool)
        return {"image": self.transform(img), "mask": mask_t, "label": int(sample.label), "index": int(index)}


def header_checked_mask(sample: Sample, transform: ImageTransform) -> torch.Tensor:
    """A sample's mask transformed to (S, S) bool, all False without a mask; its size is checked against its
    image's header (the image is not decoded)."""
    s = transform.size
    if sample.mask is None:
        return torch.zeros(s, s, dtype=torch.bool)
    mask = load_mask(sample.mask)
    _check_mask_size(sample, mask, _image_size(sample.image))
    return transform.mask(mask)


def load_images(samples: Sequence[Sample], transform: ImageTransform) -> torch.Tensor:
    """All images of a small set as one tensor (N, 3, S, S)."""
    s = transform.size
    if not samples:
        return torch.empty(0, 3, s, s)
    return torch.stack([transform(load_rgb(x.image)) for x in samples])


def load_masks(samples: Sequence[Sample], transform: ImageTransform) -> torch.Tensor:
    """All masks of a small set as one bool tensor (N, S, S); all False where a sample has no mask.
    The mask size is checked against its image."""
    if not samples:
        return torch.zeros(0, transform.size, transform.size, dtype=torch.bool)
    return torch.stack([header_checked_mask(x, transform) for x in samples])
