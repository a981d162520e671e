"""Whole datasets on the training device, and seeded epoch-shuffled batch streams over them.

No DataLoader workers and no PIL: a batch is one index_select on device-resident uint8 tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class TensorSet:
    """uint8 images (N, C, H, W) and int64 labels (N,), -1 where the label is unknown."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        """Check dtypes and lengths."""
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels must be int64 of shape ({len(self.images)},), got "
                             f"{self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        """Number of images."""
        return int(self.images.shape[0])

    @property
    def device(self) -> torch.device:
        """Device the tensors live on."""
        return self.images.device

    def to(self, device: torch.device | str) -> TensorSet:
        """A copy on `device` (self when already there)."""
        return TensorSet(self.images.to(device), self.labels.to(device))

    @classmethod
    def from_numpy(cls, images_nhwc: np.ndarray, labels: np.ndarray | None,
                   device: torch.device | str = "cpu") -> TensorSet:
        """Build from uint8 (N, H, W, C) numpy images; labels None means all unknown (-1)."""
        x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
        y = (torch.full((len(images_nhwc),), -1, dtype=torch.int64) if labels is None
             else torch.from_numpy(np.asarray(labels, dtype=np.int64)))
        return cls(x.to(device), y.to(device))


def _init_stream(stream, dataset: TensorSet, batch_size: int, seed: int,
                 device: torch.device | str | None) -> None:
    """The fields every batch stream has: its dataset on its device, batch size and CPU
    generator (checked: a positive batch size, a non-empty dataset)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(dataset) == 0:
        raise ValueError("cannot stream batches from an empty dataset")
    stream.device = torch.device(device) if device is not None else dataset.device
    stream.dataset = dataset if dataset.device == stream.device else dataset.to(stream.device)
    stream.batch_size = int(batch_size)
    stream.generator = torch.Generator(device="cpu").manual_seed(int(seed))


class BatchStream:
    """Endless fixed-size batches, reshuffled every epoch with a private seeded generator.

    Batches wrap across epoch boundaries, so each has exactly `batch_size` items even when
    the set is smaller than a batch; within one epoch every index is visited exactly once.
    Permutations are drawn on the CPU (same result on every device) and moved once per epoch.
    """

    def __init__(self, dataset: TensorSet, batch_size: int, seed: int,
                 device: torch.device | str | None = None):
        _init_stream(self, dataset, batch_size, seed, device)
        self.epoch = 0
        self.position = 0
        self._new_permutation()

    def __len__(self) -> int:
        """Batches per epoch, rounded up."""
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> BatchStream:
        """The stream is its own endless iterator."""
        return self

    def __next__(self) -> tuple[Tensor, Tensor, Tensor]:
        """Same as next()."""
        return self.next()

    def next(self) -> tuple[Tensor, Tensor, Tensor]:
        """(images uint8 (B, C, H, W), labels (B,), indices (B,)) on the stream's device."""
        pieces, need = [], self.batch_size
        while need > 0:
            if self.position == len(self.dataset):
                self.epoch += 1
                self._new_permutation()
            take = min(need, len(self.dataset) - self.position)
            pieces.append(self._perm_dev[self.position:self.position + take])
            self.position += take
            need -= take
        idx = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return self.dataset.images[idx], self.dataset.labels[idx], idx

    def state_dict(self) -> dict:
        """Everything needed to continue the stream exactly: position, permutation, rng."""
        return {"epoch": self.epoch, "position": self.position, "batch_size": self.batch_size,
                "permutation": self._perm.clone(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict(); the next batch equals the one the saved stream would give."""
        perm = torch.as_tensor(state["permutation"], dtype=torch.int64).cpu()
        if perm.numel() != len(self.dataset):
            raise ValueError(f"saved permutation covers {perm.numel()} items, "
                             f"dataset has {len(self.dataset)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.generator.set_state(torch.as_tensor(state["generator"]).cpu())  # map_location-safe
        self._set_permutation(perm)

    def _new_permutation(self) -> None:
        """Draw the next epoch's order and reset the position."""
        self._set_permutation(torch.randperm(len(self.dataset), generator=self.generator))
        self.position = 0

    def _set_permutation(self, perm: Tensor) -> None:
        """Keep the CPU permutation (for state_dict) and its device copy."""
        self._perm = perm
        self._perm_dev = perm.to(self.device, non_blocking=False)


class ClassBalancedStream:
    """Endless class-balanced batches: each item draws a class uniformly among the classes
    present, then an image of it uniformly (class-aware sampling, Shen et al. 2016, as cRT
    re-trains with; i.i.d. draws with replacement). Same interface as ``BatchStream``."""

    def __init__(self, dataset: TensorSet, batch_size: int, seed: int,
                 device: torch.device | str | None = None):
        _init_stream(self, dataset, batch_size, seed, device)
        labels = dataset.labels.cpu()
        self._order = torch.argsort(labels, stable=True)  # indices grouped by class
        classes, counts = torch.unique(labels, return_counts=True)
        self._counts = counts
        self._starts = torch.cumsum(counts, 0) - counts
        self.classes = classes

    def next(self) -> tuple[Tensor, Tensor, Tensor]:
        """(images uint8 (B, C, H, W), labels (B,), indices (B,)) on the stream's device."""
        b = self.batch_size
        cls = torch.randint(len(self.classes), (b,), generator=self.generator)
        within = (torch.rand(b, generator=self.generator) * self._counts[cls]).long()
        within = torch.minimum(within, self._counts[cls] - 1)
        idx = self._order[self._starts[cls] + within].to(self.device)
        return self.dataset.images[idx], self.dataset.labels[idx], idx

    def __next__(self) -> tuple[Tensor, Tensor, Tensor]:
        """Same as next()."""
        return self.next()

    def __iter__(self) -> ClassBalancedStream:
        """The stream is its own endless iterator."""
        return self

    def state_dict(self) -> dict:
        """The generator (the whole state of i.i.d. draws)."""
        return {"sampling": "class_balanced", "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict(); a shuffling stream's state does not fit."""
        if state.get("sampling") != "class_balanced":
            raise ValueError("saved stream is not class-balanced")
        self.generator.set_state(torch.as_tensor(state["generator"]).cpu())


SAMPLINGS = {"shuffle": BatchStream, "class_balanced": ClassBalancedStream}


def make_stream(dataset: TensorSet, batch_size: int, seed: int,
                device: torch.device | str | None = None, sampling: str = "shuffle"):
    """A batch stream of the named sampling: "shuffle" (epochs) or "class_balanced", or the
    stream ``sampling.make(dataset, batch_size, seed, device)`` builds."""
    if not isinstance(sampling, str):
        return sampling.make(dataset, batch_size, seed, device)
    if sampling not in SAMPLINGS:
        raise ValueError(f"labeled sampling must be one of {sorted(SAMPLINGS)}, got {sampling!r}")
    return SAMPLINGS[sampling](dataset, batch_size, seed, device)
