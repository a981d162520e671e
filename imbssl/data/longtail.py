"""Long-tailed labeled/unlabeled splits (pure numpy).

Counts follow the DASO protocol (Oh et al., CVPR 2022, Sec. 4.1): class k of K gets
N_k = N_1 * gamma^(-(k / (K - 1))) images, truncated to an integer, for the labeled set
(N_1, gamma_l) and likewise for the unlabeled set (M_1, gamma_u).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Split(NamedTuple):
    """Index arrays (int64, sorted) into the source labels; the three parts are disjoint."""

    labeled: np.ndarray
    unlabeled: np.ndarray
    valid: np.ndarray


class SplitCounts(NamedTuple):
    """Per-class image counts of a split, class 0 first."""

    labeled: list[int]
    unlabeled: list[int]
    valid: list[int]


def class_counts(n_head: int, gamma: float, num_classes: int, reverse: bool = False) -> list[int]:
    """Per-class counts int(n_head * (1/gamma)^(k/(K-1))), head class first unless reversed."""
    _check_params(n_head, gamma, "n_head", "gamma")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if num_classes == 1:
        return [int(n_head)]
    # Exactly the float expression of DASO's get_imb_num / make_imbalance.
    counts = [int(n_head * (1 / gamma) ** (k / (num_classes - 1))) for k in range(num_classes)]
    return counts[::-1] if reverse else counts


def planned_counts(
    n1: int,
    gamma_l: float,
    m1: int,
    gamma_u: float,
    num_classes: int,
    reverse_unlabeled: bool = False,
    num_valid_per_class: int = 0,
) -> SplitCounts:
    """The per-class labeled/unlabeled/valid counts that make_longtail_split will draw."""
    return SplitCounts(
        labeled=class_counts(n1, gamma_l, num_classes),
        unlabeled=class_counts(m1, gamma_u, num_classes, reverse=reverse_unlabeled),
        valid=[int(num_valid_per_class)] * num_classes,
    )


def per_class_counts(labels: np.ndarray, indices: np.ndarray, num_classes: int) -> list[int]:
    """How many of labels[indices] fall in each class 0..num_classes-1."""
    sel = np.asarray(labels)[np.asarray(indices, dtype=np.int64)]
    return np.bincount(sel, minlength=num_classes)[:num_classes].astype(int).tolist()


def split_counts(labels: np.ndarray, split: Split, num_classes: int) -> SplitCounts:
    """Observed per-class counts of every part of a split."""
    return SplitCounts(*(per_class_counts(labels, part, num_classes) for part in split))


def make_longtail_split(
    labels: np.ndarray,
    n1: int,
    gamma_l: float,
    m1: int,
    gamma_u: float,
    reverse_unlabeled: bool = False,
    num_valid_per_class: int = 0,
    seed: int = 0,
    num_classes: int | None = None,
) -> Split:
    """Hold out a class-balanced validation set, then draw disjoint long-tailed L and U sets."""
    labels = _checked_labels(labels, n1, gamma_l, m1, gamma_u)
    if num_valid_per_class < 0:
        raise ValueError(f"num_valid_per_class must be >= 0, got {num_valid_per_class}")
    k_classes = _class_count(labels, num_classes)
    plan = planned_counts(n1, gamma_l, m1, gamma_u, k_classes, reverse_unlabeled,
                          num_valid_per_class)
    rng = np.random.default_rng(seed)
    parts: tuple[list, list, list] = ([], [], [])
    for c in range(k_classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_l, n_u, n_v = plan.labeled[c], plan.unlabeled[c], plan.valid[c]
        _check_class(c, len(members), n_l, n_u, n_v)
        parts[2].append(members[:n_v])
        parts[0].append(members[n_v:n_v + n_l])
        parts[1].append(members[n_v + n_l:n_v + n_l + n_u])
    return Split(*(np.sort(np.concatenate(p)).astype(np.int64) for p in parts))


SPLIT_PROTOCOLS = ("imbssl", "official_daso")


def make_split(protocol: str, labels: np.ndarray, **kwargs) -> Split:
    """The split of ``protocol``: "imbssl" (make_longtail_split) or "official_daso"
    (make_official_daso_split, the images the official DASO code trains on for a seed)."""
    if protocol == "imbssl":
        return make_longtail_split(labels, **kwargs)
    if protocol == "official_daso":
        return make_official_daso_split(labels, **kwargs)
    raise ValueError(f"split_protocol must be one of {', '.join(SPLIT_PROTOCOLS)}, "
                     f"got {protocol!r}")


def make_official_daso_split(
    labels: np.ndarray,
    n1: int,
    gamma_l: float,
    m1: int,
    gamma_u: float,
    reverse_unlabeled: bool = False,
    num_valid_per_class: int = 0,
    seed: int = 0,
    num_classes: int | None = None,
) -> Split:
    """The labeled, unlabeled and validation images the official DASO code draws for ``seed``.

    github.com/ytaek-oh/daso, lib/dataset/cifar10.py / cifar100.py with lib/dataset/utils.py,
    the same numpy RandomState draws in the same order, each step seeded anew with ``seed``:

    1. split_trainval (when validation images are held out): per class 0..K-1, shuffle the
       class's train indices; the first ``num_valid_per_class`` are validation, the rest train.
    2. x_u_split: per class of the remaining train images, shuffle; the first N1 are labeled
       candidates, the next M1 unlabeled candidates (whatever the imbalance).
    3. make_imbalance of the labeled candidates when gamma_l > 1: per class in rank order,
       shuffle and keep the first int(N1 * gamma_l^(-rank / (K - 1))).
    4. make_imbalance of the unlabeled candidates when gamma_u > 1, the class order reversed
       first when ``reverse_unlabeled`` (so the shuffles also run from class K-1 down).

    Shuffling a class's positions or the images' own indices gives the same permutation
    (RandomState.shuffle depends only on the length), so every step works on indices into
    ``labels`` directly. Returned sorted, as make_longtail_split's are.
    """
    labels = _checked_labels(labels, n1, gamma_l, m1, gamma_u)
    k_classes = _class_count(labels, num_classes)
    everything = np.arange(len(labels), dtype=np.int64)
    train, valid = _official_trainval(labels, everything, num_valid_per_class, k_classes, seed)
    labeled, unlabeled = _official_x_u(labels, train, n1, m1, k_classes, seed)
    order = list(range(k_classes))
    if gamma_l > 1:
        labeled = _official_imbalance(labels, labeled, n1, gamma_l, order, seed)
    if gamma_u > 1:
        unlabeled = _official_imbalance(labels, unlabeled, m1, gamma_u,
                                        order[::-1] if reverse_unlabeled else order, seed)
    return Split(*(np.sort(part).astype(np.int64) for part in (labeled, unlabeled, valid)))


def _official_trainval(labels, pool, per_class, k_classes, seed):
    """utils.split_trainval: a class-balanced validation set; (train, valid) indices."""
    if per_class < 0:
        raise ValueError(f"num_valid_per_class must be >= 0, got {per_class}")
    if per_class == 0:  # the official builders skip split_trainval when NUM_VALID is 0
        return pool, pool[:0]
    rng = np.random.RandomState(seed)
    train, valid = [], []
    for c in range(k_classes):
        members = pool[labels[pool] == c]
        _check_class(c, len(members), 0, 0, per_class)
        rng.shuffle(members)
        train.append(members[per_class:])
        valid.append(members[:per_class])
    return np.concatenate(train), np.concatenate(valid)


def _official_x_u(labels, pool, n1, m1, k_classes, seed):
    """utils.x_u_split: per class, the first N1 shuffled images labeled, the next M1
    unlabeled (the head counts for every class; the imbalance is cut afterwards)."""
    rng = np.random.RandomState(seed)
    labeled, unlabeled = [], []
    for c in range(k_classes):
        members = pool[labels[pool] == c]
        _check_class(c, len(members), n1, m1, 0)
        rng.shuffle(members)
        labeled.append(members[:n1])
        unlabeled.append(members[n1:n1 + m1])
    return np.concatenate(labeled), np.concatenate(unlabeled)


def _official_imbalance(labels, pool, n_head, gamma, class_order, seed):
    """utils.make_imbalance: the class of rank r (in ``class_order``) keeps its first
    int(n_head * (1 / gamma)^(r / (K - 1))) images after a shuffle."""
    rng = np.random.RandomState(seed)
    k_classes = len(class_order)
    kept = []
    for rank, c in enumerate(class_order):
        members = pool[labels[pool] == c]
        rng.shuffle(members)
        kept.append(members[:int(n_head * ((1. / gamma) ** (rank / (k_classes - 1.0))))])
    return np.concatenate(kept)


def _checked_labels(labels, n1: int, gamma_l: float, m1: int, gamma_u: float) -> np.ndarray:
    """``labels`` as a 1-D int64 array, after the checks every split protocol shares."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    _check_params(n1, gamma_l, "n1", "gamma_l")
    _check_params(m1, gamma_u, "m1", "gamma_u")
    return labels


def _class_count(labels: np.ndarray, num_classes: int | None) -> int:
    """K: ``num_classes`` when given, else one more than the largest label."""
    return int(labels.max()) + 1 if num_classes is None else int(num_classes)


def _check_params(n_head: float, gamma: float, n_name: str, g_name: str) -> None:
    """Reject negative head counts and imbalance ratios below 1."""
    if n_head < 0:
        raise ValueError(f"{n_name} must be >= 0, got {n_head}")
    if not gamma >= 1:
        raise ValueError(f"{g_name} (imbalance ratio) must be >= 1, got {gamma}")


def _check_class(c: int, available: int, n_l: int, n_u: int, n_v: int) -> None:
    """Raise a ValueError naming class c when it cannot supply the requested images."""
    if n_v > available:
        raise ValueError(
            f"class {c} has {available} images, fewer than the {n_v} requested for validation"
        )
    left = available - n_v
    if n_l + n_u > left:
        raise ValueError(
            f"class {c} has {left} images after holding out {n_v} for validation, "
            f"but {n_l} labeled + {n_u} unlabeled were requested"
        )
