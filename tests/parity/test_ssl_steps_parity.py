"""Parity with the official training steps of Pseudo-Label, Mean Teacher and FixMatch + ABC
in DASO (github.com/ytaek-oh/daso at commit 3541a6c452f895056f5fdac440b5d0c557dea9f0:
lib/algorithm/pseudo_label.py, lib/algorithm/mean_teacher.py (without DASO),
lib/algorithm/fm_abc.py with lib/algorithm/fixmatch.py's base, the official losses of
lib/models/losses/ and ``cons_rampup_func`` of lib/algorithm/base_ssl_algorithm.py).

Reference values: each official ``run_step`` was executed once, unmodified, on a host object
(optimizer, meters and scheduler do nothing; ``_write_metrics`` records the loss dict) whose
network treats the inputs as features and classifies them with fixed linear maps (the EMA
network another one), on the tensors ``tensors(seed)`` below draws, at the iterations named in
the keys (Pseudo-Label and Mean Teacher: MAX_ITER 100, ramp-up ratio 0.4, Pseudo-Label's
threshold 0.5 so that some images pass; ABC: MAX_ITER 250000, threshold 0.5, labeled counts
(40, 20, 10, 5), ``torch.manual_seed(5)`` before the step, so both sides draw the same
Bernoulli masks). The official code is not part of this repository. (A shim: PyTorch >= 2
refuses the official in-place ``detach_`` of a view; it was replaced by ``detach``, the same
values.)
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from imbssl.algorithms import Batch, StepState, get_algorithm
from imbssl.models.base import ModelOutput

D, K = 6, 4
OFFICIAL = {
    "pseudolabel_0": {
        "loss_cls": 7.152686595916748,
        "loss_cons": 0.0
    },
    "meanteacher_0": {
        "loss_cls": 7.152686595916748,
        "loss_cons": 0.0
    },
    "pseudolabel_30": {
        "loss_cls": 7.152686595916748,
        "loss_cons": 0.10509759932756424
    },
    "meanteacher_30": {
        "loss_cls": 7.152686595916748,
        "loss_cons": 14.478216171264648
    },
    "pseudolabel_100": {
        "loss_cls": 7.152686595916748,
        "loss_cons": 0.14013013243675232
    },
    "meanteacher_100": {
        "loss_cls": 7.152686595916748,
        "loss_cons": 19.304288864135742
    },
    "abc_0": {
        "loss_abc": 9.17809009552002,
        "loss_cls": 9.985939025878906,
        "loss_cons": 5.388530731201172
    },
    "abc_125000": {
        "loss_abc": 8.057372093200684,
        "loss_cls": 9.985939025878906,
        "loss_cons": 5.388530731201172
    },
    "abc_249999": {
        "loss_abc": 7.28247594833374,
        "loss_cls": 9.985939025878906,
        "loss_cons": 5.388530731201172
    }
}


def tensors(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(w=torch.randn(K, D, generator=g) * 2, b=torch.randn(K, generator=g),
                wa=torch.randn(K, D, generator=g) * 2, ba=torch.randn(K, generator=g),
                we=torch.randn(K, D, generator=g) * 2, be=torch.randn(K, generator=g),
                x_l=torch.randn(8, D, generator=g), y_l=torch.randint(0, K, (8,), generator=g),
                x_u1=torch.randn(16, D, generator=g), x_u2=torch.randn(16, D, generator=g))


class LinearNet(nn.Module):
    """The inputs are the features; a fixed linear classifier and the ABC head."""

    def __init__(self, w, b, wa, ba):
        super().__init__()
        self.w, self.b = nn.Parameter(w.clone()), nn.Parameter(b.clone())
        abc = nn.Linear(D, K)
        with torch.no_grad():
            abc.weight.copy_(wa)
            abc.bias.copy_(ba)
        self.heads = nn.ModuleDict({"abc": abc})

    def forward(self, x):
        return ModelOutput(F.linear(x, self.w, self.b), x)


def run(name: str, seed: int, step: int, total: int, labels=None, **cfg):
    t = tensors(seed)
    cls = get_algorithm(name)
    counts = labels if labels is not None else torch.arange(K).repeat(5)
    algo = cls(cls.Config(**cfg), K, D, counts)
    model = LinearNet(t["w"], t["b"], t["wa"], t["ba"])
    ema = LinearNet(t["we"], t["be"], t["wa"], t["ba"])
    views = [t["x_u1"], t["x_u2"]][:len(algo.unlabeled_views)]
    batch = Batch(x_lb=t["x_l"], y_lb=t["y_l"], idx_lb=torch.arange(8), x_ulb=views,
                  idx_ulb=torch.arange(16))
    torch.manual_seed(5)
    return algo.step(batch, StepState(step, total, model, ema))


@pytest.mark.parametrize("step", [0, 30, 100])
def test_pseudolabel_equals_official(step):
    loss, logs = run("pseudolabel", 0, step, 100, threshold=0.5)
    want = OFFICIAL[f"pseudolabel_{step}"]
    assert float(logs["loss/labeled"]) == pytest.approx(want["loss_cls"], abs=1e-5)
    assert float(loss.detach()) == pytest.approx(want["loss_cls"] + want["loss_cons"], abs=1e-5)


@pytest.mark.parametrize("step", [0, 30, 100])
def test_meanteacher_equals_official(step):
    loss, logs = run("meanteacher", 0, step, 100)
    want = OFFICIAL[f"meanteacher_{step}"]
    assert float(logs["loss/labeled"]) == pytest.approx(want["loss_cls"], abs=1e-5)
    assert float(loss.detach()) == pytest.approx(want["loss_cls"] + want["loss_cons"], abs=1e-4)


@pytest.mark.parametrize("step", [0, 125000, 249999])
def test_abc_equals_official(step):
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate((40, 20, 10, 5))])
    loss, logs = run("abc", 1, step, 250000, labels=labels, threshold=0.5)
    want = OFFICIAL[f"abc_{step}"]
    abc = float(logs["loss/abc_labeled"]) + float(logs["loss/abc_unlabeled"])
    assert abc == pytest.approx(want["loss_abc"], abs=1e-5)
    assert float(logs["loss/labeled"]) == pytest.approx(want["loss_cls"], abs=1e-5)
    assert float(logs["loss/unlabeled"]) == pytest.approx(want["loss_cons"], abs=1e-5)
