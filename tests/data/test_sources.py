"""Dataset readers (CIFAR, STL-10, digits, image folder), build_data and the Hydra configs."""
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from imbssl.data import DataBundle, DatasetConfig, build_data
from imbssl.data import sources as S
from imbssl.data.sources import NORMALIZATION, DataError, SourceData, load_source

REPO = Path(__file__).resolve().parents[2]


def real_cifar10_root():
    """Directory containing cifar-10-batches-py (env IMBSSL_CIFAR10_ROOT or datasets/), or None."""
    for root in (os.environ.get("IMBSSL_CIFAR10_ROOT"), REPO / "datasets"):
        if root and (Path(root) / "cifar-10-batches-py" / "test_batch").is_file():
            return Path(root)
    return None


# ----------------------------------------------------------------------------- CIFAR

def test_cifar10_mini_roundtrip(cifar10_mini):
    root, x, y, tx, ty, names = cifar10_mini
    src = load_source("cifar10", root)
    assert src.train_images.dtype == np.uint8 and src.train_images.shape == (60, 32, 32, 3)
    np.testing.assert_array_equal(src.train_images, x)  # channel-major rows decoded to HWC
    np.testing.assert_array_equal(src.train_labels, y)
    np.testing.assert_array_equal(src.test_images, tx)
    np.testing.assert_array_equal(src.test_labels, ty)
    assert src.train_labels.dtype == np.int64 and src.class_names == names
    assert src.extra_unlabeled_images is None and src.num_classes == 10


def test_cifar100_mini_roundtrip(cifar100_mini):
    root, x, y, tx, ty, names = cifar100_mini
    src = load_source("cifar100", root)
    np.testing.assert_array_equal(src.train_images, x)
    np.testing.assert_array_equal(src.train_labels, y)  # fine labels, not coarse
    np.testing.assert_array_equal(src.test_images, tx)
    np.testing.assert_array_equal(src.test_labels, ty)
    assert src.class_names == names and len(names) == 100


@pytest.mark.skipif(real_cifar10_root() is None,
                    reason="real CIFAR-10 not materialized (python ../shared/data/materialize.py "
                           "datasets/ or set IMBSSL_CIFAR10_ROOT)")
def test_real_cifar10():
    src = load_source("cifar10", real_cifar10_root())
    assert src.train_images.shape == (50000, 32, 32, 3)
    assert src.test_images.shape == (10000, 32, 32, 3)
    assert np.bincount(src.train_labels).tolist() == [5000] * 10
    assert np.bincount(src.test_labels).tolist() == [1000] * 10
    assert src.class_names[0] == "airplane" and src.class_names[9] == "truck"
    # Natural images: neighbouring pixels correlate strongly only when HWC is decoded right.
    img = src.train_images[:200].astype(np.float64)
    horiz = np.corrcoef(img[:, :, :-1, 0].ravel(), img[:, :, 1:, 0].ravel())[0, 1]
    assert horiz > 0.8


@pytest.mark.parametrize(("name", "folder"), [("cifar10", "cifar-10-batches-py"),
                                              ("cifar100", "cifar-100-python")])
def test_cifar_missing_folder(tmp_path, name, folder):
    with pytest.raises(DataError) as err:
        load_source(name, tmp_path)
    msg = str(err.value)
    assert str(tmp_path / folder) in msg and "dataset.download=true" in msg
    assert "put the files there" in msg
    # only what a user has: no script or path outside the repository (issue 28)
    assert "materialize" not in msg and "../" not in msg and "shared" not in msg


def test_cifar_truncated_pickle(cifar10_mini):
    root = cifar10_mini[0]
    path = root / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError) as err:
        load_source("cifar10", root)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_cifar_garbage_and_missing_files(cifar10_mini):
    root = cifar10_mini[0]
    folder = root / "cifar-10-batches-py"
    (folder / "test_batch").write_bytes(os.urandom(2000))
    with pytest.raises(DataError, match="test_batch"):
        load_source("cifar10", root)
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="missing file .*test_batch"):
        load_source("cifar10", root)


def test_cifar_wrong_content(cifar10_mini):
    root = cifar10_mini[0]
    path = root / "cifar-10-batches-py" / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({"labels": [1, 2], "data": np.zeros((2, 100), np.uint8)}, f)
    with pytest.raises(DataError, match="data_batch_1 is corrupted"):
        load_source("cifar10", root)


def test_cifar_download_through_torchvision(tmp_path, monkeypatch, cifar10_writer):
    import torchvision.datasets as tvd

    calls = []

    def fake_cifar10(root, train=True, download=False):
        calls.append((root, train, download))
        cifar10_writer(Path(root))

    monkeypatch.setattr(tvd, "CIFAR10", fake_cifar10)
    src = load_source("cifar10", tmp_path, download=True)
    assert calls == [(str(tmp_path), True, True)] and len(src.train_labels) == 60
    load_source("cifar10", tmp_path, download=True)  # present now: no second download
    assert len(calls) == 1


# ----------------------------------------------------------------------------- STL-10

class FakeSTL10:
    """Stands in for torchvision.datasets.STL10 with tiny CHW arrays."""

    sizes = {"train": 50, "test": 20, "unlabeled": 30}

    def __init__(self, root, split="train", download=False):
        n = self.sizes[split]
        rng = np.random.default_rng(len(split))
        self.data = rng.integers(0, 256, (n, 3, 6, 6), dtype=np.uint8)
        self.labels = (np.full(n, -1) if split == "unlabeled" else np.arange(n) % 10)
        self.classes = [f"c{i}" for i in range(10)]


def test_stl10_through_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    monkeypatch.setattr(tvd, "STL10", FakeSTL10)
    (tmp_path / "stl10_binary").mkdir()
    src = load_source("stl10", tmp_path)
    ref = FakeSTL10(tmp_path, "train")
    assert src.train_images.shape == (50, 6, 6, 3)
    np.testing.assert_array_equal(src.train_images, ref.data.transpose(0, 2, 3, 1))
    assert src.extra_unlabeled_images.shape == (30, 6, 6, 3)
    assert src.test_images.shape == (20, 6, 6, 3) and src.class_names[0] == "c0"

    cfg = DatasetConfig(name="stl10", root=str(tmp_path), n1=5, gamma_l=5, flip=True)
    bundle = build_data(cfg, "cpu")
    assert bundle.unlabeled_counts is None and len(bundle.unlabeled) == 30
    assert (bundle.unlabeled.labels == -1).all()
    assert bundle.labeled_counts == [5, 4, 3, 2, 2, 2, 1, 1, 1, 1]
    assert bundle.image_shape == (3, 6, 6)


def test_stl10_missing(tmp_path):
    with pytest.raises(DataError, match="stl10_binary.*dataset.download=true"):
        load_source("stl10", tmp_path)


# ----------------------------------------------------------------------------- digits

def test_digits_source():
    src = load_source("digits", "/nonexistent")  # needs no files
    assert src.train_images.shape[1:] == (8, 8, 1) and src.train_images.dtype == np.uint8
    assert len(src.train_labels) + len(src.test_labels) == 1797
    assert np.bincount(src.test_labels).tolist() == [50] * 10
    train_counts = np.bincount(src.train_labels)
    assert train_counts.min() >= 124 and train_counts.max() <= 133
    assert src.train_images.max() == 255 and src.train_images.min() == 0
    assert set(np.unique(src.train_images).tolist()) <= {round(v * 255 / 16) for v in range(17)}
    again = load_source("digits")
    np.testing.assert_array_equal(src.test_images, again.test_images)
    mean, std = S.channel_stats(src.train_images)
    assert NORMALIZATION["digits"][0][0] == pytest.approx(mean[0], abs=1e-4)
    assert NORMALIZATION["digits"][1][0] == pytest.approx(std[0], abs=1e-4)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_source("mnist")


# ----------------------------------------------------------------------------- image folder

def _write_images(root: Path, layout: dict, size=(5, 4)):
    """layout: {"train/a": n, ...} -> PNG files with distinct pixel values."""
    from PIL import Image

    k = 0
    for sub, n in layout.items():
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", size, (k, 2 * k % 256, 3)).save(root / sub / f"{i:03d}.png")
            k += 1


def test_imagefolder_load_and_cache(tmp_path, monkeypatch):
    _write_images(tmp_path, {"train/cat": 3, "train/ant": 2, "test/cat": 1})
    src = load_source("imagefolder", tmp_path)
    assert src.class_names == ["ant", "cat"]
    assert src.train_images.shape == (5, 4, 5, 3) and src.test_images.shape == (1, 4, 5, 3)
    assert src.train_labels.tolist() == [0, 0, 1, 1, 1] and src.test_labels.tolist() == [1]
    assert src.train_images[0, 0, 0].tolist() == [3, 6, 3]  # first "ant" file, as written
    assert (tmp_path / S.CACHE_NAME).is_file()

    def no_decode(paths):
        raise AssertionError("cache not used")

    monkeypatch.setattr(S, "_decode_all", no_decode)
    cached = load_source("imagefolder", tmp_path)
    np.testing.assert_array_equal(cached.train_images, src.train_images)
    monkeypatch.undo()
    _write_images(tmp_path, {"test/ant": 1})  # the file list changed: rebuilt
    assert load_source("imagefolder", tmp_path).test_labels.tolist() == [0, 1]


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="no train/ subfolder"):
        load_source("imagefolder", tmp_path)
    _write_images(tmp_path, {"train/a": 2, "train/b": 1, "test/a": 1})
    bad = tmp_path / "train" / "b" / "notes.txt"
    bad.write_text("not an image")
    with pytest.raises(DataError, match=f"{bad}.*not a readable image"):
        load_source("imagefolder", tmp_path)
    bad.unlink()
    _write_images(tmp_path / "train" / "b", {"x": 1}, size=(7, 7))
    odd = tmp_path / "train" / "b" / "x" / "000.png"
    odd.replace(tmp_path / "train" / "b" / "zzz.png")
    with pytest.raises(DataError, match="zzz.png is 7x7 but .* is 5x4"):
        load_source("imagefolder", tmp_path)


def test_imagefolder_build_data(tmp_path):
    _write_images(tmp_path, {"train/a": 6, "train/b": 6, "test/a": 2, "test/b": 2})
    bundle = build_data(DatasetConfig(name="imagefolder", root=str(tmp_path), n1=4, m1=2,
                                      gamma_l=2, gamma_u=2), "cpu")
    assert bundle.labeled_counts == [4, 2] and bundle.unlabeled_counts == [2, 1]
    assert bundle.image_shape == (3, 4, 5) and len(bundle.test) == 4
    assert bundle.augmenter.mean != NORMALIZATION["imagefolder"][0]  # computed statistics


# ----------------------------------------------------------------------------- build_data

def test_build_data_digits_defaults():
    bundle = build_data(DatasetConfig(), torch.device("cpu"))
    assert isinstance(bundle, DataBundle)
    assert bundle.num_classes == 10 and bundle.image_shape == (1, 8, 8)
    assert bundle.labeled_counts == [30, 23, 17, 13, 10, 8, 6, 5, 3, 3]
    assert bundle.unlabeled_counts == [90, 69, 53, 41, 32, 25, 19, 15, 11, 9]
    assert bundle.valid is None and len(bundle.test) == 500
    lab, unl = bundle.labeled, bundle.unlabeled
    assert lab.images.dtype == torch.uint8 and lab.images.shape == (118, 1, 8, 8)
    assert torch.bincount(unl.labels).tolist() == bundle.unlabeled_counts  # true labels kept
    assert bundle.augmenter.flip is False
    assert bundle.augmenter.mean == NORMALIZATION["digits"][0]


def test_build_data_cifar_mini_with_validation(cifar10_mini):
    root = cifar10_mini[0]
    cfg = {"name": "cifar10", "root": str(root), "n1": 3, "m1": 2, "gamma_l": 3.0,
           "gamma_u": 2.0, "reverse_unlabeled": True, "num_valid_per_class": 1, "seed": 4,
           "flip": True}
    bundle = build_data(cfg, "cpu")
    assert bundle.labeled_counts == [3, 2, 2, 2, 1, 1, 1, 1, 1, 1]
    assert bundle.unlabeled_counts == [1, 1, 1, 1, 1, 1, 1, 1, 1, 2]
    assert torch.bincount(bundle.valid.labels).tolist() == [1] * 10
    assert bundle.image_shape == (3, 32, 32) and bundle.augmenter.flip
    x = cifar10_mini[1]  # every labeled image is one of the source images, as CHW
    first = bundle.labeled.images[0].permute(1, 2, 0).numpy()
    assert any(np.array_equal(first, img) for img in x)


@pytest.mark.parametrize("fill", [0, 128])
def test_build_data_geometric_fill(fill):
    bundle = build_data(DatasetConfig(geometric_fill=fill), torch.device("cpu"))
    assert bundle.augmenter.geometric_fill == fill
    assert DatasetConfig().geometric_fill == 128  # FixMatch's fill stays the default


@pytest.mark.parametrize("bad", [-1, 256, 0.5, True])
def test_build_data_geometric_fill_rejects_non_gray_levels(bad):
    with pytest.raises(DataError, match="geometric_fill"):
        build_data({"geometric_fill": bad}, torch.device("cpu"))


def test_build_data_errors_name_the_class(cifar10_mini):
    cfg = DatasetConfig(name="cifar10", root=str(cifar10_mini[0]), n1=5, m1=2, gamma_l=1,
                        gamma_u=1)
    with pytest.raises(ValueError, match="class 0 has 6 images .* 5 labeled \\+ 2 unlabeled"):
        build_data(cfg, "cpu")


# ----------------------------------------------------------------------------- configs

CONFIGS = {"cifar10_lt": ("cifar10", 1500, 3000, 100.0, 500, True),
           "cifar100_lt": ("cifar100", 150, 300, 10.0, 50, True),
           "stl10": ("stl10", 450, 0, 10.0, 0, True),
           "digits_lt": ("digits", 30, 90, 10.0, 0, False),
           "imagefolder": ("imagefolder", 100, 200, 10.0, 0, True)}


def test_dataset_configs_compose():
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(group="dataset", name="dataset_schema", node=DatasetConfig)
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        for name, (ds, n1, m1, gamma_l, valid, flip) in CONFIGS.items():
            cfg = compose(overrides=[f"+dataset={name}", "+seed=7"])
            d = OmegaConf.to_object(cfg.dataset)
            assert isinstance(d, DatasetConfig)
            assert (d.name, d.n1, d.m1, d.gamma_l) == (ds, n1, m1, gamma_l)
            assert (d.num_valid_per_class, d.flip, d.seed) == (valid, flip, 7)
            assert d.root.startswith("datasets") and d.download is False


def test_digits_config_matches_schema_defaults():
    from omegaconf import OmegaConf

    raw = OmegaConf.load(REPO / "configs" / "dataset" / "digits_lt.yaml")
    assert list(raw.defaults) == ["dataset_schema", "_self_"]
    defaults = DatasetConfig()
    for key in DatasetConfig.__dataclass_fields__:
        if key != "seed":
            assert raw[key] == getattr(defaults, key), key


def test_image_size_resizes_every_split_once():
    """dataset.image_size resizes train, test and extra unlabeled images (STL-10 -> 32x32)."""
    import dataclasses

    from imbssl.data import resized

    rng = np.random.default_rng(0)
    src = SourceData(train_images=rng.integers(0, 256, (6, 12, 12, 3), dtype=np.uint8),
                     train_labels=np.arange(6) % 2,
                     test_images=np.full((4, 12, 12, 3), 200, dtype=np.uint8),
                     test_labels=np.arange(4) % 2, class_names=["a", "b"],
                     extra_unlabeled_images=np.zeros((5, 12, 12, 3), dtype=np.uint8))
    out = resized(src, 4)
    assert out.train_images.shape == (6, 4, 4, 3) and out.train_images.dtype == np.uint8
    assert out.test_images.shape == (4, 4, 4, 3) and (out.test_images == 200).all()
    assert out.extra_unlabeled_images.shape == (5, 4, 4, 3)
    assert (out.extra_unlabeled_images == 0).all()
    assert resized(src, 0) is src and resized(src, 12) is src
    assert dataclasses.asdict(out)["class_names"] == ["a", "b"]
    with pytest.raises(DataError, match="image_size"):
        resized(src, -1)


# ----------------------------------------------------------------------------- safe unpickling

class _RunsCode:
    """Unpickling this calls exec(): it creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("where", ["top", "nested"])
def test_cifar_pickle_that_would_run_code_is_refused(cifar10_mini, tmp_path, protocol, where):
    root = cifar10_mini[0]
    path = root / "cifar-10-batches-py" / "data_batch_1"
    marker = tmp_path / "code_ran"
    evil = _RunsCode(marker)
    obj = evil if where == "top" else {"labels": [1, evil], "data": np.zeros((2, 3072), np.uint8)}
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    pickle.loads(path.read_bytes())                     # the file does run code when trusted
    assert marker.exists()
    marker.unlink()
    with pytest.raises(DataError) as err:
        load_source("cifar10", root)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "refused" in msg
    assert "builtins.exec'" in msg or "__builtin__.exec'" in msg  # protocol < 3 writes Python 2's
    assert not marker.exists()                          # nothing ran


def test_cifar_other_globals_are_refused(cifar10_mini):
    root = cifar10_mini[0]
    path = root / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({"labels": {1, 2}, "data": Path("x")}, protocol=2))
    with pytest.raises(DataError, match=r"test_batch is not a CIFAR data file: it refers to "
                                        r"'(__builtin__|builtins)\.set'"):
        load_source("cifar10", root)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_cifar_pickles_of_every_protocol_and_numpy_1_names_load(cifar10_mini, protocol):
    root, x, y, tx, ty, names = cifar10_mini
    folder = root / "cifar-10-batches-py"
    for path in folder.iterdir():
        raw = pickle.dumps(pickle.loads(path.read_bytes()), protocol=protocol)
        if protocol < 4 and path.name != "batches.meta":  # the names numpy 1 writes (and
            assert b"numpy._core.multiarray" in raw               # the original CIFAR files)
            raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        path.write_bytes(raw)
    src = load_source("cifar10", root)
    np.testing.assert_array_equal(src.train_images, x)
    np.testing.assert_array_equal(src.train_labels, y)
    np.testing.assert_array_equal(src.test_images, tx)
    assert src.class_names == names


def test_other_loaders_do_not_unpickle():
    """The image-folder cache and checkpoints are read without pickle."""
    import inspect

    from imbssl.engine import checkpoint

    assert "allow_pickle=False" in inspect.getsource(S._read_cache)
    assert "weights_only=True" in inspect.getsource(checkpoint)
    assert "pickle.load(" not in inspect.getsource(S)
