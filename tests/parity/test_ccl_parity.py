"""CCL parity: imbssl's contrastive losses (smoothed and reliable pseudo-labels), the label
propagation, and twelve steps of the classification losses with the estimated priors (three
epochs of four steps, estimates updated every two steps of the epochs after the first) equal
the official code's on fixed seeded tensors.

Reference values: computed once on CPU in float32 by running ``unlabelProbability``,
``SemiConLoss.forward`` and ``softConLoss.forward`` of ``loss/semiConLoss.py`` and the loop
lines of ``train.py`` (``logits_co`` to ``loss_cls``, ``energy``, ``num_all`` /
``num_unlabeled`` and the ``py_all`` / ``py_unlabeled`` update) from
github.com/zhouzihao11/CCL (commit 0410cb1b2b2f2a650db18126f2a801c803867abe), with the
tensors built below, K = 4, 4 labeled and 4 unlabeled images per step (mu 1), tau 2, T 1,
threshold 0.95, alpha 0.5, beta 0.9, eval_step 4, upbatch 2, est_epoch 0.
Gradients are compared through two seeded weighted sums of them.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from imbssl.algorithms import Batch, StepState
from imbssl.algorithms.ccl import (
    CCL,
    CCLConfig,
    propagated_probabilities,
    reliable_contrastive_loss,
    smoothed_contrastive_loss,
)

K, LBS, UBS, D = 4, 4, 4, 8
TOL = dict(rtol=1e-5, atol=2e-6)

PROPAGATED = [[0.2589092254638672, 0.23633934557437897, 0.2716248333454132, 0.23312656581401825],
              [0.2316214144229889, 0.3012811541557312, 0.2563307285308838, 0.2107667475938797],
              [0.2663829028606415, 0.2624934911727905, 0.24093234539031982, 0.23019123077392578],
              [0.4519953727722168, 0.1557377278804779, 0.2676546275615692, 0.12461239844560623]]
SMOOTHED = [1.452630639076233, 0.18010751903057098, 0.5140458345413208]  # loss, grad sums
RELIABLE = [2.0907235145568848, 0.9049034118652344, -1.4055074453353882]
# per step: loss_cls, grad sums (f: plain, weighted; g: plain, weighted), confident count,
# low-energy count, pseudo-labels, sum of the sharpened targets weighted by 1..K
STEPS = [
    (7.273618698120117, [1.49e-08, 0.10825611650943756, -4.66e-08, -0.18700936436653137], 2, 1, [1, 0, 0, 0], 6.787681579589844),  # noqa: E501
    (21.110580444335938, [5.96e-08, -0.726542592048645, -5.22e-08, -0.7498169541358948], 2, 1, [3, 0, 0, 0], 7.015085697174072),  # noqa: E501
    (19.490711212158203, [-5.03e-08, 0.6484359502792358, -2.24e-08, -0.843026876449585], 1, 1, [3, 3, 2, 0], 11.911105155944824),  # noqa: E501
    (11.937347412109375, [1.86e-08, -0.4507921636104584, -5.96e-08, 0.2705308794975281], 1, 0, [0, 3, 1, 0], 7.714537620544434),  # noqa: E501
    (27.335296630859375, [-1.49e-08, 1.4154821634292603, -1.49e-08, -0.41421905159950256], 1, 1, [0, 0, 1, 3], 8.430463790893555),  # noqa: E501
    (23.07895278930664, [-2.98e-08, 1.3483960628509521, 1.49e-08, -0.7060574889183044], 0, 0, [2, 0, 3, 1], 9.966865539550781),  # noqa: E501
    (27.053028106689453, [-5.96e-08, 0.7137918472290039, -1.19e-07, -0.2804100513458252], 3, 1, [2, 3, 1, 2], 11.999933242797852),  # noqa: E501
    (9.050287246704102, [-1.49e-08, 0.2982431650161743, -8.94e-08, 0.5682981014251709], 1, 0, [0, 0, 0, 3], 7.32332706451416),  # noqa: E501
    (32.77329635620117, [-3.73e-09, -0.9836549758911133, -2.98e-08, 0.8154911994934082], 4, 2, [0, 3, 3, 2], 12.0),  # noqa: E501
    (25.739971160888672, [0.0, 0.5843554735183716, -2.98e-08, -0.5311597585678101], 2, 2, [0, 0, 0, 1], 5.211499214172363),  # noqa: E501
    (42.51634216308594, [0.0, 1.012756586074829, -1.19e-07, -0.6006243228912354], 3, 0, [1, 2, 3, 3], 12.99999713897705),  # noqa: E501
    (25.845226287841797, [2.98e-08, -0.9248975515365601, 5.96e-08, 0.4345698356628418], 4, 1, [1, 3, 2, 2], 12.0),  # noqa: E501
]
PRIOR_ALL = [0.4126133918762207, 0.23509563505649567, 0.17123612761497498, 0.18105477094650269]
PRIOR_UNLABELED = [0.25948870182037354, 0.1843893975019455, 0.21569876372814178,
                   0.3404231667518616]


def seeded_feats(seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, D, generator=g), dim=1)


def checksums(t: torch.Tensor, seed: int) -> list[float]:
    w = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed))
    return [float(t.sum()), float((t * w).sum())]


def anchor_labels() -> torch.Tensor:
    """Centres (all ones, official ``center_label``) and two one-hot labeled views."""
    one_hot = F.one_hot(torch.tensor([0, 1, 2, 3]), K).float()
    return torch.cat([torch.ones(K, K), one_hot, one_hot])


def test_propagated_probabilities_equal_official():
    got = propagated_probabilities(seeded_feats(2, K + 2 * LBS), anchor_labels(),
                                   seeded_feats(3, UBS), alpha=0.2, temperature=0.1)
    assert torch.allclose(got, torch.tensor(PROPAGATED), **TOL)


def test_smoothed_contrastive_loss_and_gradient_equal_official():
    feat = seeded_feats(4, K + 2 * LBS + 3 * UBS).requires_grad_(True)
    anchors, weak, s1, s2 = feat.split([K + 2 * LBS, UBS, UBS, UBS])
    loss = smoothed_contrastive_loss(anchors, anchor_labels(), weak, s1, s2, alpha=0.2,
                                     temperature=0.1, power=4.0)
    loss.backward()
    assert [float(loss.detach()), *checksums(feat.grad, 5)] == pytest.approx(SMOOTHED, rel=1e-5,
                                                                      abs=2e-6)


def test_reliable_contrastive_loss_and_gradient_equal_official():
    g = torch.Generator().manual_seed(6)
    soft = torch.softmax(torch.randn(3, K, generator=g) * 2, 1)
    soft = soft ** 4 / (soft ** 4).sum(1, keepdim=True)
    labels = torch.cat([anchor_labels(), soft, soft])
    feat = seeded_feats(7, K + 2 * LBS + 6).requires_grad_(True)
    loss = reliable_contrastive_loss(feat, labels, K, temperature=0.1)
    loss.backward()
    assert [float(loss.detach()), *checksums(feat.grad, 8)] == pytest.approx(RELIABLE, rel=1e-5,
                                                                      abs=2e-6)


def _step_tensors(step: int):
    """The reference run's logits of both heads and labeled targets at ``step``."""
    gen = torch.Generator().manual_seed(100 + step)
    n = LBS + 3 * UBS
    logits = torch.randn(n, K, generator=gen) * 3
    boost = torch.randint(0, K, (n,), generator=gen)
    logits[torch.arange(n), boost] += 12 * (torch.rand(n, generator=gen) > 0.4)
    balanced = torch.randn(n, K, generator=gen) * 3 + logits * 0.5
    targets = torch.randint(0, K, (LBS,), generator=gen)
    return logits.requires_grad_(True), balanced.requires_grad_(True), targets


def test_twelve_steps_of_classification_and_estimates_equal_official():
    """Losses, gradients, masks and labels of every step, with the priors carried over (they
    move at steps 5, 7, 9 and 11), and the final estimates."""
    cfg = CCLConfig(uratio=1, estimate_unlabeled_momentum=0.5, estimate_all_momentum=0.9,
                    epoch_iters=4, update_every=2, estimate_after_epochs=0)
    algo = CCL(cfg, K, D, torch.tensor([0, 0, 0, 1, 0, 1, 2, 3]))
    for step, (loss_ref, grads_ref, n_mask, n_low, targets_ref, target_sum) in enumerate(STEPS):
        logits, balanced, y = _step_tensors(step)
        batch = Batch(torch.zeros(LBS, 1), y, torch.arange(LBS))
        algo.start_window(step)
        loss, (soft, low_energy), logs = algo._classification(
            batch, StepState(step, 100, None, None), *logits.split([LBS, UBS, UBS, UBS]),
            *balanced.split([LBS, UBS, UBS, UBS]), torch.zeros(UBS, D))
        loss.backward()
        assert float(loss.detach()) == pytest.approx(loss_ref, rel=1e-5), step
        assert checksums(logits.grad, 9) + checksums(balanced.grad, 10) == pytest.approx(
            grads_ref, rel=1e-4, abs=1e-5), step
        assert int(logs["pseudo/mask"].sum()) == n_mask and int(low_energy.sum()) == n_low
        assert logs["pseudo/final"].tolist() == targets_ref, step
        assert float((soft * torch.arange(1, K + 1)).sum()) == pytest.approx(target_sum,
                                                                             rel=1e-5)
    assert torch.allclose(algo.prior_all, torch.tensor(PRIOR_ALL), **TOL)
    assert torch.allclose(algo.prior_unlabeled, torch.tensor(PRIOR_UNLABELED), **TOL)
