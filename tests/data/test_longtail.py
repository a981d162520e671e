"""Long-tailed split: DASO counts, disjointness, determinism and errors."""
import re

import numpy as np
import pytest

from imbssl.data.longtail import (
    Split,
    class_counts,
    make_longtail_split,
    per_class_counts,
    planned_counts,
    split_counts,
)

# Expected counts written out literally. They were computed separately, both with the float
# expression of DASO's get_imb_num and with 50-digit arithmetic (mpmath); the two agree for
# every list here. Note class 8 of N1=1500, gamma=100 is 25 (1500 * 100^(-8/9) = 25.02).
CIFAR10 = {
    (1500, 100): [1500, 899, 539, 323, 193, 116, 69, 41, 25, 15],
    (500, 100): [500, 299, 179, 107, 64, 38, 23, 13, 8, 5],
    (3000, 100): [3000, 1798, 1078, 646, 387, 232, 139, 83, 50, 30],
    (4000, 100): [4000, 2397, 1437, 861, 516, 309, 185, 111, 66, 40],
    (1500, 150): [1500, 859, 492, 282, 161, 92, 53, 30, 17, 10],
    (500, 150): [500, 286, 164, 94, 53, 30, 17, 10, 5, 3],
    (3000, 150): [3000, 1719, 985, 564, 323, 185, 106, 60, 34, 20],
    (4000, 150): [4000, 2292, 1313, 752, 431, 247, 141, 81, 46, 26],
    (3000, 1): [3000] * 10,
    (4000, 1): [4000] * 10,
}
CIFAR100_150 = [
    150, 146, 143, 139, 136, 133, 130, 127, 124, 121, 118, 116, 113, 110, 108, 105, 103, 101,
    98, 96, 94, 92, 89, 87, 85, 83, 81, 80, 78, 76, 74, 72, 71, 69, 68, 66, 64, 63, 61, 60, 59,
    57, 56, 55, 53, 52, 51, 50, 49, 47, 46, 45, 44, 43, 42, 41, 40, 39, 38, 38, 37, 36, 35, 34,
    33, 33, 32, 31, 30, 30, 29, 28, 28, 27, 26, 26, 25, 25, 24, 23, 23, 22, 22, 21, 21, 20, 20,
    19, 19, 18, 18, 18, 17, 17, 16, 16, 16, 15, 15, 15,
]
CIFAR100_50 = [
    50, 48, 47, 46, 45, 44, 43, 42, 41, 40, 39, 38, 37, 36, 36, 35, 34, 33, 32, 32, 31, 30, 29,
    29, 28, 27, 27, 26, 26, 25, 24, 24, 23, 23, 22, 22, 21, 21, 20, 20, 19, 19, 18, 18, 17, 17,
    17, 16, 16, 15, 15, 15, 14, 14, 14, 13, 13, 13, 12, 12, 12, 12, 11, 11, 11, 11, 10, 10, 10,
    10, 9, 9, 9, 9, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 5, 5, 5, 5, 5, 5, 5, 5,
]
CIFAR100_300 = [
    300, 293, 286, 279, 273, 267, 260, 254, 249, 243, 237, 232, 226, 221, 216, 211, 206, 202,
    197, 192, 188, 184, 179, 175, 171, 167, 163, 160, 156, 152, 149, 145, 142, 139, 136, 132,
    129, 126, 123, 121, 118, 115, 112, 110, 107, 105, 102, 100, 98, 95, 93, 91, 89, 87, 85, 83,
    81, 79, 77, 76, 74, 72, 70, 69, 67, 66, 64, 63, 61, 60, 58, 57, 56, 54, 53, 52, 51, 50, 48,
    47, 46, 45, 44, 43, 42, 41, 40, 39, 38, 37, 36, 36, 35, 34, 33, 32, 32, 31, 30, 30,
]
CIFAR100_400 = [
    400, 390, 381, 373, 364, 356, 347, 339, 332, 324, 316, 309, 302, 295, 288, 282, 275, 269,
    263, 257, 251, 245, 239, 234, 228, 223, 218, 213, 208, 203, 199, 194, 190, 185, 181, 177,
    173, 169, 165, 161, 157, 154, 150, 147, 143, 140, 137, 134, 130, 127, 125, 122, 119, 116,
    113, 111, 108, 106, 103, 101, 99, 96, 94, 92, 90, 88, 86, 84, 82, 80, 78, 76, 74, 73, 71,
    69, 68, 66, 65, 63, 62, 60, 59, 58, 56, 55, 54, 52, 51, 50, 49, 48, 47, 45, 44, 43, 42, 41,
    40, 40,
]
DIGITS_L = [30, 23, 17, 13, 10, 8, 6, 5, 3, 3]
DIGITS_U = [90, 69, 53, 41, 32, 25, 19, 15, 11, 9]


@pytest.mark.parametrize(("n_head", "gamma"), sorted(CIFAR10))
def test_cifar10_counts(n_head, gamma):
    assert class_counts(n_head, gamma, 10) == CIFAR10[(n_head, gamma)]


@pytest.mark.parametrize(("n_head", "gamma"), [(3000, 100), (4000, 100), (3000, 150)])
def test_reversed_counts(n_head, gamma):
    assert class_counts(n_head, gamma, 10, reverse=True) == CIFAR10[(n_head, gamma)][::-1]


@pytest.mark.parametrize(("n_head", "expected"), [(150, CIFAR100_150), (50, CIFAR100_50),
                                                  (300, CIFAR100_300), (400, CIFAR100_400)])
def test_cifar100_counts(n_head, expected):
    assert len(expected) == 100
    assert class_counts(n_head, 10, 100) == expected


def test_digits_counts_and_edge_cases():
    assert class_counts(30, 10, 10) == DIGITS_L
    assert class_counts(90, 10, 10) == DIGITS_U
    assert class_counts(7, 1, 5) == [7] * 5  # gamma = 1 is uniform
    assert class_counts(42, 100, 1) == [42]  # a single class is the head
    assert class_counts(0, 100, 10) == [0] * 10


def cifar_like_labels(per_class=5000, num_classes=10, seed=1):
    """Shuffled labels with per_class images of every class."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


# DASO CIFAR-10 settings: (N1, M1, gamma_l, gamma_u, reversed).
DASO_CIFAR10 = [
    (1500, 3000, 100, 100, False), (500, 4000, 100, 100, False),
    (1500, 3000, 100, 1, False), (500, 4000, 100, 1, False),
    (1500, 3000, 100, 100, True), (500, 4000, 100, 100, True),
    (1500, 3000, 150, 150, False), (500, 4000, 150, 150, False),
]


@pytest.mark.parametrize(("n1", "m1", "gl", "gu", "rev"), DASO_CIFAR10)
def test_daso_cifar10_splits(n1, m1, gl, gu, rev):
    labels = cifar_like_labels()
    split = make_longtail_split(labels, n1, gl, m1, gu, reverse_unlabeled=rev,
                                num_valid_per_class=500, seed=0)
    counts = split_counts(labels, split, 10)
    assert counts.labeled == CIFAR10[(n1, gl)]
    unl = CIFAR10[(m1, gu)]
    assert counts.unlabeled == (unl[::-1] if rev else unl)
    assert counts.valid == [500] * 10
    assert counts == planned_counts(n1, gl, m1, gu, 10, rev, 500)
    parts = [set(p.tolist()) for p in split]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    for p in split:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)  # sorted, no duplicates


@pytest.mark.parametrize(("n1", "m1", "l_expected", "u_expected"),
                         [(150, 300, CIFAR100_150, CIFAR100_300),
                          (50, 400, CIFAR100_50, CIFAR100_400)])
def test_daso_cifar100_split(n1, m1, l_expected, u_expected):
    labels = cifar_like_labels(per_class=500, num_classes=100)
    split = make_longtail_split(labels, n1, 10, m1, 10, num_valid_per_class=50, seed=3)
    assert per_class_counts(labels, split.labeled, 100) == l_expected
    assert per_class_counts(labels, split.unlabeled, 100) == u_expected
    assert per_class_counts(labels, split.valid, 100) == [50] * 100


def test_split_determinism():
    labels = cifar_like_labels(per_class=300)
    a = make_longtail_split(labels, 100, 10, 150, 10, num_valid_per_class=20, seed=5)
    b = make_longtail_split(labels, 100, 10, 150, 10, num_valid_per_class=20, seed=5)
    c = make_longtail_split(labels, 100, 10, 150, 10, num_valid_per_class=20, seed=6)
    assert isinstance(a, Split)
    for pa, pb, pc in zip(a, b, c):
        np.testing.assert_array_equal(pa, pb)
        assert not np.array_equal(pa, pc)


def test_split_golden_indices():
    # numpy's default_rng (PCG64) + permutation is platform independent: pin one small case.
    labels = np.array([0, 1, 2] * 8)
    split = make_longtail_split(labels, 3, 3.0, 3, 3.0, num_valid_per_class=1, seed=0)
    assert split.labeled.tolist() == [7, 8, 9, 12, 18]
    assert split.unlabeled.tolist() == [0, 3, 5, 15, 22]
    assert split.valid.tolist() == [6, 11, 19]


def test_split_without_validation_and_labels_of_parts():
    labels = cifar_like_labels(per_class=50)
    split = make_longtail_split(labels, 20, 10, 25, 10, seed=0)
    assert split.valid.size == 0 and split.valid.dtype == np.int64
    assert np.bincount(labels[split.labeled], minlength=10).tolist() == class_counts(20, 10, 10)


def test_error_not_enough_images():
    per_class = [5000] * 10
    per_class[3] = 4000
    labels = np.repeat(np.arange(10), per_class)
    msg = ("class 3 has 3500 images after holding out 500 for validation, "
           "but 1500 labeled + 3000 unlabeled were requested")
    with pytest.raises(ValueError, match=re.escape(msg)):
        make_longtail_split(labels, 1500, 1, 3000, 1, num_valid_per_class=500)


def test_error_not_enough_for_validation():
    labels = np.repeat(np.arange(3), [10, 4, 10])
    with pytest.raises(ValueError, match="class 1 has 4 images, fewer than the 5 requested"):
        make_longtail_split(labels, 1, 1, 1, 1, num_valid_per_class=5)


@pytest.mark.parametrize(("kwargs", "pattern"), [
    (dict(gamma_l=0.5), "gamma_l .* must be >= 1, got 0.5"),
    (dict(gamma_u=0.99), "gamma_u .* must be >= 1, got 0.99"),
    (dict(n1=-1), "n1 must be >= 0, got -1"),
    (dict(m1=-3), "m1 must be >= 0, got -3"),
    (dict(num_valid_per_class=-1), "num_valid_per_class must be >= 0"),
])
def test_error_bad_parameters(kwargs, pattern):
    args = dict(n1=5, gamma_l=2.0, m1=5, gamma_u=2.0) | kwargs
    with pytest.raises(ValueError, match=pattern):
        make_longtail_split(cifar_like_labels(per_class=20), **args)


def test_class_counts_errors():
    with pytest.raises(ValueError, match="gamma"):
        class_counts(100, 0.9, 10)
    with pytest.raises(ValueError, match="must be >= 0"):
        class_counts(-5, 10, 10)
    with pytest.raises(ValueError, match="num_classes"):
        class_counts(5, 10, 0)
