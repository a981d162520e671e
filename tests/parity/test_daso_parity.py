"""Parity with the official DASO code (github.com/ytaek-oh/daso at commit
3541a6c452f895056f5fdac440b5d0c557dea9f0: lib/algorithm/daso.py ``DASO.run_step``,
lib/models/daso_model.py ``DASOModel.forward_train``, lib/models/feature_queue.py,
lib/utils/dist_logger.py) over 60 steps of a FixMatch + DASO step on feature vectors.

Reference values: analysis/parity_official_daso.py's harness (official modules imported
unmodified, the WRN encoder the identity, the EMA model a fixed linear map) was run once with
K = 10, D = 16, queue 32, T_proto 0.05, T_dist 1.5, labeled batch 16, unlabeled 32, warm-up 20,
m_hat window 10, gamma 100, seed 0, recording per step the official values below; the official
code is not part of this repository. ``inputs`` below draws the same tensors in the same
order. Per step: (sum of the blended pseudo-label probabilities p' weighted by class 1..K,
confident images, m_hat weighted by class 1..K (after the first refresh), the semantic
alignment loss (after warm-up), the sum of |gradient| of that loss on the strong features).
"""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from imbssl.pseudo.daso import DASO

K, D, QUEUE, LB, UB, STEPS, WARMUP, WINDOW, GAMMA = 10, 16, 32, 16, 32, 60, 20, 10, 100.0
OFFICIAL = [
    (75.520694, 27, None, None, 0.0),
    (64.826208, 27, None, None, 0.0),
    (80.456713, 26, None, None, 0.0),
    (83.647191, 26, None, None, 0.0),
    (83.094319, 28, None, None, 0.0),
    (86.618072, 28, None, None, 0.0),
    (84.474833, 27, None, None, 0.0),
    (69.375218, 28, None, None, 0.0),
    (84.1086, 27, None, None, 0.0),
    (94.969278, 23, None, None, 0.0),
    (79.228387, 26, 2.503125, None, 0.0),
    (91.343335, 28, 2.503125, None, 0.0),
    (80.148917, 24, 2.503125, None, 0.0),
    (72.190344, 29, 2.503125, None, 0.0),
    (59.250406, 26, 2.503125, None, 0.0),
    (92.290616, 26, 2.503125, None, 0.0),
    (74.818204, 27, 2.503125, None, 0.0),
    (67.362013, 28, 2.503125, None, 0.0),
    (72.123362, 25, 2.503125, None, 0.0),
    (86.791625, 24, 2.396875, None, 0.0),
    (91.542166, 21, 2.396875, 1.920121, 8.684844),
    (95.060705, 20, 2.396875, 1.601037, 6.531816),
    (96.484538, 17, 2.396875, 1.442354, 8.260579),
    (94.792122, 21, 2.396875, 1.707943, 8.908569),
    (101.79115, 16, 2.396875, 1.103465, 6.555106),
    (83.736547, 18, 2.396875, 1.594234, 6.069355),
    (116.334159, 17, 2.396875, 1.931694, 8.211401),
    (101.945981, 18, 2.396875, 2.186941, 8.17625),
    (107.678669, 24, 2.396875, 1.34806, 5.677769),
    (101.964507, 22, 2.996875, 1.257681, 5.834129),
    (87.815057, 21, 2.996875, 2.015284, 8.741037),
    (105.728941, 16, 2.996875, 1.23458, 7.624148),
    (99.07746, 25, 2.996875, 1.270077, 5.87413),
    (117.591313, 17, 2.996875, 1.578204, 7.930825),
    (135.882734, 15, 2.996875, 2.241623, 8.858914),
    (89.747152, 16, 2.996875, 1.877074, 8.188935),
    (88.899372, 21, 2.996875, 1.143417, 6.47122),
    (94.803994, 15, 2.996875, 1.988844, 8.598937),
    (98.792551, 16, 2.996875, 2.431855, 9.657353),
    (93.08132, 20, 3.146875, 1.858321, 7.346666),
    (92.545657, 22, 3.146875, 1.695328, 8.70805),
    (91.41616, 18, 3.146875, 1.919364, 8.040109),
    (99.286729, 19, 3.146875, 2.39728, 9.653334),
    (85.895313, 15, 3.146875, 1.66866, 7.748872),
    (85.292142, 21, 3.146875, 1.717368, 5.875082),
    (86.884744, 21, 3.146875, 1.398369, 6.025671),
    (93.014916, 20, 3.146875, 1.591127, 7.30452),
    (88.409608, 19, 3.146875, 1.510935, 6.833124),
    (94.54824, 24, 3.146875, 1.983646, 9.538258),
    (87.079685, 19, 2.703125, 2.343488, 7.349349),
    (87.998089, 22, 2.703125, 1.857068, 9.108115),
    (89.562321, 24, 2.703125, 1.612607, 6.708068),
    (93.735354, 17, 2.703125, 2.30365, 8.236047),
    (88.961635, 22, 2.703125, 2.096158, 8.069537),
    (114.552709, 17, 2.703125, 1.640482, 6.426656),
    (96.284342, 15, 2.703125, 1.969379, 8.152273),
    (89.908767, 23, 2.703125, 1.614515, 8.165921),
    (92.547754, 21, 2.703125, 1.746374, 7.162046),
    (90.059021, 15, 2.703125, 2.758743, 10.219545),
    (107.204914, 20, 2.759375, 1.780515, 7.292657),
]


def inputs():
    """Per step (labeled EMA features, labels, weak features, strong features, classifier
    weight, bias), drawn as the reference harness drew them."""
    gen = torch.Generator().manual_seed(0)
    k = torch.arange(K, dtype=torch.float64)
    prior = GAMMA ** (-k / (K - 1))
    prior = (prior / prior.sum()).float()
    means = F.normalize(torch.randn(K, D, generator=gen), dim=-1) * 2.0
    ema = torch.eye(D) + 0.1 * torch.randn(D, D, generator=gen)
    for _ in range(STEPS):
        y_l = torch.multinomial(prior, LB, replacement=True, generator=gen)
        y_u = torch.multinomial(prior, UB, replacement=True, generator=gen)
        x_l = means[y_l] + 0.6 * torch.randn(LB, D, generator=gen)
        x_w = means[y_u] + 0.6 * torch.randn(UB, D, generator=gen)
        x_s = x_w + 0.8 * torch.randn(UB, D, generator=gen)
        yield x_l @ ema.t(), y_l, x_w, x_s, 3.0 * means, prior.log()


def test_daso_steps_equal_official():
    ours = DASO(K, D, queue_size=QUEUE, proto_temperature=0.05, dist_temperature=1.5,
                warmup_iters=WARMUP, dist_window=WINDOW, align_weight=1.0)
    w = torch.arange(1, K + 1, dtype=torch.float64)
    for step, (f_l, y_l, x_w, x_s, weight, bias) in enumerate(inputs()):
        p_sum, mask, m_hat, align, grad = OFFICIAL[step]
        ours.update_labeled(f_l, y_l)
        refined = ours.refine(F.linear(x_w, weight, bias).softmax(dim=-1), x_w, step)
        conf, final = refined.max(dim=-1)
        ours.observe(final)
        feats_s = x_s.clone().requires_grad_(True)
        loss, _ = ours.extra_loss(x_w, feats_s, step)
        assert float((refined.double() * w).sum()) == pytest.approx(p_sum, abs=1e-4), step
        assert int((conf >= 0.95).sum()) == mask, step
        if m_hat is not None:
            assert float((ours.m_hat.double() * w).sum()) == pytest.approx(m_hat, abs=1e-5), step
        if align is not None:
            assert float(loss.detach()) == pytest.approx(align, abs=1e-5), step
            loss.backward()
            assert float(feats_s.grad.double().abs().sum()) == pytest.approx(grad, abs=1e-4), step
