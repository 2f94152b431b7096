"""Data layer: image transforms, dataset tables (MVTec AD / VisA / MPDD / own folders) and
generated products with exact defect masks (`moleflow.data.synthetic`, imported on first use)."""

from __future__ import annotations

from .datasets import (
    DATASETS,
    IMAGE_EXTENSIONS,
    MPDD_CLASSES,
    MVTEC_CLASSES,
    VISA_CLASSES,
    VISA_SPLIT_CSV,
    ClassSplit,
    ImageDataset,
    MaskDataset,
    Sample,
    default_classes,
    list_classes,
    load_class,
    load_images,
    load_masks,
    load_mvtec_layout,
    load_visa,
)
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, load_mask, load_rgb

_SYNTHETIC = ("AREA_RANGE", "DEFECT_KINDS", "PRODUCTS", "Product", "SyntheticClass", "apply_defect",
              "generate_product", "write_mvtec_layout")

__all__ = [
    "DATASETS", "IMAGE_EXTENSIONS", "MPDD_CLASSES", "MVTEC_CLASSES", "VISA_CLASSES", "VISA_SPLIT_CSV",
    "ClassSplit", "ImageDataset", "MaskDataset", "Sample", "default_classes", "list_classes", "load_class",
    "load_images", "load_masks", "load_mvtec_layout", "load_visa",
    "IMAGENET_MEAN", "IMAGENET_STD", "ImageTransform", "load_mask", "load_rgb",
    *_SYNTHETIC,
]


def __getattr__(name: str):
    # synthetic.py pulls in scipy; load it only when one of its names is used
    if name in _SYNTHETIC:
        from . import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
