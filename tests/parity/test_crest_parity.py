"""Parity with the official CReST code in DASO (github.com/ytaek-oh/daso,
lib/algorithm/fm_crest.py and lib/algorithm/base_algorithm.py at commit
3541a6c452f895056f5fdac440b5d0c557dea9f0): the per-class selection rates, the selection of
two successive generations, and the prior of LA's labeled loss after each of them.

Reference values: the official ``FixMatchCReST._rebuild_labeled_dataset``,
``current_label_dist`` and ``BaseAlgorithm.get_label_dist`` were executed once, unmodified,
on a host object (datasets as dicts of arrays, ``eval_ul_dataset`` returning the
probabilities below), with the ``mu_per_cls`` line of ``FixMatchCReST.__init__`` and the LA
lines of ``run_step`` (lines 187-189: ``l_logits += self.tau * current_label_dist(
normalize="sum").log()``); the official code is not part of this repository. Setting: 5
classes, labeled counts (60, 30, 15, 8, 4), 300 unlabeled images, ALPHA 3, TAU 1,
generation g's probabilities ``softmax(3 * randn(300, 5))`` drawn in turn from
``torch.Generator().manual_seed(0)``.
"""
from __future__ import annotations

import pytest
import torch

from imbssl.algorithms import get_algorithm
from imbssl.algorithms.crest import selection_rates

K, NU, COUNTS = 5, 300, (60, 30, 15, 8, 4)
#: official mu_per_cls (index K-1-i is the rate of class i)
MU_PER_CLS = [1.0, 0.7937005162239075, 0.6299605369567871, 0.5108729600906372,
              0.40548014640808105]
#: per generation: images added per class, the sum of their unlabeled indices per class,
#: and tau * log p(y) of the rebuilt labeled set (the official LA offset of the loss)
GENERATIONS = [
    ([26, 23, 42, 42, 69], [3958, 3722, 7361, 6870, 9647],
     [-1.310843825340271, -1.7948992252349854, -1.722139835357666, -1.85316801071167,
      -1.474731683731079]),
    ([20, 35, 34, 57, 53], [3859, 5226, 4997, 7301, 7911],
     [-1.3737155199050903, -1.5813549757003784, -1.8639219999313354, -1.5813549757003784,
      -1.7126909494400024]),
]


def labeled_labels() -> torch.Tensor:
    return torch.cat([torch.full((n,), k) for k, n in enumerate(COUNTS)])


def make_crest(name: str = "crest_plus", **overrides):
    cls = get_algorithm(name)
    return cls(cls.Config(**overrides), K, 8, labeled_labels())


def generation_probs():
    g = torch.Generator().manual_seed(0)
    for _ in GENERATIONS:
        yield (torch.randn(NU, K, generator=g) * 3).softmax(1)


def test_selection_rates_equal_official():
    rates = selection_rates(torch.tensor(COUNTS), 3.0)
    assert rates.tolist() == pytest.approx([MU_PER_CLS[K - 1 - i] for i in range(K)], abs=1e-7)


@pytest.mark.parametrize("name", ["crest", "crest_plus"])
def test_two_generations_selection_and_la_prior_equal_official(name):
    algo = make_crest(name, logit_adjust="loss", la_tau=1.0, generations=3)
    initial_prior = algo.labeled_prior.clone()
    for probs, (per_class, index_sums, offset) in zip(generation_probs(), GENERATIONS,
                                                      strict=True):
        update = algo.update_labeled_set(probs, 0, 30)
        got = torch.bincount(update.labels, minlength=K).tolist()
        assert got == per_class
        assert [int(update.indices[update.labels == k].sum()) for k in range(K)] == index_sums
        assert algo.la_offset.tolist() == pytest.approx(offset, abs=1e-6)
        logits = torch.zeros(2, K)
        assert algo.labeled_logits(logits)[0].tolist() == pytest.approx(offset, abs=1e-6)
    # the alignment target and post-hoc prior stay the initial labeled distribution (p_data)
    assert torch.equal(algo.labeled_prior, initial_prior)


def test_posthoc_keeps_the_initial_prior():
    """Official eval_loop subtracts the initial p_data's log at every generation."""
    algo = make_crest(logit_adjust="posthoc", la_tau=1.0, generations=3)
    before = algo.la_offset.clone()
    for probs in generation_probs():
        algo.update_labeled_set(probs, 0, 30)
    assert torch.equal(algo.la_offset, before)
