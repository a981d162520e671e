"""SAW parity: imbssl's class weights and weighted losses equal the official code's on fixed
seeded tensors, the unlabeled weights over three epochs of per-image pseudo-label updates.

Reference values: computed once by running ``getClassWeights`` of ``imbOptim/classWeights.py``
(type ``effective``, ``normalize`` 1, ``const`` 0.99 and 1), ``prob2Distribution`` of
``dataset/dataTools.py`` over the per-image memory ``pseudo_orig`` of ``train_fix_cifar10.py``
(updated as its ``train`` does) and ``SemiLoss`` of ``train_fix_cifar10.py``, from
github.com/ZJUJeffLai/SAW_SSL (commit 44157ca21f0a46335355e3e4e9b266e3a4f34ceb), on CPU.
"""
from __future__ import annotations

import pytest
import torch

from imbssl.algorithms import get_algorithm
from imbssl.algorithms.saw import effective_weights, weighted_cross_entropy

K, NU = 4, 24
GT_L = torch.tensor([50.0, 20.0, 8.0, 3.0])
REF = {
    "labeled_099": [0.18534795939922333, 0.40205448865890503, 0.9476543068885803,
                    2.4649434089660645],
    "labeled_auto": [0.3407319486141205, 0.4925186038017273, 0.941540539264679,
                     2.2252087593078613],
    "unlabeled_099": [[0.7141699194908142, 0.9428158402442932, 1.400198221206665,
                       0.9428158402442932],
                      [1.3244602680206299, 0.6755398511886597, 1.3244602680206299,
                       0.6755398511886597],
                      [1.1618260145187378, 0.838174045085907, 0.838174045085907,
                       1.1618260145187378]],
    "unlabeled_auto": [[0.8350791335105896, 0.9635610580444336, 1.2377985715866089,
                        0.9635610580444336],
                       [1.1942803859710693, 0.8057196140289307, 1.1942803859710693,
                        0.8057196140289307],
                       [1.0930949449539185, 0.9069051146507263, 0.9069051146507263,
                        1.0930949449539185]],
    "Lx": 2.065549850463867,
    "Lu": 1.457810878753662,
}


def _stream():
    """The reference run's 3 epochs x 4 steps of (unlabeled indices, weak logits), then the
    loss tensors; the first epoch visits every index."""
    g = torch.Generator().manual_seed(0)
    steps = []
    for epoch in range(3):
        for it in range(4):
            if epoch:
                idx = torch.randperm(NU, generator=g)[:8]
            else:
                idx = torch.arange(it * 6, it * 6 + 8) % NU
            logits = torch.randn(8, K, generator=g) * 2
            logits[:, 0] += 1.0 - epoch
            steps.append((idx, logits))
    lx, tx = torch.randn(5, K, generator=g), torch.randint(0, K, (5,), generator=g)
    lu, tu = torch.randn(6, K, generator=g), torch.randint(0, K, (6,), generator=g)
    mask = (torch.rand(6, generator=g) > 0.3).float()
    return steps, (lx, tx, lu, tu, mask)


@pytest.mark.parametrize("beta,key", [(0.99, "labeled_099"), (1.0, "labeled_auto")])
def test_labeled_weights_equal_the_official(beta, key):
    assert torch.allclose(effective_weights(GT_L, beta, 1.0), torch.tensor(REF[key]), atol=1e-6)


@pytest.mark.parametrize("beta,key", [(0.99, "unlabeled_099"), (1.0, "unlabeled_auto")])
def test_unlabeled_weights_over_three_epochs_equal_the_official(beta, key):
    """The algorithm's own path: per-image pseudo-labels recorded every step, the weights
    recomputed after every 4-step epoch."""
    cls = get_algorithm("saw")
    algo = cls(cls.Config(beta=beta, epoch_iters=4), K, 8, torch.tensor([0, 0, 0, 1, 2, 3]))
    steps, _ = _stream()
    for step, (idx, logits) in enumerate(steps):
        algo.record(idx, torch.softmax(logits, dim=1).argmax(dim=1))
        algo.end_epoch(step)
        if (step + 1) % 4 == 0:
            want = torch.tensor(REF[key][step // 4])
            assert torch.allclose(algo.unlabeled_weights, want, atol=1e-6), step


def test_weighted_losses_equal_the_official_semiloss():
    _, (lx, tx, lu, tu, mask) = _stream()
    wx, wu = torch.tensor(REF["labeled_099"]), torch.tensor(REF["unlabeled_099"][-1])
    assert abs(float(weighted_cross_entropy(lx, tx, wx)) - REF["Lx"]) < 1e-6
    assert abs(float(weighted_cross_entropy(lu, tu, wu, mask)) - REF["Lu"]) < 1e-6
