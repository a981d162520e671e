"""SimMatch: unfolding/aggregation on a toy bank (hand-computed) and the labeled memory bank."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from imbssl.algorithms.base import StepState, forward_all
from imbssl.algorithms.ops import one_hot
from imbssl.algorithms.simmatch import propagate

from .conftest import make_batch, make_setup, train_steps


def test_propagate_two_classes_golden():
    bank = one_hot(torch.tensor([0, 0, 1]), 2)  # three bank entries, classes 0, 0, 1
    p = torch.tensor([[0.8, 0.2]])
    q = torch.tensor([[0.5, 0.25, 0.25]])
    p_hat, q_hat = propagate(p, q, bank, alpha=0.9)
    # unfolding: p^unfold = [0.8, 0.8, 0.2]; q * p^unfold = [0.4, 0.2, 0.05] / 0.65
    assert torch.allclose(q_hat, torch.tensor([[0.4, 0.2, 0.05]]) / 0.65, atol=1e-6)
    # aggregation: q^agg = [0.75, 0.25]; 0.9 * [0.8, 0.2] + 0.1 * [0.75, 0.25]
    assert torch.allclose(p_hat, torch.tensor([[0.795, 0.205]]), atol=1e-6)


def test_propagate_three_classes_golden():
    bank = one_hot(torch.tensor([2, 0, 1, 2]), 3)
    p = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    p_hat, q_hat = propagate(p, q, bank, alpha=0.5)
    # row 0: unfold [0.5, 0.2, 0.3, 0.5] -> q*unfold [0.05, 0.04, 0.09, 0.2] / 0.38
    #        agg [0.2, 0.3, 0.5] -> p^ = 0.5 * p + 0.5 * agg = [0.2, 0.3, 0.5]
    # row 1: unfold [0, 1, 0, 0] -> q^ = [0, 1, 0, 0]; agg [0.25, 0.25, 0.5]
    #        p^ = [0.625, 0.125, 0.25]
    assert torch.allclose(q_hat[0], torch.tensor([0.05, 0.04, 0.09, 0.2]) / 0.38, atol=1e-6)
    assert torch.allclose(q_hat[1], torch.tensor([0.0, 1.0, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(p_hat, torch.tensor([[0.2, 0.3, 0.5], [0.625, 0.125, 0.25]]),
                          atol=1e-6)
    assert torch.allclose(p_hat.sum(-1), torch.ones(2))


def test_bank_holds_unit_embeddings_of_labeled_batch():
    algo, model, ema, opt, labels = make_setup("simmatch")
    assert algo.bank.shape == (len(labels), 128)
    assert torch.equal(algo.bank_labels, labels)
    assert not bool(algo.bank_filled.any())
    (_, _, batch), = train_steps(algo, model, ema, opt, labels, steps=1)
    # structure: written rows are unit norm, others 0 (values: the teacher test below)
    idx = batch.idx_lb
    assert bool(algo.bank_filled[idx].all())
    assert int(algo.bank_filled.sum()) == len(idx.unique())
    assert torch.allclose(algo.bank[idx].norm(dim=-1), torch.ones(len(idx)), atol=1e-5)
    untouched = ~algo.bank_filled
    assert bool((algo.bank[untouched] == 0).all())


def test_bank_update_matches_ema_model():
    algo, model, ema, opt, labels = make_setup("simmatch")
    batch_x = torch.randn(4, 1, 8, 8)
    idx = torch.tensor([3, 7, 0, 11])

    class _B:
        x_lb, idx_lb = batch_x, idx

    with torch.no_grad():
        ema_features = ema.model(batch_x).features
        algo.update_bank(_B, ema.model, ema_features)
        expected = F.normalize(ema.model.heads["projection"](ema_features), dim=-1)
    assert torch.allclose(algo.bank[idx], expected, atol=1e-6)


def test_unwritten_slots_get_zero_similarity():
    algo, *_ = make_setup("simmatch")
    algo.bank[0] = F.normalize(torch.ones(128), dim=0)
    algo.bank_filled[0] = True
    sim = torch.softmax(algo.similarities(F.normalize(torch.randn(2, 128), dim=-1)), -1)
    assert torch.allclose(sim[:, 0], torch.ones(2))
    assert bool((sim[:, 1:] == 0).all())


@pytest.mark.parametrize("teacher", ["online", "ema"])
def test_one_teacher_writes_the_bank_and_guesses_the_weak_view(teacher):
    """teacher=online: the bank holds the online model's embeddings of the labeled batch from
    the joint [labeled, weak, strong] pass (USB CIFAR); teacher=ema: the EMA model's, from its
    [labeled, weak] pass (official SimMatch). The weak-view guess comes from the same network."""
    algo, model, ema, _, labels = make_setup("simmatch", teacher=teacher)
    with torch.no_grad():  # make the EMA differ from the online model
        for p in ema.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = make_batch(algo, labels)
    _, logs = algo.step(batch, StepState(0, 10, model, ema.model))
    net = model if teacher == "online" else ema.model
    views = batch.x_ulb if teacher == "online" else batch.x_ulb[:1]
    with torch.no_grad():
        outs = forward_all(net, batch.x_lb, *views)
        expected = F.normalize(net.heads["projection"](outs[0][1]), dim=-1)
        linear = outs[1][0].argmax(-1)
    assert torch.allclose(algo.bank[batch.idx_lb], expected, atol=1e-5)
    assert torch.equal(logs["pseudo/linear"], linear)


def test_unknown_teacher_is_refused():
    with pytest.raises(ValueError, match="teacher"):
        make_setup("simmatch", teacher="student")
