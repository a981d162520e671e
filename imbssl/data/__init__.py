"""Data layer: sources -> long-tailed split -> device-resident uint8 tensors + augmenter."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .augment import Augmenter, resize
from .device_loader import BatchStream, TensorSet
from .longtail import (
    Split,
    SplitCounts,
    class_counts,
    make_longtail_split,
    make_official_daso_split,
    make_split,
    per_class_counts,
    planned_counts,
    split_counts,
)
from .sources import NORMALIZATION, DataError, SourceData, channel_stats, load_source

__all__ = [
    "NORMALIZATION", "Augmenter", "BatchStream", "DataBundle", "DataError", "DatasetConfig",
    "SourceData", "Split", "SplitCounts", "TensorSet", "build_data", "class_counts",
    "load_source", "make_longtail_split", "make_official_daso_split", "make_split",
    "per_class_counts", "planned_counts", "split_counts",
]


@dataclass
class DatasetConfig:
    """Schema of the Hydra `dataset` group (registered as dataset/dataset_schema)."""

    name: str = "digits"  # cifar10 | cifar100 | stl10 | digits | imagefolder
    root: str = "datasets"  # relative paths resolve against the directory the command runs in
    download: bool = False
    n1: int = 30  # labeled images of the head class (N_1)
    m1: int = 90  # unlabeled images of the head class (M_1); ignored for stl10
    gamma_l: float = 10.0  # labeled imbalance ratio N_1 / N_K
    gamma_u: float = 10.0  # unlabeled imbalance ratio M_1 / M_K
    reverse_unlabeled: bool = False  # unlabeled long tail in reversed class order
    num_valid_per_class: int = 0  # class-balanced validation images held out of train
    seed: int = 0
    flip: bool = False  # random horizontal flip in weak/strong views
    image_size: int = 0  # resize every image to this square size once at load; 0 keeps it
    # true: train images stay at their native size on the device and every view is resized to
    # image_size after its crop (official DASO order; test / validation resized once at load)
    resize_views: bool = False
    # Fill of the strong view's Rotate/Shear/Translate: 128 = Google FixMatch (augment.WARP_FILL),
    # 0 = official DASO (PIL rotate/transform without fillcolor: black).
    geometric_fill: int = 128
    # imbssl: make_longtail_split; official_daso: the images the official DASO code draws for
    # the seed (lib/dataset/utils.py, longtail.make_official_daso_split)
    split_protocol: str = "imbssl"


@dataclass
class DataBundle:
    """Everything training needs from the data layer, tensors already on the device."""

    num_classes: int
    class_names: list[str]
    image_shape: tuple[int, int, int]  # (C, H, W)
    labeled: TensorSet
    unlabeled: TensorSet
    valid: TensorSet | None
    test: TensorSet
    labeled_counts: list[int]
    unlabeled_counts: list[int] | None  # None when unknown (stl10)
    augmenter: Augmenter


def build_data(cfg: Any, device: torch.device | str = "cpu") -> DataBundle:
    """Load cfg.name, draw the long-tailed split and move every part to `device`."""
    get = _getter(cfg)
    name = str(get("name"))
    src = load_source(name, _resolve_root(str(get("root"))), bool(get("download")))
    size = int(get("image_size"))
    view_size = size if bool(get("resize_views")) else 0  # resize per view, not at load
    src = resized(src, size, keep_train=view_size > 0)
    check_image_size(src.test_images.shape[1:3], name)
    k = src.num_classes
    has_extra = src.extra_unlabeled_images is not None
    try:
        split = make_split(
            str(get("split_protocol")), src.train_labels, n1=int(get("n1")),
            gamma_l=float(get("gamma_l")), m1=0 if has_extra else int(get("m1")),
            gamma_u=1.0 if has_extra else float(get("gamma_u")),
            reverse_unlabeled=bool(get("reverse_unlabeled")),
            num_valid_per_class=int(get("num_valid_per_class")), seed=int(get("seed")),
            num_classes=k,
        )
    except ValueError as exc:  # impossible split settings are a config mistake
        raise DataError(f"dataset {name}: {exc}") from None
    counts = split_counts(src.train_labels, split, k)

    def part(idx: np.ndarray, size: int = 0) -> TensorSet:
        images = src.train_images[idx]
        return TensorSet.from_numpy(resize_images(images, size) if size else images,
                                    src.train_labels[idx], device)

    if has_extra:  # stl10: the 100k unlabeled images, labels unknown
        unlabeled, u_counts = TensorSet.from_numpy(src.extra_unlabeled_images, None, device), None
    else:  # true labels kept only for diagnostics
        unlabeled, u_counts = part(split.unlabeled), counts.unlabeled
    mean, std = (channel_stats(src.train_images) if name == "imagefolder"
                 else NORMALIZATION[name])
    h, w, c = src.test_images.shape[1:]  # evaluation images: the views' size
    return DataBundle(
        num_classes=k, class_names=list(src.class_names), image_shape=(c, h, w),
        labeled=part(split.labeled), unlabeled=unlabeled,
        valid=part(split.valid, view_size) if len(split.valid) else None,
        test=TensorSet.from_numpy(src.test_images, src.test_labels, device),
        labeled_counts=counts.labeled, unlabeled_counts=u_counts,
        augmenter=Augmenter(mean, std, flip=bool(get("flip")),
                            geometric_fill=geometric_fill(get("geometric_fill")),
                            size=view_size),
    )


def geometric_fill(value: Any) -> int:
    """dataset.geometric_fill checked to be a gray level in [0, 255]."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise DataError(f"dataset.geometric_fill must be an integer gray level in [0, 255] "
                        f"(128: FixMatch, 0: DASO), got {value!r}")
    return value


#: the smallest images imbssl trains on (a model's pooling shrinks smaller ones to nothing)
MIN_IMAGE_SIZE = 4
#: the largest dataset.image_size: every image lives on the device as uint8
MAX_IMAGE_SIZE = 1024


def check_image_size(height_width: tuple[int, int], name: str) -> None:
    """Images smaller than MIN_IMAGE_SIZE are refused (a model's pooling would shrink them to
    nothing), naming dataset.image_size as the fix."""
    h, w = (int(v) for v in height_width)
    if min(h, w) < MIN_IMAGE_SIZE:
        raise DataError(f"dataset {name}: its images are {w}x{h} pixels; imbssl needs at least "
                        f"{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}: set dataset.image_size=32 (or "
                        f"another size >= {MIN_IMAGE_SIZE}) to resize them at load")


def resized(src: SourceData, size: int, keep_train: bool = False) -> SourceData:
    """``src`` with every image resized to size x size (antialiased bilinear); 0 keeps it;
    ``keep_train``: the test images only (the views resize the train images)."""
    if size != 0 and not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise DataError(f"dataset.image_size={size} is invalid: it must be 0 (keep the native "
                        f"size) or in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]")
    if size == 0 or src.test_images.shape[1:3] == (size, size):
        return src
    fields = ("test_images",) if keep_train else (
        "train_images", "test_images", "extra_unlabeled_images")
    _check_resized_memory(src, fields, size)
    changes = {f: resize_images(getattr(src, f), size) for f in fields
               if getattr(src, f) is not None}
    return dataclasses.replace(src, **changes)


def _check_resized_memory(src: SourceData, fields: tuple[str, ...], size: int) -> None:
    """Refuse an image_size whose resized copies would not fit in half of the memory."""
    from .sources import _physical_memory

    count = sum(len(getattr(src, f)) for f in fields if getattr(src, f) is not None)
    need = count * size * size * src.test_images.shape[3]
    have = _physical_memory()
    if have and need > have // 2:
        raise DataError(f"dataset.image_size={size}: resizing {count} images needs "
                        f"{need / 2**30:.1f} GiB, more than half of this machine's "
                        f"{have / 2**30:.1f} GiB; choose a smaller dataset.image_size")


def resize_images(images_nhwc: np.ndarray, size: int, chunk: int = 4096) -> np.ndarray:
    """Resize uint8 (N, H, W, C) images to (N, size, size, C), a chunk at a time."""
    out = np.empty((len(images_nhwc), size, size, images_nhwc.shape[3]), dtype=np.uint8)
    for start in range(0, len(images_nhwc), chunk):
        x = torch.from_numpy(images_nhwc[start:start + chunk]).permute(0, 3, 1, 2)
        out[start:start + chunk] = resize(x, size).permute(0, 2, 3, 1).numpy()
    return out


def _getter(cfg: Any):
    """Read fields from a mapping or an attribute-style config, DatasetConfig defaults filling gaps."""
    defaults = DatasetConfig()

    def get(key: str):
        if isinstance(cfg, dict):
            return cfg.get(key, getattr(defaults, key))
        return getattr(cfg, key, getattr(defaults, key))

    return get


def _resolve_root(root: str) -> Path:
    """A relative root is taken from the directory the command was started in (even under Hydra)."""
    path = Path(root).expanduser()
    if path.is_absolute():
        return path
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.utils import get_original_cwd

        if HydraConfig.initialized():
            return Path(get_original_cwd()) / path
    except ImportError:  # hydra is optional for the data layer
        pass
    return path
