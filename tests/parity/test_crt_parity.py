"""Parity with the official cRT sampling in DASO (github.com/ytaek-oh/daso,
lib/dataset/loader/class_aware_sampler.py at commit 3541a6c452f895056f5fdac440b5d0c557dea9f0).

Reference values: the official ``ClassAwareSampler(data_source, total_samples=200000,
beta)`` was run once, unmodified, on label arrays with the counts below
(``torch.manual_seed(0)``); stored are its ``per_cls_prob`` (the per-image weight of each
class, normalised over classes) and the class frequencies of its 200000 drawn indices. The
official code is not part of this repository.
"""
from __future__ import annotations

import pytest
import torch

from imbssl.algorithms.crt import ClassAwareSampling, class_aware_weights
from imbssl.data.device_loader import TensorSet, make_stream

REFERENCE = {
    "cifar10_n1500_g100": ([1500, 899, 539, 323, 193, 116, 69, 41, 25, 15], 0.999,
                           [0.007512635224100938, 0.009840749359352119, 0.014004878104571862,
                            0.021139751641838796, 0.03324416769684775, 0.05327419283093295,
                            0.0875129300759552, 0.14524797335767017, 0.2363180873341175,
                            0.3919046343746128],
                           [0.158745, 0.12481, 0.106545, 0.096455, 0.0905, 0.08713, 0.085255,
                            0.08341, 0.08389, 0.08326]),
    "small_beta0.9": ([50, 20, 5, 2], 0.9,
                      [0.10206241051560794, 0.11558937307997824, 0.24794609116918584,
                       0.534402125235228], [0.5246, 0.237935, 0.127045, 0.11042]),
    "small_beta1": ([50, 20, 5, 2], 1.0,
                    [0.025974025974025972, 0.06493506493506494, 0.25974025974025977,
                     0.6493506493506493], [0.249945, 0.24999, 0.249925, 0.25014]),
}


def labels_of(counts) -> torch.Tensor:
    return torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_class_weights_equal_official(name):
    counts, beta, per_cls_prob, _ = REFERENCE[name]
    labels = labels_of(counts)
    weights = class_aware_weights(labels, beta)
    per_class = torch.stack([weights[labels == k][0] for k in range(len(counts))])
    assert (per_class / per_class.sum()).tolist() == pytest.approx(per_cls_prob, abs=1e-12)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_stream_draws_classes_as_official(name):
    counts, beta, _, drawn_official = REFERENCE[name]
    labels = labels_of(counts)
    data = TensorSet(torch.zeros(len(labels), 1, 1, 1, dtype=torch.uint8), labels)
    stream = make_stream(data, 500, seed=0, sampling=ClassAwareSampling(beta))
    drawn = torch.cat([stream.next()[1] for _ in range(400)])  # 200000 draws
    freq = (torch.bincount(drawn, minlength=len(counts)).double() / len(drawn)).tolist()
    assert freq == pytest.approx(drawn_official, abs=0.006)


def test_cifar10_head_tail_ratio():
    """beta 0.999 on CIFAR-10-LT N1 1500: the head class is drawn ~1.92x as often as the tail
    (not class-uniform)."""
    counts = REFERENCE["cifar10_n1500_g100"][0]
    labels = labels_of(counts)
    w = class_aware_weights(labels, 0.999)
    mass = torch.stack([w[labels == k].sum() for k in range(10)])
    assert float(mass[0] / mass[-1]) == pytest.approx(1.92, abs=0.01)
