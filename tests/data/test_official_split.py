"""dataset.split_protocol=official_daso draws the official DASO code's images for a seed.

Reference values: computed once by running the official functions (github.com/ytaek-oh/daso
at commit 3541a6c452f895056f5fdac440b5d0c557dea9f0, lib/dataset/utils.py: split_trainval,
x_u_split, make_imbalance, called in the order of lib/dataset/cifar10.py and cifar100.py with
NUM_VALID 5000) on label arrays whose "images" were the indices 0..N-1. Each part (labeled,
unlabeled, validation) is stored as (size, sum of the indices, the first 16 hex digits of the
sha256 of the sorted indices as little-endian int64).

Label arrays: the train labels of the CIFAR-10 copy that the shared ``materialize.py`` writes
(real CIFAR-10 images in that script's own train order, fixed by its seed, not the official
release's order; the test skips when no copy is in datasets/ or IMBSSL_CIFAR10_ROOT), and
synthetic ones with the CIFAR class layout so that the check runs
without data: ``RandomState(2022).permutation(np.repeat(np.arange(K), 50000 // K))`` for
K = 10 (CIFAR-10 layout) and K = 100 (CIFAR-100 layout: no CIFAR-100 copy was at hand).
"""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from imbssl.data import DataError, make_longtail_split, make_official_daso_split, make_split

REPO = Path(__file__).resolve().parents[2]

# name -> (labeled, unlabeled, valid), each (size, index sum, sha256[:16] of sorted indices)
OFFICIAL = {
    "cifar10_real/consistent/seed0": ((3720, 92725976, "b06374aaba7ec1db"), (7443, 187999595, "5bc8d528c3e43508"), (5000, 124365627, "40b620a161a42909")),
    "cifar10_real/consistent/seed1": ((3720, 94692457, "e4875d6acd622647"), (7443, 185698593, "cc8c92bfb401d877"), (5000, 124322751, "6790ac858866c5d8")),
    "cifar10_real/uniform/seed0": ((3720, 92725976, "b06374aaba7ec1db"), (30000, 752550346, "1ba4908991e99b51"), (5000, 124365627, "40b620a161a42909")),
    "cifar10_real/uniform/seed1": ((3720, 94692457, "e4875d6acd622647"), (30000, 749025016, "535978867dbbfb4e"), (5000, 124322751, "6790ac858866c5d8")),
    "cifar10_real/reversed/seed0": ((3720, 92725976, "b06374aaba7ec1db"), (7443, 186375871, "3f3136f5effb376e"), (5000, 124365627, "40b620a161a42909")),
    "cifar10_real/reversed/seed1": ((3720, 94692457, "e4875d6acd622647"), (7443, 185405867, "17d0076dfa066f99"), (5000, 124322751, "6790ac858866c5d8")),
    "cifar10_synthetic/consistent/seed0": ((3720, 92522248, "aa355ca0d5048b62"), (7443, 187556390, "0504739b4b3e3ab9"), (5000, 124364233, "a7f9ed47cbeff1e7")),
    "cifar10_synthetic/consistent/seed1": ((3720, 94496066, "bdd4220dfa6b4022"), (7443, 185265543, "e683517df59afce9"), (5000, 124306350, "b16e66f51c65639f")),
    "cifar10_synthetic/uniform/seed0": ((3720, 92522248, "aa355ca0d5048b62"), (30000, 752541172, "128689576ebf1ead"), (5000, 124364233, "a7f9ed47cbeff1e7")),
    "cifar10_synthetic/uniform/seed1": ((3720, 94496066, "bdd4220dfa6b4022"), (30000, 749007924, "b894628670e97c8d"), (5000, 124306350, "b16e66f51c65639f")),
    "cifar10_synthetic/reversed/seed0": ((3720, 92522248, "aa355ca0d5048b62"), (7443, 186507422, "ac2b5f28a4f32637"), (5000, 124364233, "a7f9ed47cbeff1e7")),
    "cifar10_synthetic/reversed/seed1": ((3720, 94496066, "bdd4220dfa6b4022"), (7443, 185532164, "d9c7c02664906cfe"), (5000, 124306350, "b16e66f51c65639f")),
    "cifar100_synthetic/g10/seed0": ((5835, 143643121, "4414bc227faa0bc9"), (11720, 293457450, "3db2b1b27be3e876"), (5000, 126500170, "db4b9c1d726ba20d")),
    "cifar100_synthetic/g10_reversed/seed0": ((5835, 143643121, "4414bc227faa0bc9"), (11720, 292818556, "2c7dd929508e50a2"), (5000, 126500170, "db4b9c1d726ba20d")),
    "cifar100_synthetic/uniform/seed0": ((5835, 143643121, "4414bc227faa0bc9"), (30000, 751888147, "43df44852ca7217c"), (5000, 126500170, "db4b9c1d726ba20d")),
    "cifar100_synthetic/g10/seed1": ((5835, 145776365, "309d53200a5490d7"), (11720, 292427583, "c8055a6217993e1b"), (5000, 125282110, "5bca4e3be40394c6")),
    "cifar100_synthetic/g10_reversed/seed1": ((5835, 145776365, "309d53200a5490d7"), (11720, 294237216, "b849ae194a671861"), (5000, 125282110, "5bca4e3be40394c6")),
    "cifar100_synthetic/uniform/seed1": ((5835, 145776365, "309d53200a5490d7"), (30000, 750286505, "9221c8db757470f5"), (5000, 125282110, "5bca4e3be40394c6")),
}

# setting -> (N1, gamma_l, M1, gamma_u, reversed, validation images per class)
SETTINGS = {
    "consistent": (1500, 100, 3000, 100, False, 500),
    "uniform": (1500, 100, 3000, 1, False, 500),
    "reversed": (1500, 100, 3000, 100, True, 500),
    "g10": (150, 10, 300, 10, False, 50),
    "g10_reversed": (150, 10, 300, 10, True, 50),
}
SETTINGS["uniform100"] = (150, 10, 300, 1, False, 50)


def digest(indices: np.ndarray) -> tuple[int, int, str]:
    s = np.sort(np.asarray(indices, dtype=np.int64))
    return len(s), int(s.sum()), hashlib.sha256(s.astype("<i8").tobytes()).hexdigest()[:16]


def synthetic_labels(num_classes: int) -> np.ndarray:
    return np.random.RandomState(2022).permutation(np.repeat(np.arange(num_classes),
                                                             50000 // num_classes))


def real_cifar10_labels() -> np.ndarray | None:
    for root in (os.environ.get("IMBSSL_CIFAR10_ROOT"), REPO / "datasets"):
        folder = Path(root) / "cifar-10-batches-py" if root else None
        if folder is not None and (folder / "data_batch_5").is_file():
            labels = []
            for i in range(1, 6):
                with open(folder / f"data_batch_{i}", "rb") as fh:
                    labels += pickle.load(fh, encoding="latin1")["labels"]
            return np.asarray(labels)
    return None


def _setting_of(name: str) -> tuple:
    labels_name, setting, _ = name.split("/")
    key = "uniform100" if labels_name.startswith("cifar100") and setting == "uniform" else setting
    return SETTINGS[key]


def _check(name: str, labels: np.ndarray) -> None:
    n1, gamma_l, m1, gamma_u, rev, valid = _setting_of(name)
    seed = int(name.rsplit("seed", 1)[1])
    split = make_official_daso_split(labels, n1, gamma_l, m1, gamma_u, reverse_unlabeled=rev,
                                     num_valid_per_class=valid, seed=seed)
    assert tuple(digest(part) for part in split) == OFFICIAL[name]


@pytest.mark.parametrize("name", [n for n in OFFICIAL if "synthetic" in n])
def test_official_split_equals_official_functions_on_synthetic_labels(name):
    _check(name, synthetic_labels(100 if name.startswith("cifar100") else 10))


REAL = real_cifar10_labels()


@pytest.mark.skipif(REAL is None, reason="no CIFAR-10 copy in datasets/ or IMBSSL_CIFAR10_ROOT")
@pytest.mark.parametrize("name", [n for n in OFFICIAL if n.startswith("cifar10_real")])
def test_official_split_equals_official_functions_on_cifar10(name):
    _check(name, REAL)


def test_official_split_parts_are_disjoint_with_the_planned_counts():
    labels = synthetic_labels(10)
    split = make_official_daso_split(labels, 1500, 100, 3000, 100, reverse_unlabeled=True,
                                     num_valid_per_class=500, seed=3)
    assert not set(split.labeled) & set(split.unlabeled)
    assert not (set(split.labeled) | set(split.unlabeled)) & set(split.valid)
    assert np.bincount(labels[split.labeled]).tolist()[0] == 1500
    assert np.bincount(labels[split.unlabeled]).tolist() == [
        int(3000 * 0.01 ** (r / 9)) for r in range(10)][::-1]


def test_imbssl_split_differs_so_the_option_matters():
    labels = synthetic_labels(10)
    kwargs = dict(n1=1500, gamma_l=100, m1=3000, gamma_u=1, num_valid_per_class=500, seed=0)
    assert digest(make_split("imbssl", labels, **kwargs).labeled) == digest(
        make_longtail_split(labels, **kwargs).labeled)
    assert digest(make_split("official_daso", labels, **kwargs).labeled) != digest(
        make_longtail_split(labels, **kwargs).labeled)


def test_unknown_protocol_is_a_value_error():
    with pytest.raises(ValueError, match="split_protocol"):
        make_split("nope", synthetic_labels(10), n1=10, gamma_l=1, m1=10, gamma_u=1)


def test_build_data_rejects_an_unknown_protocol(cifar10_mini):
    from imbssl.data import DatasetConfig, build_data

    root = cifar10_mini[0]
    cfg = DatasetConfig(name="cifar10", root=str(root), n1=2, m1=2, gamma_l=1.0, gamma_u=1.0,
                        split_protocol="nope")
    with pytest.raises(DataError, match="split_protocol"):
        build_data(cfg)
