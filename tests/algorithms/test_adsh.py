"""Adsh (Guo and Li, ICML 2022): hand-computed selection and score update, the step's
pseudo-labels follow the rectified probabilities, exact state round trip, digits-LT runs."""
from __future__ import annotations

import json
import math

import pytest
import torch

from imbssl.algorithms import StepState
from imbssl.algorithms.adsh import adaptive_scores, head_fraction, rectified_selection

from .conftest import make_batch, make_setup, train_steps


def test_rectified_selection_hand_computed():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.96, 0.02, 0.02], [0.5, 0.45, 0.05]])
    scores = torch.tensor([0.95, 0.4, 0.9])
    mask, labels = rectified_selection(probs, scores)
    # row 0: 0.6/0.95 < 0.3/0.4 = 0.75 -> class 1, not kept; row 1: 0.96/0.95 >= 1 -> class 0;
    # row 2: 0.45/0.4 = 1.125 -> class 1, kept (FixMatch would drop it)
    assert labels.tolist() == [1, 0, 1] and mask.tolist() == [0.0, 1.0, 1.0]
    fixmatch = rectified_selection(probs, torch.full((3,), 0.95))
    assert fixmatch[0].tolist() == [0.0, 1.0, 0.0] and fixmatch[1].tolist() == [0, 0, 0]


def test_head_fraction_and_scores_hand_computed():
    assert head_fraction(torch.tensor([0.99, 0.97, 0.5, 0.4]), 0.95) == 0.5
    assert head_fraction(torch.tensor([0.9, 0.5]), 0.95) == 1.0  # none confident: 1.0
    assert head_fraction(torch.tensor([]), 0.95) == 1.0
    conf = torch.tensor([0.99, 0.97, 0.5, 0.4, 0.9, 0.8, 0.7, 0.6, 0.99, 0.98])
    pred = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    scores, rho = adaptive_scores(conf, pred, torch.full((4,), 0.95), 0.95, head=0)
    # rho 0.5: class 1 keeps its top 2 (index round(4 * 0.5 - 1) = 1 -> 0.8); class 2's
    # value 0.99 is clipped to tau; class 3 has no predictions and keeps its score
    assert rho == 0.5
    assert torch.allclose(scores, torch.tensor([0.95, 0.8, 0.95, 0.95]))


def test_step_labels_follow_the_rectified_probabilities():
    algo, model, ema, opt, labels = make_setup("adsh")
    algo.scores.copy_(torch.tensor([0.95, 0.3, 0.4]))
    batch = make_batch(algo, labels)
    with torch.no_grad():
        out = model(torch.cat([batch.x_lb, *batch.x_ulb]))
    n, u = len(batch.x_lb), len(batch.x_ulb[0])
    probs = torch.softmax(out.logits[n:n + u], dim=-1)
    loss, logs = algo.step(batch, StepState(1, 100, model, ema.model))
    want_mask, want = rectified_selection(probs, algo.scores)
    assert torch.equal(logs["pseudo/final"], want) and torch.equal(logs["pseudo/mask"], want_mask)
    assert torch.equal(logs["pseudo/linear"], probs.argmax(-1))
    assert int(algo.epoch_count) == u and math.isfinite(float(loss.detach()))


def test_scores_update_at_epoch_starts_and_state_round_trips():
    kwargs = dict(epoch_iters=2, update_after_epochs=0, threshold=0.5)
    algo, model, ema, opt, labels = make_setup("adsh", **kwargs)
    train_steps(algo, model, ema, opt, labels, steps=5)  # updates at steps 2 and 4, 1 recorded
    assert int(algo.epoch_count) == 8 * 2  # one batch of mu * B since step 4
    state = algo.state_dict()
    assert {"scores", "rho", "epoch_conf", "epoch_pred", "epoch_count"} <= set(state)
    fresh, *_ = make_setup("adsh", **kwargs)
    fresh.load_state_dict(state)
    for key in ("scores", "rho", "epoch_conf", "epoch_pred", "epoch_count"):
        assert torch.equal(getattr(fresh, key), getattr(algo, key)), key
    batch = make_batch(algo, labels)
    results = [a.step(batch, StepState(6, 10, model, ema.model)) for a in (algo, fresh)]
    assert torch.equal(results[0][0], results[1][0])
    for key in ("scores", "epoch_conf", "epoch_count"):
        assert torch.equal(getattr(fresh, key), getattr(algo, key)), key


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match="epoch_iters"):
        make_setup("adsh", epoch_iters=0)
    with pytest.raises(ValueError, match="threshold"):
        make_setup("adsh", threshold=0.0)


@pytest.mark.parametrize("pseudo", ["none", "daso"])
def test_digits_lt_cli_run(tmp_path, pseudo):
    """``imbssl train algorithm=adsh pseudo=none|daso``; scores update every step."""
    from .test_abc import run_digits_cli

    extra = ["pseudo.warmup_iters=1"] if pseudo == "daso" else []
    run = run_digits_cli(tmp_path, "algorithm=adsh", f"pseudo={pseudo}",
                         "algorithm.epoch_iters=1", "algorithm.update_after_epochs=0", *extra)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert all(0.0 < r["adsh/rho"] <= 1.0 for r in train)
    assert any("loss/daso_align" in r for r in train) == (pseudo == "daso")
