"""ACR (Wei and Gan, CVPR 2023): the adjustment, the estimate, the adaptive tau on
hand-computed cases; the step's target follows the adjusted logits; exact state round trip."""
from __future__ import annotations

import json
import math

import pytest
import torch

from imbssl.algorithms import StepState
from imbssl.algorithms.acr import (
    BALANCED_HEAD,
    adaptive_tau,
    anchor_divergences,
    logit_adjustment,
    symmetric_kl,
)
from imbssl.models.base import ModelOutput

from .conftest import NUM_CLASSES, make_batch, make_setup, train_steps


def test_logit_adjustment_hand_computed():
    prior = torch.tensor([0.5, 0.3, 0.2])
    want = [math.log(0.25 + 1e-12), math.log(0.09 + 1e-12), math.log(0.04 + 1e-12)]
    assert torch.allclose(logit_adjustment(prior, 2.0), torch.tensor(want))
    assert torch.allclose(logit_adjustment(prior, torch.tensor(0.0)),
                          torch.full((3,), math.log(1 + 1e-12)))  # tau 0: no adjustment


def test_symmetric_kl_and_anchors_hand_computed():
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    kl_qp = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    kl_pq = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert math.isclose(float(symmetric_kl(p, q)), 0.5 * (kl_qp + kl_pq), rel_tol=1e-6)
    prior = torch.tensor([0.6, 0.3, 0.1])
    d = anchor_divergences(prior.clone(), prior)  # the estimate equals the labeled prior
    assert float(d[0]) == pytest.approx(0.0, abs=1e-7)
    assert float(d[1]) > 0 and float(d[2]) > float(d[1])  # reversed is the farthest
    assert float(d[1]) == pytest.approx(float(symmetric_kl(torch.full((3,), 1 / 3), prior)))


def test_adaptive_tau_hand_computed():
    # softmax([0, ln 2, ln 3])[0] = 1 / (1 + 2 + 3)
    tau = adaptive_tau(torch.tensor([0.0, math.log(2), math.log(3)]), 0.0, 2.0)
    assert float(tau) == pytest.approx(2.0 / 6.0)
    tau = adaptive_tau(torch.tensor([math.log(4), 0.0, 0.0]), 0.5, 2.5)
    assert float(tau) == pytest.approx(0.5 + 2.0 * 4 / 6)


def test_update_estimate_hand_computed():
    """One 0/1 mark per class (the official indexed add), not a count: class 0 is predicted
    twice, confidently, and still weighs as much as class 1."""
    algo, *_ = make_setup("acr", estimate_momentum=0.9)
    preds = torch.tensor([0, 0, 1, 2])
    algo.update_estimate(preds, torch.tensor([True, True, True, False]))
    want = 0.9 * torch.full((3,), 1 / 3) + 0.1 * torch.tensor([1 / 2, 1 / 2, 0.0])
    assert torch.allclose(algo.u_py, want)
    assert torch.allclose(algo.kl_sum, anchor_divergences(want, algo.labeled_prior))
    before = (algo.u_py.clone(), algo.kl_sum.clone())
    algo.update_estimate(preds, torch.zeros(4, dtype=torch.bool))  # nothing confident
    assert torch.equal(algo.u_py, before[0]) and torch.equal(algo.kl_sum, before[1])


def test_tau_schedule_per_epoch():
    """epoch_iters 10, estimation after epoch 1: tau = tau_max until step 20, then
    tau_max / 3 (the empty sum of epoch 1), then from the mean divergences of epoch 2."""
    algo, model, ema, opt, labels = make_setup("acr", epoch_iters=10, estimate_after_epochs=1,
                                               threshold=1e-6)
    for step in (0, 10, 19):
        algo.start_epoch(step)
        assert float(algo.tau) == 2.0 and not algo.estimating(step)
    algo.start_epoch(20)
    assert algo.estimating(20) and float(algo.tau) == pytest.approx(2.0 / 3.0)
    kl = torch.tensor([3.0, 1.0, 2.0])
    algo.kl_sum.copy_(kl * 10)
    algo.start_epoch(25)  # not an epoch start: nothing
    assert float(algo.tau) == pytest.approx(2.0 / 3.0)
    algo.start_epoch(30)
    assert float(algo.tau) == pytest.approx(float(2.0 * torch.softmax(kl, 0)[0]))
    assert float(algo.kl_sum.abs().sum()) == 0.0
    algo.kl_sum.fill_(float("inf"))  # not finite: tau keeps its value
    algo.start_epoch(40)
    assert float(algo.tau) == pytest.approx(float(2.0 * torch.softmax(kl, 0)[0]))


def test_step_target_is_the_adjusted_standard_head_prediction():
    algo, model, ema, opt, labels = make_setup("acr", threshold=0.5)
    algo.tau.fill_(1.5)
    batch = make_batch(algo, labels)
    with torch.no_grad():  # the same concatenated forward pass (batch-norm batch statistics)
        out = model(torch.cat([batch.x_lb, *batch.x_ulb]))
    n, u = len(batch.x_lb), len(batch.x_ulb[0])
    weak = out.logits[n:n + u]
    adjusted = torch.softmax(weak - logit_adjustment(algo.labeled_prior, 1.5), dim=-1)
    raw = torch.softmax(weak, dim=-1)
    loss, logs = algo.step(batch, StepState(0, 100, model, ema.model))
    assert torch.equal(logs["pseudo/final"], adjusted.argmax(-1))
    assert torch.equal(logs["pseudo/linear"], raw.argmax(-1))
    want_mask = ((adjusted.max(-1).values >= 0.5) | (raw.max(-1).values >= 0.5)).float()
    assert torch.equal(logs["pseudo/mask"], want_mask)
    assert float(logs["acr/tau"]) == 1.5 and math.isfinite(float(loss.detach()))


def test_estimator_state_round_trips_and_the_next_step_is_identical():
    kwargs = dict(epoch_iters=2, estimate_after_epochs=0, threshold=1e-6)
    algo, model, ema, opt, labels = make_setup("acr", **kwargs)
    train_steps(algo, model, ema, opt, labels, steps=5)
    state = algo.state_dict()
    assert {"u_py", "kl_sum", "tau"} <= set(state)
    assert not torch.allclose(algo.u_py, torch.full((NUM_CLASSES,), 1 / NUM_CLASSES))
    fresh, *_ = make_setup("acr", **kwargs)
    fresh.load_state_dict(state)
    for key in ("u_py", "kl_sum", "tau"):
        assert torch.equal(getattr(fresh, key), getattr(algo, key)), key
    batch = make_batch(algo, labels)
    results = []
    for a in (algo, fresh):
        torch.manual_seed(7)
        with torch.no_grad():
            results.append(a.step(batch, StepState(6, 10, model, ema.model)))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(algo.u_py, fresh.u_py) and torch.equal(algo.kl_sum, fresh.kl_sum)


def test_balanced_head_trains_and_evaluates():
    algo, model, ema, opt, labels = make_setup("acr")
    before = model.heads[BALANCED_HEAD].weight.detach().clone()
    for loss, logs, _ in train_steps(algo, model, ema, opt, labels):
        assert math.isfinite(float(loss))
        assert {"loss/balanced_labeled", "loss/balanced_unlabeled", "acr/tau"} <= set(logs)
    assert not torch.equal(before, model.heads[BALANCED_HEAD].weight)
    feats = torch.randn(4, model.feat_dim)
    predict = algo.eval_predictor(ema.model)
    out = ModelOutput(torch.zeros(4, NUM_CLASSES), feats)
    assert torch.allclose(predict(out), ema.model.heads[BALANCED_HEAD](feats))


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match="estimate_momentum"):
        make_setup("acr", estimate_momentum=1.0)
    with pytest.raises(ValueError, match="tau_max"):
        make_setup("acr", tau_max=-1.0)


@pytest.mark.parametrize("pseudo", ["none", "daso"])
def test_digits_lt_cli_run(tmp_path, pseudo):
    """``imbssl train algorithm=acr pseudo=none|daso``; the tau update runs (epoch of 1)."""
    from .test_abc import run_digits_cli

    extra = ["pseudo.warmup_iters=1"] if pseudo == "daso" else []
    run = run_digits_cli(tmp_path, "algorithm=acr", f"pseudo={pseudo}",
                         "algorithm.epoch_iters=1", "algorithm.estimate_after_epochs=0", *extra)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert all("loss/balanced_unlabeled" in r and math.isfinite(r["acr/tau"]) for r in train)
    assert any("loss/daso_align" in r for r in train) == (pseudo == "daso")
