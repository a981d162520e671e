"""DebiasPL (Wang et al., CVPR 2022): hand-computed debiasing, q_hat update and margin loss;
the step's pseudo-labels follow the debiased probabilities; exact state round trip; digits-LT
runs."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn import functional as F

from imbssl.algorithms import StepState
from imbssl.algorithms.debiaspl import debiased_probs, margin_loss, updated_qhat

from .conftest import NUM_CLASSES, make_batch, make_setup, train_steps


def test_debiasing_hand_computed():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    qhat = torch.tensor([0.5, 0.25, 0.25])
    want = torch.softmax(logits - 0.5 * torch.log(qhat), dim=-1)
    assert torch.allclose(debiased_probs(logits, qhat, 0.5), want)
    assert torch.allclose(debiased_probs(logits, qhat, 0.0), torch.softmax(logits, dim=-1))
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert torch.allclose(updated_qhat(qhat, probs, 0.75),
                          0.75 * qhat + 0.25 * torch.tensor([0.5, 0.5, 0.0]))
    strong, pseudo, mask = torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([1.0, 0.0])
    adjusted = 0.5 * torch.log(qhat).expand(2, 3)  # the head's margin is the largest
    want = F.cross_entropy(adjusted, pseudo, reduction="none")[0] / 2
    assert torch.allclose(margin_loss(strong, pseudo, mask, qhat, 0.5), want)


def test_step_labels_follow_the_debiased_probabilities():
    algo, model, ema, opt, labels = make_setup("debiaspl", threshold=0.5, qhat_momentum=0.9)
    algo.qhat.copy_(torch.tensor([0.6, 0.3, 0.1]))
    batch = make_batch(algo, labels)
    with torch.no_grad():
        out = model(torch.cat([batch.x_lb, *batch.x_ulb]))
    n, u = len(batch.x_lb), len(batch.x_ulb[0])
    weak = out.logits[n:n + u]
    debiased = debiased_probs(weak, torch.tensor([0.6, 0.3, 0.1]), 0.4)
    loss, logs = algo.step(batch, StepState(0, 100, model, ema.model))
    assert torch.equal(logs["pseudo/final"], debiased.argmax(-1))
    assert torch.equal(logs["pseudo/mask"], debiased.max(-1).values.ge(0.5).float())
    assert torch.equal(logs["pseudo/linear"], weak.argmax(-1))
    want_q = 0.9 * torch.tensor([0.6, 0.3, 0.1]) + 0.1 * torch.softmax(weak, dim=-1).mean(0)
    assert torch.allclose(algo.qhat, want_q, atol=1e-6) and math.isfinite(float(loss.detach()))


def test_qhat_round_trips_and_the_next_step_is_identical():
    algo, model, ema, opt, labels = make_setup("debiaspl", qhat_momentum=0.5)
    train_steps(algo, model, ema, opt, labels, steps=3)
    assert not torch.allclose(algo.qhat, torch.full((NUM_CLASSES,), 1 / NUM_CLASSES))
    fresh, *_ = make_setup("debiaspl", qhat_momentum=0.5)
    fresh.load_state_dict(algo.state_dict())
    assert torch.equal(fresh.qhat, algo.qhat)
    batch = make_batch(algo, labels)
    results = [a.step(batch, StepState(3, 10, model, ema.model)) for a in (algo, fresh)]
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(algo.qhat, fresh.qhat)


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match="qhat_momentum"):
        make_setup("debiaspl", qhat_momentum=1.0)
    with pytest.raises(ValueError, match="debias_tau"):
        make_setup("debiaspl", debias_tau=-0.1)


@pytest.mark.parametrize("pseudo", ["none", "daso"])
def test_digits_lt_cli_run(tmp_path, pseudo):
    """``imbssl train algorithm=debiaspl pseudo=none|daso``."""
    from .test_abc import run_digits_cli

    extra = ["pseudo.warmup_iters=1"] if pseudo == "daso" else []
    run = run_digits_cli(tmp_path, "algorithm=debiaspl", f"pseudo={pseudo}", *extra)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert all(0 < r["debiaspl/qhat_min"] <= r["debiaspl/qhat_max"] < 1 for r in train)
    assert any("loss/daso_align" in r for r in train) == (pseudo == "daso")
