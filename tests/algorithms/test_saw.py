"""SAW (Lai et al., ICML 2022): hand-computed effective-number weights, the step's weighted
losses, the per-image pseudo-label memory, exact state round trip, digits-LT runs."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn import functional as F

from imbssl.algorithms import StepState
from imbssl.algorithms.saw import effective_weights

from .conftest import NUM_CLASSES, make_batch, make_setup, train_steps


def test_effective_weights_hand_computed():
    counts = torch.tensor([10.0, 1.0, 0.0])
    w = (1 - 0.5) / (1 - 0.5 ** torch.tensor([10.0, 1.0, 1.0]))  # zero counts as one
    assert torch.allclose(effective_weights(counts, 0.5, 1.0), 3 * w / w.sum())
    auto = effective_weights(torch.tensor([4.0, 2.0]), 1.0, 2.0)  # beta = (3 - 1) / 3
    w = (1 / 3) / (1 - (2 / 3) ** torch.tensor([4.0, 2.0]))
    assert torch.allclose(auto, 2 * 2 * w / w.sum())


def test_step_weights_the_losses_by_class():
    algo, model, ema, opt, labels = make_setup("saw", threshold=0.0)
    algo.unlabeled_weights.copy_(torch.tensor([0.5, 1.0, 1.5]))
    batch = make_batch(algo, labels)
    with torch.no_grad():
        out = model(torch.cat([batch.x_lb, *batch.x_ulb]))
    n, u = len(batch.x_lb), len(batch.x_ulb[0])
    logits_x, logits_w, logits_s = out.logits[:n], out.logits[n:n + u], out.logits[n + u:]
    pseudo = logits_w.argmax(-1)
    want_x = (F.cross_entropy(logits_x, batch.y_lb, reduction="none")
              * algo.labeled_weights[batch.y_lb]).mean()
    want_u = (F.cross_entropy(logits_s, pseudo, reduction="none")
              * algo.unlabeled_weights[pseudo]).mean()
    with torch.no_grad():
        _, logs = algo.step(batch, StepState(1, 100, model, ema.model))
    assert torch.allclose(logs["loss/labeled"], want_x, atol=1e-6)
    assert torch.allclose(logs["loss/unlabeled"], want_u, atol=1e-6)
    assert torch.equal(algo.latest_pseudo[batch.idx_ulb], logs["pseudo/final"])


def test_weights_update_after_each_epoch_and_state_round_trips():
    kwargs = dict(epoch_iters=2, threshold=0.5)
    algo, model, ema, opt, labels = make_setup("saw", **kwargs)
    assert torch.equal(algo.unlabeled_weights, torch.ones(NUM_CLASSES))  # first epoch: ones
    train_steps(algo, model, ema, opt, labels, steps=3)  # weights recomputed after step 1
    assert int((algo.latest_pseudo >= 0).sum()) == 2 * 8  # the conftest's indices 0..15
    state = algo.state_dict()
    assert {"labeled_weights", "unlabeled_weights", "latest_pseudo"} <= set(state)
    fresh, *_ = make_setup("saw", **kwargs)
    fresh.load_state_dict(state)
    for key in ("labeled_weights", "unlabeled_weights", "latest_pseudo"):
        assert torch.equal(getattr(fresh, key), getattr(algo, key)), key
    batch = make_batch(algo, labels)
    results = [a.step(batch, StepState(3, 10, model, ema.model)) for a in (algo, fresh)]
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(algo.unlabeled_weights, fresh.unlabeled_weights)


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match="beta"):
        make_setup("saw", beta=0.0)
    with pytest.raises(ValueError, match="normalize"):
        make_setup("saw", normalize=0.0)


@pytest.mark.parametrize("pseudo", ["none", "daso"])
def test_digits_lt_cli_run(tmp_path, pseudo):
    """``imbssl train algorithm=saw pseudo=none|daso``; the weights update every step."""
    from .test_abc import run_digits_cli

    extra = ["pseudo.warmup_iters=1"] if pseudo == "daso" else []
    run = run_digits_cli(tmp_path, "algorithm=saw", f"pseudo={pseudo}",
                         "algorithm.epoch_iters=1", *extra)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert all(math.isfinite(r["saw/weight_max"]) for r in train)
    assert any("loss/daso_align" in r for r in train) == (pseudo == "daso")
