"""Adsh parity: imbssl's score update and selection equal the official code's on fixed seeded
logits, over four epochs of score updates (the scores carry over).

Reference values: computed once by running ``update_s`` of ``train.py`` and
``ADSH.forward`` of ``algorithms/fixmatch.py`` from github.com/guolz-ml/Class-Imbalanced-SSL
(commit 0d92a9f255c1926db3086f4ba48b88c1ba57ee1f) with an identity "network" (the inputs are
the logits), a 2-batch unlabeled loader per epoch, num_classes 4, threshold 0.95, on CPU.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from imbssl.algorithms import get_algorithm
from imbssl.algorithms.adsh import adaptive_scores, rectified_selection

K, TAU, N = 4, 0.95, 40
SCALES = (3.0, 6.0, 9.0, 1.0)
# official update_s after each epoch (class 0: the head, its score stays tau); epoch 3 has
# every head confidence >= tau, epoch 4 none (rho = 1.0: the smallest confidence)
REF_SCORES = [
    [0.95, 0.8316376805305481, 0.95, 0.8692480325698853],
    [0.95, 0.602578341960907, 0.892143726348877, 0.6930791139602661],
    [0.95, 0.95, 0.7606435418128967, 0.34010401368141174],
    [0.95, 0.4472030997276306, 0.32895737886428833, 0.3438413441181183],
]
REF_LOSS = 0.8752809166908264  # official ADSH.forward with the last scores


def _epochs():
    """The seeded logits of the four epochs and the weak/strong batch (as the reference run)."""
    g = torch.Generator().manual_seed(0)
    epochs = []
    for scale in SCALES:
        logits = torch.randn(N, K, generator=g)
        cls = torch.randint(0, K, (N,), generator=g) * (torch.rand(N, generator=g) > 0.4)
        margin = scale * torch.tensor([1.0, 0.6, 0.45, 0.35])[cls]
        logits[torch.arange(N), cls] += margin
        epochs.append(logits)
    weak = torch.randn(6, K, generator=g) * 4
    strong = torch.randn(6, K, generator=g)
    return epochs, weak, strong


def test_scores_over_four_epochs_equal_the_official_update():
    epochs, _, _ = _epochs()
    scores = torch.full((K,), TAU)
    for logits, want in zip(epochs, REF_SCORES):
        conf, pred = torch.softmax(logits, dim=-1).max(dim=-1)
        scores, _ = adaptive_scores(conf, pred, scores, TAU, head=0)
        assert torch.allclose(scores, torch.tensor(want), atol=1e-6), (scores, want)


def test_algorithm_buffers_reproduce_the_official_scores_epoch_by_epoch():
    """The algorithm's own path: two recorded batches an epoch, scores at the next epoch start."""
    cls = get_algorithm("adsh")
    cfg = cls.Config(epoch_iters=2, update_after_epochs=0)
    algo = cls(cfg, K, 8, torch.tensor([0] * 5 + [1, 2, 3]))
    epochs, _, _ = _epochs()
    step = 0
    for logits, want in zip(epochs, REF_SCORES):
        for half in logits.split(N // 2):
            algo.start_epoch(step)
            algo.record(*torch.softmax(half, dim=-1).max(dim=-1))
            step += 1
        algo.start_epoch(step)  # uses the epoch just recorded
        assert torch.allclose(algo.scores, torch.tensor(want), atol=1e-6)


def test_unlabeled_loss_equals_the_official_forward():
    _, weak, strong = _epochs()
    mask, labels = rectified_selection(torch.softmax(weak, dim=-1), torch.tensor(REF_SCORES[-1]))
    loss = (F.cross_entropy(strong, labels, reduction="none") * mask).mean()
    assert abs(float(loss) - REF_LOSS) < 1e-6
