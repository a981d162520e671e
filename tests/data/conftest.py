"""Shared fixtures for the data-layer tests: miniature CIFAR copies in the official layout."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest


def _rows(images_nhwc: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> (N, 3072) channel-major rows, as in the official pickles."""
    return np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), -1))


def _dump(path: Path, obj: dict) -> None:
    """Pickle obj to path."""
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10_mini(root: Path, per_class: int = 6, test_per_class: int = 2, seed: int = 0):
    """Write <root>/cifar-10-batches-py with per_class train images per class; return arrays."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    y = rng.permutation(np.repeat(np.arange(10), per_class))
    x = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
    for b, idx in enumerate(np.array_split(np.arange(len(y)), 5)):
        _dump(folder / f"data_batch_{b + 1}", {"batch_label": f"training batch {b + 1} of 5",
                                               "labels": y[idx].tolist(), "data": _rows(x[idx]),
                                               "filenames": [f"{i}.png" for i in idx]})
    ty = np.repeat(np.arange(10), test_per_class)
    tx = rng.integers(0, 256, (len(ty), 32, 32, 3), dtype=np.uint8)
    _dump(folder / "test_batch", {"labels": ty.tolist(), "data": _rows(tx)})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    _dump(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": len(y) // 5})
    return x, y, tx, ty, names


def write_cifar100_mini(root: Path, per_class: int = 3, seed: int = 0):
    """Write <root>/cifar-100-python (train, test, meta) with fine and coarse labels."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True)
    out = []
    for split, n in (("train", per_class), ("test", 1)):
        y = rng.permutation(np.repeat(np.arange(100), n))
        x = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
        _dump(folder / split, {"fine_labels": y.tolist(), "coarse_labels": (y // 5).tolist(),
                               "data": _rows(x), "filenames": [f"{i}.png" for i in range(len(y))]})
        out += [x, y]
    names = [f"class_{i:02d}" for i in range(100)]
    _dump(folder / "meta", {"fine_label_names": names,
                            "coarse_label_names": [f"super_{i}" for i in range(20)]})
    return (*out, names)


@pytest.fixture
def cifar10_mini(tmp_path):
    """(root, train_x, train_y, test_x, test_y, names) of a miniature CIFAR-10 copy."""
    return (tmp_path, *write_cifar10_mini(tmp_path))


@pytest.fixture
def cifar100_mini(tmp_path):
    """(root, train_x, train_y, test_x, test_y, names) of a miniature CIFAR-100 copy."""
    return (tmp_path, *write_cifar100_mini(tmp_path))


@pytest.fixture
def cifar10_writer():
    """The miniature CIFAR-10 writer, for tests that need it inside a fake download."""
    return write_cifar10_mini
