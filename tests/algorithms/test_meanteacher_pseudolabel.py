"""Mean Teacher and Pseudo-Label (the DASO paper's baselines): their losses on a recomputed
case, the teacher without gradient, the ramp, and tiny digits-LT runs (+ DASO / DARP)."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from imbssl.algorithms import StepState
from imbssl.algorithms.base import forward_all

from .conftest import make_batch, make_setup
from .tiny_runs import tiny_run


def test_pseudolabel_loss_recomputed():
    algo, model, ema, _, labels = make_setup("pseudolabel", threshold=0.4, lambda_u=2.0,
                                             rampup_ratio=0.5)
    assert algo.unlabeled_views == ("weak",) and algo.cfg.uratio == 1
    batch = make_batch(algo, labels)
    step, total = 3, 10  # ramp = min(3 / (0.5 * 10), 1) = 0.6
    loss, logs = algo.step(batch, StepState(step, total, model, ema.model))
    (lx, _), (lu, _) = forward_all(model, batch.x_lb, batch.x_ulb[0])
    probs = torch.softmax(lu.detach(), -1)
    conf, pseudo = probs.max(-1)
    mask = (conf >= 0.4).float()
    want_u = (F.cross_entropy(lu, pseudo, reduction="none") * mask).mean()
    want = F.cross_entropy(lx, batch.y_lb) + 2.0 * 0.6 * want_u
    assert torch.isclose(loss, want, rtol=1e-4)
    assert torch.equal(logs["pseudo/final"], pseudo) and torch.equal(logs["pseudo/mask"], mask)
    assert torch.equal(logs["pseudo/linear"], probs.argmax(-1))


def test_meanteacher_loss_and_teacher_without_gradient():
    algo, model, ema, _, labels = make_setup("meanteacher", lambda_u=50.0, rampup_ratio=0.4)
    assert algo.unlabeled_views == ("weak", "weak")
    batch = make_batch(algo, labels)
    loss, logs = algo.step(batch, StepState(2, 10, model, ema.model))  # ramp 2 / 4 = 0.5
    (lx, _), (lu, _) = forward_all(model, batch.x_lb, batch.x_ulb[0])
    with torch.no_grad():
        teacher = torch.softmax(ema.model(batch.x_ulb[1]).logits, -1)
    want_u = ((torch.softmax(lu, -1) - teacher) ** 2).mean()  # mean over images and classes
    assert torch.isclose(logs["loss/unlabeled"], want_u, rtol=1e-4)
    assert torch.isclose(loss, F.cross_entropy(lx, batch.y_lb) + 50.0 * 0.5 * want_u, rtol=1e-4)
    loss.backward()
    assert all(p.grad is None for p in ema.model.parameters())  # the teacher is not trained
    assert any(p.grad is not None for p in model.parameters())
    assert torch.equal(logs["pseudo/mask"], torch.ones(len(batch.x_ulb[0])))


def test_ramp_starts_at_zero():
    for name in ("meanteacher", "pseudolabel"):
        algo, model, ema, _, labels = make_setup(name)
        loss, logs = algo.step(make_batch(algo, labels), StepState(0, 10, model, ema.model))
        assert torch.isclose(loss, logs["loss/labeled"])


def test_refiner_hooks_are_called(stub_refiner):
    for name in ("meanteacher", "pseudolabel"):
        stub_refiner.calls.clear()
        algo, model, ema, _, labels = make_setup(name, refiner=stub_refiner)
        _, logs = algo.step(make_batch(algo, labels), StepState(0, 10, model, ema.model))
        # no semantic alignment loss (official: no second view / not added)
        assert stub_refiner.calls == ["update_labeled", "refine", "observe", "pseudo_logs"]
        assert "pseudo/semantic" in logs


@pytest.mark.parametrize("overrides", [
    ["algorithm=meanteacher", "pseudo=none"],
    ["algorithm=pseudolabel", "pseudo=none"],
    ["algorithm=meanteacher", "pseudo=daso_quick", "pseudo.warmup_iters=1"],
    ["algorithm=pseudolabel", "pseudo=darp", "pseudo.warmup_ratio=0.25", "pseudo.per_iters=1"],
], ids=["meanteacher", "pseudolabel", "meanteacher_daso", "pseudolabel_darp"])
def test_digits_runs(tmp_path, overrides):
    tiny_run(tmp_path / "run", *overrides)
