"""Parity with the official Mean Teacher + DASO step (github.com/ytaek-oh/daso at commit
3541a6c452f895056f5fdac440b5d0c557dea9f0: lib/algorithm/mean_teacher.py ``run_step`` with
``ALGORITHM.MEANTEACHER.APPLY_DASO``, lib/models/feature_queue.py, lib/utils/dist_logger.py,
the official MSE loss and ``cons_rampup_func``) over 40 steps on feature vectors.

Reference values: the official ``run_step`` was executed once, unmodified, on a host object
(the harness of tests/parity/test_ssl_steps_parity.py; the student's encoder the identity and
its classifier ``3 * means``, the EMA network a fixed linear map ``W`` followed by the
classifier ``2.5 * means``; K 5, D 8, queue 16 per class, T_proto 0.05, T_dist 1.5, warm-up
10, m_hat window 5, 16 labeled and 16 unlabeled images, MAX_ITER 1000, UNLABELED_LOSS_WEIGHT
50, ramp-up 0.4) on the tensors ``inputs`` below draws; the official code is not part of this
repository. Per step: (loss_cls, loss_cons = ramp * 50 * MSE of the softmaxes).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from imbssl.algorithms import Batch, StepState, get_algorithm
from imbssl.models.base import ModelOutput
from imbssl.pseudo.daso import DASO

K, D, STEPS, WARMUP, WINDOW, TOTAL = 5, 8, 40, 10, 5, 1000
OFFICIAL = [
    (0.016360288485884666, 0.0),
    (0.06369367241859436, 0.0012557583395391703),
    (0.014595801010727882, 0.0027289383579045534),
    (0.27991190552711487, 0.0023707174696028233),
    (0.17179882526397705, 0.01421337854117155),
    (0.02652376890182495, 0.0009781095432117581),
    (0.2034466415643692, 0.005659562535583973),
    (0.05041222646832466, 0.02426297776401043),
    (0.3259606659412384, 0.002762256423011422),
    (0.3937702178955078, 0.012095593847334385),
    (0.43249502778053284, 0.031730715185403824),
    (0.010081698186695576, 0.017118822783231735),
    (0.05695965886116028, 0.06182495132088661),
    (0.0687529593706131, 0.03534657508134842),
    (0.004580705426633358, 0.042946718633174896),
    (0.08995825052261353, 0.021152358502149582),
    (0.04027527570724487, 0.0002534444793127477),
    (0.03260064497590065, 0.009005286730825901),
    (0.0168867576867342, 0.06416792422533035),
    (0.10536178201436996, 0.037428468465805054),
    (0.05287313461303711, 0.005078188609331846),
    (0.6245951056480408, 3.641340299509466e-05),
    (0.015476870350539684, 0.027668921276926994),
    (0.04159810394048691, 0.005773457698523998),
    (0.35654622316360474, 0.06231416389346123),
    (0.17343997955322266, 0.1264713704586029),
    (0.09999649971723557, 0.023287136107683182),
    (0.011249002069234848, 0.015179753303527832),
    (0.08699434995651245, 0.0475953184068203),
    (0.02421644702553749, 0.0033453823998570442),
    (0.03046322427690029, 0.12191111594438553),
    (0.029738040640950203, 0.00624184450134635),
    (0.04988856613636017, 0.00018482338055036962),
    (0.031548872590065, 0.1375802457332611),
    (0.053892798721790314, 0.04114237800240517),
    (0.20024222135543823, 0.08511000126600266),
    (0.032846976071596146, 0.03391146659851074),
    (0.005211733281612396, 0.15811805427074432),
    (0.013396676629781723, 0.06943435221910477),
    (0.05605776235461235, 0.02168293297290802),
]


class LinearNet(nn.Module):
    def __init__(self, weight, feature_map=None):
        super().__init__()
        self.weight, self.feature_map = weight, feature_map
        self.heads = nn.ModuleDict()

    def forward(self, x):
        feats = x if self.feature_map is None else x @ self.feature_map.t()
        return ModelOutput(F.linear(feats, self.weight), feats)


def inputs():
    g = torch.Generator().manual_seed(4)
    means = F.normalize(torch.randn(K, D, generator=g), dim=-1) * 2.0
    w_ema = torch.eye(D) + 0.1 * torch.randn(D, D, generator=g)
    prior = torch.tensor([0.4, 0.25, 0.15, 0.12, 0.08])
    steps = []
    for _ in range(STEPS):
        y_l = torch.multinomial(prior, 16, replacement=True, generator=g)
        y_u = torch.multinomial(prior, 16, replacement=True, generator=g)
        x_l = means[y_l] + 0.6 * torch.randn(16, D, generator=g)
        x_1 = means[y_u] + 0.6 * torch.randn(16, D, generator=g)
        x_2 = x_1 + 0.3 * torch.randn(16, D, generator=g)
        steps.append((x_l, y_l, x_1, x_2))
    return means, w_ema, steps


def test_meanteacher_daso_steps_equal_official():
    means, w_ema, steps = inputs()
    refiner = DASO(K, D, queue_size=16, proto_temperature=0.05, dist_temperature=1.5,
                   warmup_iters=WARMUP, dist_window=WINDOW)
    cls = get_algorithm("meanteacher")
    algo = cls(cls.Config(), K, D, torch.arange(K).repeat(4), refiner=refiner)
    student, teacher = LinearNet(3.0 * means), LinearNet(2.5 * means, w_ema)
    for step, ((x_l, y_l, x_1, x_2), (l_cls, l_cons)) in enumerate(
            zip(steps, OFFICIAL, strict=True)):
        batch = Batch(x_lb=x_l, y_lb=y_l, idx_lb=torch.arange(16), x_ulb=[x_1, x_2],
                      idx_ulb=torch.arange(16))
        loss, logs = algo.step(batch, StepState(step, TOTAL, student, teacher))
        assert float(logs["loss/labeled"]) == pytest.approx(l_cls, abs=1e-6), step
        assert float(loss.detach()) - float(logs["loss/labeled"]) == pytest.approx(
            l_cons, abs=1e-6), step
