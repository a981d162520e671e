"""Parity with the official DARP code in DASO (github.com/ytaek-oh/daso at commit
3541a6c452f895056f5fdac440b5d0c557dea9f0; "mostly copied" from github.com/bbuing9/DARP):

* lib/algorithm/darp_reproduce.py: ``DARP.step`` (schedule: warm-up, a solve at every
  multiple of PER_ITERS, the stored rows between), ``estimate_pseudo``, ``opt_solver`` and
  ``f`` (scipy Newton), over a 30-step sequence;
* lib/algorithm/darp_estim.py: ``confusion`` and ``estimate_q_y`` (DARP-estim's estimate).

Reference values: those official functions were executed once, unmodified (the class with its
config as a namespace and ``get_target_dist`` returning the target below), on the seeded
tensors that ``darp_sequence`` / ``estimate_inputs`` below draw; the official code is not
part of this repository. Per step the fingerprint is (sum of the returned rows weighted by
class 1..K, sum of their maxima).
"""
from __future__ import annotations

import pytest
import torch

from imbssl.algorithms.darp_estim import estimate_unlabeled_counts
from imbssl.pseudo.darp import DARP

N_U, K, STEPS, BATCH, TOTAL = 200, 5, 30, 32, 30
COUNTS = [80.0, 50.0, 35.0, 20.0, 15.0]
#: official DARP.step outputs, per step (WARMUP_RATIO 0.4, PER_ITERS 5, ALPHA 2, 10 iterations):
#: warm-up (steps 1-12) returns the input, steps 13-14 the initial uniform rows, 15 solves
FINGERPRINTS = [
    (102.82567596435547, 20.383146286010742),
    (96.76435089111328, 21.502845764160156),
    (95.17070007324219, 18.821748733520508),
    (94.86431121826172, 21.424880981445312),
    (93.09207153320312, 20.897369384765625),
    (97.45011901855469, 20.47568130493164),
    (93.95818328857422, 19.951059341430664),
    (92.71724700927734, 18.35253143310547),
    (92.32949829101562, 19.416786193847656),
    (99.19916534423828, 20.085500717163086),
    (89.3166275024414, 21.459636688232422),
    (96.54984283447266, 20.121124267578125),
    (96.0, 6.40000057220459),
    (96.0, 6.40000057220459),
    (81.94744873046875, 25.955617904663086),
    (80.36510467529297, 25.47647476196289),
    (88.57925415039062, 25.483278274536133),
    (67.20863342285156, 24.31259536743164),
    (78.25520324707031, 23.719337463378906),
    (68.50511169433594, 25.96273422241211),
    (74.82966613769531, 26.918725967407227),
    (76.45500183105469, 25.287796020507812),
    (71.23255157470703, 24.88088035583496),
    (76.09671783447266, 24.10037612915039),
    (72.84065246582031, 25.349220275878906),
    (67.76185607910156, 24.7548828125),
    (67.1849365234375, 24.51346206665039),
    (68.69149017333984, 25.44137191772461),
    (81.97272491455078, 26.210861206054688),
    (77.3682632446289, 24.516874313354492)]
REFINED_COLUMN_SUMS = [80.00003814697266, 49.99885940551758, 34.99856185913086,
                       19.999645233154297, 15.002894401550293]
#: official estimate_q_y: q = C^-1 q~ and cond(C)
ESTIMATE_Q = [130.09942626953125, 85.19898223876953, 54.269657135009766, 30.431995391845703]
ESTIMATE_COND = 1.4619009494781494


def darp_sequence():
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        idx = torch.randperm(N_U, generator=g)[:BATCH]
        probs = (torch.randn(BATCH, K, generator=g) * 2).softmax(1)
        yield idx, probs


def test_darp_schedule_and_refinement_equal_official():
    darp = DARP(K, N_U, COUNTS, warmup_ratio=0.4, per_iters=5, alpha=2.0, num_darp_iters=10)
    weights = torch.arange(1, K + 1, dtype=torch.float)
    got = []
    for step, (idx, probs) in enumerate(darp_sequence()):
        out = darp.refine_indexed(probs, idx, step, TOTAL).float()
        got.append((float((out * weights).sum()), float(out.max(1).values.sum())))
    for step, (mine, official) in enumerate(zip(got, FINGERPRINTS, strict=True)):
        assert mine == pytest.approx(official, abs=2e-3), step
    assert darp.pseudo_refine.sum(0).tolist() == pytest.approx(REFINED_COLUMN_SUMS, abs=5e-3)


def estimate_inputs():
    """Validation probabilities/labels and unlabeled probabilities of the reference run."""
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(4).repeat_interleave(10)
    valid = torch.randn(40, 4, generator=g) + 3 * torch.nn.functional.one_hot(labels, 4)
    ul_y = torch.tensor([0] * 150 + [1] * 80 + [2] * 50 + [3] * 20)
    unlabeled = torch.randn(300, 4, generator=g) + 3 * torch.nn.functional.one_hot(ul_y, 4)
    return valid.softmax(1), labels, unlabeled.softmax(1)


def test_darp_estim_estimate_equals_official():
    q, cond = estimate_unlabeled_counts(*estimate_inputs())
    assert q.tolist() == pytest.approx(ESTIMATE_Q, abs=1e-3)
    assert cond == pytest.approx(ESTIMATE_COND, rel=1e-5)
