"""Parity with the official ABC + DASO step (github.com/ytaek-oh/daso at commit
3541a6c452f895056f5fdac440b5d0c557dea9f0: lib/algorithm/daso.py ``DASO.run_step`` with
lib/models/daso_model.py ``forward_train`` under ``ALGORITHM.ABC.APPLY`` and
``ABC.DASO_PSEUDO_LABEL``, lib/models/feature_queue.py, lib/utils/dist_logger.py, the official
cross-entropy of lib/models/losses/) over 40 steps on feature vectors.

Reference values: analysis/parity_official_daso.py's harness with ABC on (the official
modules unmodified; the encoder the identity, the EMA model a fixed linear map, the main
classifier ``3 * means`` with bias ``log prior``, the ABC classifier ``2 * means`` with zero
bias, labeled class counts (300, 180, 110, 66, 40, 24, 14, 9, 5, 3), K 10, D 16, queue 32,
T_proto 0.05, T_dist 1.5, warm-up 10, m_hat window 5, ``torch.manual_seed(1000 + step)`` before
each step for the Bernoulli masks) was run once, recording each step's loss dict; the official
code is not part of this repository. (Shim: PyTorch >= 2 refuses the official in-place
``detach_`` of a view; it was replaced by ``detach``.) Per step: (loss_abc, loss_cls,
loss_cons, loss_assign after warm-up).

Note: the official ``DASOModel.iter`` is set once when the algorithm is built (daso.py line
22), so official ABC + DASO keeps the gradual Bernoulli parameter at 1 all run; within the
first 500 steps checked here imbssl's schedule (official ``fm_abc.py``) is 1 as well
(docs/experiments.md, "ABC and ABC + DASO").
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from imbssl.algorithms import Batch, StepState, get_algorithm
from imbssl.models.base import ModelOutput
from imbssl.pseudo.daso import DASO

K, D, QUEUE, LB, UB, STEPS, WARMUP, WINDOW, GAMMA = 10, 16, 32, 16, 32, 40, 10, 5, 100.0
COUNTS = (300, 180, 110, 66, 40, 24, 14, 9, 5, 3)
OFFICIAL = [
    (0.3556525409221649, 0.1515347957611084, 0.44535699486732483, None),
    (0.6435470581054688, 0.015301935374736786, 0.7597769498825073, None),
    (0.6540567278862, 0.27254241704940796, 0.7792996764183044, None),
    (0.2227901965379715, 0.022018974646925926, 1.020691156387329, None),
    (0.4770291745662689, 0.02446381002664566, 0.8618626594543457, None),
    (0.35628741979599, 0.13786368072032928, 0.7241498827934265, None),
    (0.37164753675460815, 0.06956938654184341, 0.892781138420105, None),
    (0.38612785935401917, 0.06290769577026367, 0.6397318243980408, None),
    (0.1993872970342636, 0.05293923243880272, 0.9364052414894104, None),
    (0.15386122465133667, 0.06796911358833313, 0.26633626222610474, None),
    (0.8455058336257935, 0.12768127024173737, 1.0985987186431885, 1.742557406425476),
    (0.3043336272239685, 0.04477475956082344, 0.2079148143529892, 1.0673736333847046),
    (0.406264066696167, 0.17556189000606537, 0.6337541937828064, 2.2586069107055664),
    (0.9277734756469727, 0.15142840147018433, 0.8884386420249939, 1.5874103307724),
    (0.5488837957382202, 0.06188410520553589, 0.5386236310005188, 1.005942940711975),
    (0.44498878717422485, 0.18158923089504242, 0.6070376634597778, 1.4784443378448486),
    (0.6260269284248352, 0.03874178230762482, 0.589176595211029, 1.8662195205688477),
    (0.5775032639503479, 0.3872922956943512, 0.5373190641403198, 1.4844006299972534),
    (0.3535160422325134, 0.17458803951740265, 0.44158613681793213, 1.635284185409546),
    (0.35243555903434753, 0.00875936634838581, 0.4780750572681427, 1.6489284038543701),
    (0.6070590019226074, 0.09632601588964462, 0.5747994780540466, 1.9201208353042603),
    (0.5794255137443542, 0.05823761224746704, 0.35863450169563293, 1.6010373830795288),
    (0.2966558635234833, 0.017739349976181984, 0.24338434636592865, 1.4423537254333496),
    (0.6203283667564392, 0.4030814468860626, 0.890302300453186, 1.7079434394836426),
    (0.37887176871299744, 0.39418408274650574, 0.48195135593414307, 1.1034650802612305),
    (0.2957940399646759, 0.19987179338932037, 0.08624200522899628, 1.5942341089248657),
    (0.3050312399864197, 0.07533763349056244, 0.6609516739845276, 1.9316935539245605),
    (0.8248586058616638, 0.13378103077411652, 0.7462734580039978, 2.1869406700134277),
    (0.6309941411018372, 0.038913920521736145, 0.41640883684158325, 1.3480596542358398),
    (0.27256760001182556, 0.07350517064332962, 0.23490417003631592, 1.2576813697814941),
    (0.6538028717041016, 0.05048990249633789, 0.2734360992908478, 2.0152838230133057),
    (0.135284885764122, 0.015122358687222004, 0.04188714921474457, 1.234580159187317),
    (0.4326016306877136, 0.16193662583827972, 0.46100205183029175, 1.2700767517089844),
    (0.4075692594051361, 0.06265214830636978, 0.6934190988540649, 1.578203797340393),
    (0.3734045624732971, 0.1231796070933342, 0.27983587980270386, 2.2416231632232666),
    (0.533334493637085, 0.08159255236387253, 0.34147971868515015, 1.8770742416381836),
    (0.6832533478736877, 0.04897104948759079, 0.5731014609336853, 1.1434171199798584),
    (0.21779629588127136, 0.019681205973029137, 0.048278991132974625, 1.988844394683838),
    (0.4714379608631134, 0.06730933487415314, 0.4978243112564087, 2.431854724884033),
    (0.14678481221199036, 0.21307295560836792, 0.9307326674461365, 1.8583214282989502),
]


class LinearNet(nn.Module):
    """Features = input (x @ ema^T for the EMA network); fixed main and ABC classifiers."""

    def __init__(self, weight, bias, abc_weight, ema=None):
        super().__init__()
        self.weight, self.bias, self.ema = weight, bias, ema
        abc = nn.Linear(D, K)
        with torch.no_grad():
            abc.weight.copy_(abc_weight)
            abc.bias.zero_()
        self.heads = nn.ModuleDict({"abc": abc})

    def forward(self, x):
        feats = x if self.ema is None else x @ self.ema.t()
        return ModelOutput(F.linear(feats, self.weight, self.bias), feats)


def inputs():
    gen = torch.Generator().manual_seed(0)
    k = torch.arange(K, dtype=torch.float64)
    prior = GAMMA ** (-k / (K - 1))
    prior = (prior / prior.sum()).float()
    means = F.normalize(torch.randn(K, D, generator=gen), dim=-1) * 2.0
    ema = torch.eye(D) + 0.1 * torch.randn(D, D, generator=gen)
    steps = []
    for _ in range(STEPS):
        y_l = torch.multinomial(prior, LB, replacement=True, generator=gen)
        y_u = torch.multinomial(prior, UB, replacement=True, generator=gen)
        x_l = means[y_l] + 0.6 * torch.randn(LB, D, generator=gen)
        x_w = means[y_u] + 0.6 * torch.randn(UB, D, generator=gen)
        x_s = x_w + 0.8 * torch.randn(UB, D, generator=gen)
        steps.append((x_l, y_l, x_w, x_s))
    return prior, means, ema, steps


def test_abc_daso_steps_equal_official():
    prior, means, ema_w, steps = inputs()
    refiner = DASO(K, D, queue_size=QUEUE, proto_temperature=0.05, dist_temperature=1.5,
                   warmup_iters=WARMUP, dist_window=WINDOW, align_weight=1.0)
    cls = get_algorithm("abc")
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])
    algo = cls(cls.Config(threshold=0.95, daso_pseudo_label=True), K, D, labels,
               refiner=refiner)
    model = LinearNet(3.0 * means, prior.log(), 2.0 * means)
    ema = LinearNet(3.0 * means, prior.log(), 2.0 * means, ema=ema_w)
    for step, ((x_l, y_l, x_w, x_s), (l_abc, l_cls, l_cons, l_assign)) in enumerate(
            zip(steps, OFFICIAL, strict=True)):
        batch = Batch(x_lb=x_l, y_lb=y_l, idx_lb=torch.arange(LB), x_ulb=[x_w, x_s],
                      idx_ulb=torch.arange(UB))
        torch.manual_seed(1000 + step)
        _, logs = algo.step(batch, StepState(step, 250000, model, ema))
        abc = float(logs["loss/abc_labeled"]) + float(logs["loss/abc_unlabeled"])
        assert abc == pytest.approx(l_abc, abs=1e-5), step
        assert float(logs["loss/labeled"]) == pytest.approx(l_cls, abs=1e-5), step
        assert float(logs["loss/unlabeled"]) == pytest.approx(l_cons, abs=1e-5), step
        if l_assign is not None:
            assert float(logs["loss/daso_align"]) == pytest.approx(l_assign, abs=1e-5), step
