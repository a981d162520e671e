"""Raw datasets as uint8 arrays (N, H, W, C) + int64 labels + class names.

Readers: CIFAR-10/100 ("python version" pickles, no md5 check), STL-10 (torchvision),
scikit-learn's 8x8 digits (embedded, no download) and a user image folder (cached as .npz).

No reader runs code from a data file: the CIFAR pickles go through a restricted unpickler
that admits only what the format holds (dicts, lists, strings, bytes, numbers and numpy
arrays); STL-10 is raw binary read by torchvision with ``np.fromfile``; the image-folder
cache is read with ``allow_pickle=False``.
"""
from __future__ import annotations

import codecs
import hashlib
import os
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imbssl.errors import UserError
from imbssl.fileio import atomic_open

# Per-dataset channel mean/std in [0, 1] units.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # FixMatch / DASO values.
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # DASO normalizes STL-10 with the CIFAR-10 statistics (lib/dataset/transform/build.py).
    "stl10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    # Computed on the digits train split below (uint8-scaled pixels / 255).
    "digits": ((0.3057,), (0.3761,)),
    # Fallback only: build_data computes the statistics of the user's train images.
    "imagefolder": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

CACHE_NAME = ".imbssl_cache.npz"
DECODER_VERSION = 2  # part of the cache fingerprint: 2 = 16-bit images scaled, not clipped
DIGITS_TEST_PER_CLASS = 50


class DataError(UserError):
    """A dataset is missing, incomplete or unreadable; the message says what to do."""


@dataclass
class SourceData:
    """A dataset in memory: uint8 (N, H, W, C) images, int64 labels and class names."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]
    extra_unlabeled_images: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)


def load_source(name: str, root: str | Path = "datasets", download: bool = False) -> SourceData:
    """Load dataset `name` (cifar10|cifar100|stl10|digits|imagefolder) from `root`."""
    loaders: dict[str, Callable[[Path, bool], SourceData]] = {
        "cifar10": lambda r, d: _load_cifar("cifar10", r, d),
        "cifar100": lambda r, d: _load_cifar("cifar100", r, d),
        "stl10": _load_stl10,
        "digits": lambda r, d: load_digits_source(),
        "imagefolder": lambda r, d: load_imagefolder(r),
    }
    if name not in loaders:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(loaders)}")
    return loaders[name](Path(root).expanduser(), bool(download))


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, H, W, C) images in [0, 1] units."""
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    std = np.maximum(x.std(axis=0), 1e-3)  # constant images: avoid dividing by zero
    return tuple(float(v) for v in x.mean(axis=0)), tuple(float(v) for v in std)


# ----------------------------------------------------------------------------- CIFAR

_CIFAR = {
    "cifar10": dict(title="CIFAR-10", folder="cifar-10-batches-py",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    meta="batches.meta", names="label_names", labels="labels", tv="CIFAR10",
                    classes=10, files="data_batch_1 .. data_batch_5, test_batch, batches.meta"),
    "cifar100": dict(title="CIFAR-100", folder="cifar-100-python", train=["train"],
                     test=["test"], meta="meta", names="fine_label_names",
                     labels="fine_labels", tv="CIFAR100", classes=100,
                     files="train, test, meta"),
}
CIFAR_ROW = 3 * 32 * 32  # one image: the R, G and B planes of 32x32 pixels


def _load_cifar(name: str, root: Path, download: bool) -> SourceData:
    """Read the CIFAR python-version pickles under root (downloading them if asked)."""
    spec = _CIFAR[name]
    folder = root / spec["folder"]
    if not folder.is_dir():
        if not download:
            raise DataError(_missing_cifar_message(spec, folder))
        _torchvision_download(spec, root)
    # labels and names both checked against the class count, so against each other too
    k = spec["classes"]
    train_x, train_y = _read_cifar_batches(folder, spec["train"], spec["labels"], k)
    test_x, test_y = _read_cifar_batches(folder, spec["test"], spec["labels"], k)
    names = _read_class_names(folder / spec["meta"], spec["names"], k)
    return SourceData(train_x, train_y, test_x, test_y, names)


def _missing_cifar_message(spec: dict, folder: Path) -> str:
    """The one error for a missing CIFAR folder, naming both ways to get the data."""
    return (f"{spec['title']} not found: expected the python-version folder {folder} "
            f"(files {spec['files']}). Either set dataset.download=true to download it "
            f"through torchvision, or put the files there.")


def _read_class_names(path: Path, key: str, num_classes: int) -> list[str]:
    """The class names of a CIFAR meta file: exactly ``num_classes`` strings."""
    names = _get_key(_read_pickle(path), key, path)
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path} is corrupted: {key!r} must be a list of class-name strings, "
                        f"got {_kind(names)}")
    if len(names) != num_classes:
        raise DataError(f"{path} is corrupted: {key!r} holds {len(names)} class names but the "
                        f"dataset has {num_classes} classes; delete it and get the dataset again")
    return list(names)


def _torchvision_download(spec: dict, root: Path) -> None:
    """Download and extract a CIFAR archive into root through torchvision."""
    import torchvision.datasets as tvd

    try:
        getattr(tvd, spec["tv"])(str(root), train=True, download=True)
    except Exception as exc:  # network errors come in many types
        raise DataError(f"downloading {spec['title']} into {root} failed: {exc}") from exc


def _read_cifar_batches(folder: Path, files: list[str], label_key: str, num_classes: int):
    """Concatenate the images (N, 32, 32, 3) uint8 and int64 labels of some batch files."""
    xs, ys = [], []
    for fname in files:
        path = folder / fname
        batch = _read_pickle(path)
        data = _integer_array(_get_key(batch, "data", path), path, "data", 0, 256)
        labels = _integer_array(_get_key(batch, label_key, path), path, label_key, 0,
                                num_classes)
        if data.ndim != 2 or data.shape[1] != CIFAR_ROW or labels.ndim != 1 \
                or len(data) != len(labels):
            raise DataError(f"{path} is corrupted: data has shape {data.shape} for "
                            f"{len(labels)} labels, expected (N, {CIFAR_ROW})")
        # Rows are channel-major (R plane, G plane, B plane), 32x32 each.
        xs.append(data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(labels.astype(np.int64))
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


def _integer_array(value, path: Path, key: str, low: int, high: int) -> np.ndarray:
    """``value`` as an integer array whose entries lie in [low, high), else a DataError that
    names the file, the entry and the first bad value."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:  # ragged nested lists, ...
        raise DataError(f"{path} is corrupted: {key!r} is not an array ({exc})") from None
    if arr.dtype.kind not in "iu":
        raise DataError(f"{path} is corrupted: {key!r} must hold integers, got "
                        f"{_kind(value)} of {arr.dtype}; delete it and get the dataset again")
    if arr.dtype == np.uint8 and low <= 0 and high >= 256:
        return arr  # the official files' pixels: in range by their type
    bad = (arr < low) | (arr >= high)
    if bad.any():
        what = "pixel values" if key == "data" else "class labels"
        raise DataError(f"{path} is corrupted: {key!r} holds {int(bad.sum())} {what} outside "
                        f"[{low}, {high - 1}] (first: {arr[bad].flat[0]}); delete it and get "
                        f"the dataset again")
    return arr


def _kind(value) -> str:
    """A short description of a value read from a data file."""
    if isinstance(value, list | tuple) and value:
        return f"a {type(value).__name__} of {type(value[0]).__name__}"
    return f"a {type(value).__name__}"


# The only globals a CIFAR pickle refers to: numpy's array reconstruction (numpy 1 writes
# numpy.core, numpy 2 numpy._core; protocol 5 rebuilds arrays with _frombuffer; protocol-2
# pickles written by Python 3 store bytes through _codecs.encode). Resolved to the objects
# this numpy uses, whatever module name the file was written with.
_NUMPY_GLOBALS = {
    "_reconstruct": np.ndarray((0,)).__reduce__()[0],
    "_frombuffer": np.ndarray((0,)).__reduce_ex__(5)[0],
    "scalar": np.float64(0).__reduce__()[0],
    "dtype": np.dtype,
}
_NUMPY_MODULES = {"numpy", "numpy.core.multiarray", "numpy._core.multiarray",
                  "numpy.core.numeric", "numpy._core.numeric"}


class _RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global that a CIFAR file never holds."""


class _OversizedArray(pickle.UnpicklingError):
    """The pickle declares an array larger than the file could hold."""


class _NdarrayType:
    """Stands for ``numpy.ndarray`` in a pickle: an argument of ``_reconstruct`` only. Called
    directly it would allocate an array of any declared shape from a few bytes of file."""

    def __new__(cls, shape=None, *args, **kwargs):
        raise _OversizedArray(f"an array of shape {shape!r:.60} without its data (numpy.ndarray "
                              f"called directly)")


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain containers, strings, bytes, numbers and arrays,
    and no array larger than the file it reads (``max_bytes``)."""

    def __init__(self, file, max_bytes: int, **kwargs):
        super().__init__(file, **kwargs)
        self.max_bytes = max_bytes

    def find_class(self, module: str, name: str):
        if module in _NUMPY_MODULES and name == "ndarray":
            return _NdarrayType
        if module in _NUMPY_MODULES and name == "_reconstruct":
            return self._reconstruct
        if module in _NUMPY_MODULES and name in _NUMPY_GLOBALS:
            return _NUMPY_GLOBALS[name]
        if (module, name) == ("_codecs", "encode"):
            return codecs.encode
        raise _RefusedGlobal(repr(f"{module}.{name}")[:100])

    def _reconstruct(self, subtype, shape, dtype_code):
        """numpy's ``_reconstruct(ndarray, shape, dtype)``, which allocates ``shape`` before
        ``__setstate__`` brings the data: the declared size is checked against the file."""
        if subtype is not _NdarrayType:
            raise _RefusedGlobal(f"_reconstruct of {subtype!r}"[:100])
        try:
            count = int(np.prod(np.asarray(shape, dtype=np.int64), dtype=np.float64))
        except (TypeError, ValueError, OverflowError):
            raise _OversizedArray(f"an array of shape {shape!r:.60}") from None
        if count > self.max_bytes:  # every element takes at least one byte of the file
            raise _OversizedArray(f"an array of shape {tuple(shape)!r:.60} ({count:,} "
                                  f"elements) in a file of {self.max_bytes:,} bytes, more "
                                  f"than the file holds")
        return _NUMPY_GLOBALS["_reconstruct"](np.ndarray, shape, dtype_code)


def _read_pickle(path: Path) -> dict:
    """Unpickle one CIFAR file (latin1) without running code from it; any failure becomes a
    one-line DataError."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            obj = _CifarUnpickler(f, max_bytes=size, encoding="latin1").load()
    except FileNotFoundError as exc:
        raise DataError(f"missing file {path}; the dataset folder is incomplete") from exc
    except _RefusedGlobal as exc:
        raise DataError(f"{path} is not a CIFAR data file: it refers to {exc}, which could "
                        f"run code or allocate memory without data; refused without loading "
                        f"it. Delete it and get the dataset again") from None
    except _OversizedArray as exc:
        raise DataError(f"{path} is corrupted: it declares {exc}; refused before allocating "
                        f"it. Delete it and get the dataset again") from None
    except Exception as exc:  # UnpicklingError, EOFError, ValueError, MemoryError, ...
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise DataError(f"{path} is corrupted or truncated ({type(exc).__name__}: {msg}); "
                        f"delete it and get the dataset again") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path} is corrupted: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _get_key(d: dict, key: str, path: Path):
    """d[key], or a DataError naming the file when the key is missing."""
    if key not in d:
        raise DataError(f"{path} is corrupted: it has no {key!r} entry")
    return d[key]


# ----------------------------------------------------------------------------- STL-10

def _load_stl10(root: Path, download: bool) -> SourceData:
    """STL-10 through torchvision: 5k labeled train, 8k test, 100k unlabeled (CHW -> HWC)."""
    folder = root / "stl10_binary"
    if not folder.is_dir() and not download:
        raise DataError(f"STL-10 not found: expected {folder}. Set dataset.download=true to "
                        f"download it through torchvision, or put the stl10_binary folder there.")
    import torchvision.datasets as tvd

    try:
        train = tvd.STL10(str(root), split="train", download=download)
        test = tvd.STL10(str(root), split="test")
        unlabeled = tvd.STL10(str(root), split="unlabeled")
    except RuntimeError as exc:
        raise DataError(f"STL-10 under {folder} is incomplete or corrupted ({exc})") from exc
    return SourceData(
        train_images=_chw_to_hwc(train.data), train_labels=np.asarray(train.labels, np.int64),
        test_images=_chw_to_hwc(test.data), test_labels=np.asarray(test.labels, np.int64),
        class_names=list(getattr(train, "classes", [str(i) for i in range(10)])),
        extra_unlabeled_images=_chw_to_hwc(unlabeled.data),
    )


def _chw_to_hwc(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> contiguous uint8 (N, H, W, C)."""
    return np.ascontiguousarray(np.asarray(x, dtype=np.uint8).transpose(0, 2, 3, 1))


# ----------------------------------------------------------------------------- digits

def load_digits_source() -> SourceData:
    """scikit-learn's 8x8 digits scaled to uint8; 50 images per class held out as test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # 0..16 -> 0..255
    labels = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    test_idx = np.sort(np.concatenate([
        rng.permutation(np.flatnonzero(labels == c))[:DIGITS_TEST_PER_CLASS] for c in range(10)
    ]))
    is_train = np.ones(len(labels), dtype=bool)
    is_train[test_idx] = False
    return SourceData(images[is_train], labels[is_train], images[test_idx], labels[test_idx],
                      [str(c) for c in range(10)])


# ----------------------------------------------------------------------------- image folder

_LAYOUT = "root/train/<class>/<image files> and root/test/<class>/<image files>"


def load_imagefolder(root: str | Path) -> SourceData:
    """Users' images under root/{train,test}/<class>/, decoded once and cached as an .npz."""
    root = Path(root)
    if not (root / "train").is_dir():
        raise DataError(f"image folder {root} has no train/ subfolder; expected {_LAYOUT}")
    class_names = _visible_dirs(root / "train")
    if not class_names:
        raise DataError(f"{root / 'train'} has no class subfolders; expected {_LAYOUT}")
    files = {s: _list_split(root, s, class_names) for s in ("train", "test")}
    fingerprint = _fingerprint(root, files)
    cached = _read_cache(root / CACHE_NAME, fingerprint)
    if cached is not None:
        return cached
    paths = [p for s in ("train", "test") for p, _ in files[s]]
    images = _decode_all(paths)
    n_train = len(files["train"])
    src = SourceData(images[:n_train], np.array([y for _, y in files["train"]], np.int64),
                     images[n_train:], np.array([y for _, y in files["test"]], np.int64),
                     class_names)
    _write_cache(root / CACHE_NAME, fingerprint, src)
    return src


def _visible_dirs(folder: Path) -> list[str]:
    """Sorted names of the non-hidden subfolders."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_split(root: Path, split: str, class_names: list[str]) -> list[tuple[Path, int]]:
    """(file, class index) pairs of one split, in sorted order."""
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"image folder {root} has no {split}/ subfolder; expected {_LAYOUT}")
    unknown = sorted(set(_visible_dirs(folder)) - set(class_names))
    if unknown:
        raise DataError(f"{folder} has class folders {unknown} that train/ does not have")
    out = []
    for idx, name in enumerate(class_names):
        cdir = folder / name
        if cdir.is_dir():
            out += [(p, idx) for p in sorted(cdir.iterdir())
                    if p.is_file() and not p.name.startswith(".")]
    if split == "train" and not out:
        raise DataError(f"{folder} contains no image files; expected {_LAYOUT}")
    return out


def _fingerprint(root: Path, files: dict) -> str:
    """A hash of every file's relative path, size and modification time."""
    h = hashlib.sha1(f"decoder {DECODER_VERSION}\n".encode())
    for split in ("train", "test"):
        for path, label in files[split]:
            st = path.stat()
            h.update(f"{path.relative_to(root)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


#: Pillow modes of 16-bit single-channel images (PNG, TIFF, PGM): scaled to 8 bits, not clipped
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
#: Pillow modes with no 8-bit meaning (32-bit integer or float pixels): refused
_UNSUPPORTED_MODES = ("I", "F", "I;32", "I;32B", "I;32L", "F;32", "F;32B")


def _decode_all(paths: list[Path]) -> np.ndarray:
    """Decode every file to RGB uint8; all must share the first file's size."""
    out = None
    for i, path in enumerate(paths):
        arr = decode_image(path)
        if out is None:
            out = _allocate_images(len(paths), arr.shape, path)
        elif arr.shape != out.shape[1:]:
            raise DataError(
                f"{path} is {arr.shape[1]}x{arr.shape[0]} but {paths[0]} is "
                f"{out.shape[2]}x{out.shape[1]}: all images must have the same size")
        out[i] = arr
    return out


def decode_image(path: Path) -> np.ndarray:
    """One image file as RGB uint8 (H, W, 3). 16-bit images keep their high byte (``v >> 8``:
    65535 -> 255, as Pillow decodes 16-bit colour PNGs), never clipped; a header larger than Pillow's
    decompression-bomb limit, or 32-bit / float pixels, is a DataError (nothing decoded)."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.mode in _UNSUPPORTED_MODES:
                    raise DataError(f"{path} has {im.mode!r} pixels (32-bit integer or float); "
                                    f"imbssl reads 8- and 16-bit images: convert it to 8-bit")
                if im.mode in _SIXTEEN_BIT_MODES:
                    gray = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)
                    return np.repeat(gray[..., None], 3, axis=2)
                return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{path} declares an image too large to decode safely ({exc}); resize "
                        f"it or remove it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path} is not a readable image file ({exc})") from exc


def _allocate_images(count: int, shape: tuple[int, ...], first: Path) -> np.ndarray:
    """The (count, H, W, 3) uint8 array for every image, refused when it would not fit in
    this machine's memory."""
    need = count * int(np.prod(shape))
    have = _physical_memory()
    if have and need > have // 2:
        raise DataError(f"decoding {count} images of {shape[1]}x{shape[0]} (the size of "
                        f"{first}) needs {need / 2**30:.1f} GiB, more than half of this "
                        f"machine's {have / 2**30:.1f} GiB; resize the images first")
    return np.empty((count, *shape), dtype=np.uint8)


def _physical_memory() -> int:
    """Bytes of physical memory (0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _read_cache(path: Path, fingerprint: str) -> SourceData | None:
    """The cached arrays when the cache exists and matches the current file list."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != fingerprint:
                return None
            return SourceData(z["train_images"], z["train_labels"], z["test_images"],
                              z["test_labels"], [str(n) for n in z["class_names"]])
    except Exception:  # a broken cache is simply rebuilt
        return None


def _write_cache(path: Path, fingerprint: str, src: SourceData) -> None:
    """Write the decoded arrays atomically next to the images; a folder that cannot take
    the cache (a read-only data mount, a full disk) trains without it, with a warning."""
    try:
        with atomic_open(path) as f:
            np.savez(f, fingerprint=np.array(fingerprint),
                     class_names=np.array(src.class_names),
                     train_images=src.train_images, train_labels=src.train_labels,
                     test_images=src.test_images, test_labels=src.test_labels)
    except (OSError, RuntimeError) as exc:  # DiskFullError is a RuntimeError
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        warnings.warn(f"could not write the decoded-image cache {path} ({first}); training "
                      "goes on without it (each run decodes the images again)", stacklevel=2)
