"""The conventional input pipeline that ``imbssl bench`` compares against.

What most SSL code bases do (DASO's, FixMatch re-implementations): a ``torch.utils.data``
``DataLoader`` per stream with worker processes; each worker decodes one image at a time into
a PIL image, applies the weak view (random flip + reflect-padded random crop) or the strong
view (weak + FixMatch RandAugment + Cutout) with PIL, converts it to a normalized float tensor,
and the batches are collated, pinned and copied to the device. The images are the same uint8
arrays the GPU-resident pipeline uses, and the training step is the same
``Trainer.train_step`` (``ConventionalTrainer`` only replaces ``next_batch``).

The RandAugment below is a PIL implementation of the FixMatch op pool with the magnitudes
documented in ``imbssl.data.augment`` (level ~ U{1..9} of 10, each of the 2 ops applied with
probability 0.5, geometric ops filled with 128, Cutout of side H/2 filled with 127).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from imbssl.algorithms import Batch
from imbssl.data.augment import STRONG_VIEWS
from imbssl.engine.trainer import Trainer

LEVELS = 10
WARP_FILL = 128
CUTOUT_FILL = 127


# ----------------------------------------------------------------------------- PIL ops

def _fill(img: Image.Image, value: int):
    """A fill colour of the image's mode."""
    return value if len(img.getbands()) == 1 else (value,) * len(img.getbands())


def _signed(v: float) -> float:
    return -v if random.random() < 0.5 else v


def _blend_factor(level: int) -> float:
    return level / LEVELS * 0.9 + 0.05


def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs,
                         resample=Image.Resampling.NEAREST, fillcolor=_fill(img, WARP_FILL))


def _translate_px(level: int, size: int) -> int:
    return (3 * level * size) // 100  # int(level / 10 * 0.3 * size)


PIL_OPS: dict[str, Callable[[Image.Image, int], Image.Image]] = {
    "autocontrast": lambda img, lv: ImageOps.autocontrast(img),
    "brightness": lambda img, lv: ImageEnhance.Brightness(img).enhance(_blend_factor(lv)),
    "color": lambda img, lv: ImageEnhance.Color(img).enhance(_blend_factor(lv)),
    "contrast": lambda img, lv: ImageEnhance.Contrast(img).enhance(_blend_factor(lv)),
    "equalize": lambda img, lv: ImageOps.equalize(img),
    "identity": lambda img, lv: img,
    "posterize": lambda img, lv: ImageOps.posterize(img, (lv * 4) // LEVELS + 4),
    "rotate": lambda img, lv: img.rotate(_signed((lv * 30) // LEVELS),
                                         resample=Image.Resampling.NEAREST,
                                         fillcolor=_fill(img, WARP_FILL)),
    "sharpness": lambda img, lv: ImageEnhance.Sharpness(img).enhance(_blend_factor(lv)),
    "shear_x": lambda img, lv: _affine(img, (1, _signed(lv * 0.03), 0, 0, 1, 0)),
    "shear_y": lambda img, lv: _affine(img, (1, 0, 0, _signed(lv * 0.03), 1, 0)),
    "solarize": lambda img, lv: ImageOps.solarize(img, 256 - (lv * 256) // LEVELS),
    "translate_x": lambda img, lv: _affine(
        img, (1, 0, -_signed(_translate_px(lv, img.size[0])), 0, 1, 0)),
    "translate_y": lambda img, lv: _affine(
        img, (1, 0, 0, 0, 1, -_signed(_translate_px(lv, img.size[1])))),
}


class PILRandAugment:
    """FixMatch RandAugment: ``n`` ops drawn from the pool, each applied with p=0.5 at a
    random level in 1..9, then Cutout (a square of side ``cutout * H`` filled with 127)."""

    def __init__(self, n: int = 2, cutout: float = 0.5):
        self.n, self.cutout = int(n), float(cutout)
        self.ops = list(PIL_OPS.values())

    def __call__(self, img: Image.Image) -> Image.Image:
        for op in random.choices(self.ops, k=self.n):
            level = random.randint(1, LEVELS - 1)
            if random.random() < 0.5:
                img = op(img, level)
        return self._cutout(img)

    def _cutout(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        size = int(self.cutout * h)
        if size <= 0:
            return img
        cy, cx = random.uniform(0, h), random.uniform(0, w)
        top, left = int(max(0.0, cy - size / 2.0)), int(max(0.0, cx - size / 2.0))
        img = img.copy()
        img.paste(_fill(img, CUTOUT_FILL), (left, top, min(w, left + size), min(h, top + size)))
        return img


class PILViews:
    """weak / strong / none views of one PIL image as normalized float tensors (C, H, W)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], flip: bool,
                 pad_fraction: float = 0.125, randaug_n: int = 2, cutout: float = 0.5):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.flip, self.pad_fraction = bool(flip), float(pad_fraction)
        self.randaug = PILRandAugment(randaug_n, cutout)

    def weak_pil(self, img: Image.Image) -> Image.Image:
        """Random horizontal flip (if enabled), then a random crop of the reflect-padded image."""
        if self.flip and random.random() < 0.5:
            img = ImageOps.mirror(img)
        w, h = img.size
        pad = int(round(self.pad_fraction * h))
        if pad == 0:
            return img
        arr = np.asarray(img)
        widths = ((pad, pad), (pad, pad)) + (((0, 0),) if arr.ndim == 3 else ())
        padded = np.pad(arr, widths, mode="reflect")
        top, left = random.randint(0, 2 * pad), random.randint(0, 2 * pad)
        return Image.fromarray(padded[top:top + h, left:left + w])

    def to_tensor(self, img: Image.Image) -> Tensor:
        arr = np.array(img, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().div_(255.0)
        return (x - self.mean) / self.std

    def __call__(self, name: str, img: Image.Image) -> Tensor:
        if name == "none":
            return self.to_tensor(img)
        img = self.weak_pil(img)
        if name in STRONG_VIEWS:  # no resize here, so both orders are the same
            img = self.randaug(img)
        return self.to_tensor(img)


def to_pil(image_hwc: np.ndarray) -> Image.Image:
    """uint8 (H, W, C) array -> PIL image ("L" for one channel)."""
    return Image.fromarray(image_hwc[:, :, 0] if image_hwc.shape[2] == 1 else image_hwc)


# ----------------------------------------------------------------------------- datasets

class PILDataset(Dataset):
    """Item i: (view tensors..., label, i), decoding the uint8 array into PIL per access."""

    def __init__(self, images_nhwc: np.ndarray, labels: np.ndarray, views: Sequence[str],
                 transform: PILViews):
        self.images, self.labels = images_nhwc, labels
        self.views, self.transform = tuple(views), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = to_pil(self.images[i])
        return (*[self.transform(v, img) for v in self.views], int(self.labels[i]), i)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, num_batches: int, workers: int,
                pin_memory: bool, seed: int) -> DataLoader:
    """A loader of exactly ``num_batches`` batches sampled with replacement."""
    sampler = RandomSampler(dataset, replacement=True, num_samples=batch_size * num_batches,
                            generator=torch.Generator().manual_seed(seed))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0, worker_init_fn=_seed_worker)


# ----------------------------------------------------------------------------- trainer

class ConventionalTrainer(Trainer):
    """The same Trainer and training step, fed by PIL DataLoaders instead of the device
    pipeline. ``num_batches`` bounds the loaders (warm-up + timed iterations + slack)."""

    def __init__(self, cfg, workers: int, num_batches: int, run_dir=None):
        super().__init__(cfg, run_dir)
        data = self.data
        transform = PILViews(data.augmenter.mean, data.augmenter.std, data.augmenter.flip,
                             data.augmenter.pad_fraction, data.augmenter.randaug_n,
                             data.augmenter.cutout)
        pin = self.device.type == "cuda"
        bs = self.tcfg.batch_size
        ubs = bs * int(self.algo.cfg.uratio)

        def host(tset):
            return (tset.images.permute(0, 2, 3, 1).contiguous().cpu().numpy(),
                    tset.labels.cpu().numpy())

        labeled_views = ("weak", *self.algo.labeled_views)
        self.labeled_loader = make_loader(PILDataset(*host(data.labeled), labeled_views, transform),
                                          bs, num_batches, workers, pin, cfg.seed * 1000 + 11)
        self.unlabeled_loader = None
        if self.algo.unlabeled_views:
            self.unlabeled_loader = make_loader(
                PILDataset(*host(data.unlabeled), self.algo.unlabeled_views, transform),
                ubs, num_batches, workers, pin, cfg.seed * 1000 + 12)
        self._lb_iter = iter(self.labeled_loader)
        self._ulb_iter = iter(self.unlabeled_loader) if self.unlabeled_loader else None

    def _to_device(self, x: Tensor) -> Tensor:
        return x.to(self.device, non_blocking=True)

    def next_batch(self) -> tuple[Batch, Tensor | None]:
        x, *x_views, y, idx = next(self._lb_iter)
        batch = Batch(x_lb=self._prepare(self._to_device(x)), y_lb=self._to_device(y),
                      idx_lb=self._to_device(idx),
                      x_lb_views=[self._prepare(self._to_device(v)) for v in x_views])
        y_ulb = None
        if self._ulb_iter is not None:
            *views, y_u, idx_u = next(self._ulb_iter)
            batch.x_ulb = [self._prepare(self._to_device(v)) for v in views]
            batch.idx_ulb = self._to_device(idx_u)
            y_ulb = self._to_device(y_u)
        return batch, y_ulb

    def close(self) -> None:
        """Stop the worker processes."""
        self._lb_iter = self._ulb_iter = None
        self.labeled_loader = self.unlabeled_loader = None


__all__ = ["PIL_OPS", "ConventionalTrainer", "PILDataset", "PILRandAugment", "PILViews",
           "make_loader", "to_pil"]
