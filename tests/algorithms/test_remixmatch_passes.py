"""ReMixMatch's forward passes follow the official code per row (issue 21): without a refiner
the baseline's (``lib/algorithm/remixmatch.py``: weak alone without gradient, the MixUp batch,
strong view 1 alone, the rotations); with DASO the joint [weak, strong 1] pass of
``rm_daso.py``. Without batch norm both structures give the same losses."""
from __future__ import annotations

import pytest
import torch

from imbssl.algorithms import StepState, get_algorithm
from imbssl.errors import UserError
from imbssl.models import EMA
from imbssl.models.base import Network
from imbssl.models.small_cnn import SmallCNN

from .conftest import BATCH, NUM_CLASSES, StubRefiner, make_batch, make_setup


def record_passes(model) -> list[tuple[torch.Tensor, bool]]:
    """(input, grad enabled) of every forward of ``model``, in order."""
    seen: list[tuple[torch.Tensor, bool]] = []
    model.register_forward_pre_hook(lambda m, args: seen.append((args[0].detach().clone(),
                                                                 torch.is_grad_enabled())))
    return seen


def run_step(refiner=None, **overrides):
    """One ReMixMatch step on a hand-made batch; (batch, passes the online model ran)."""
    algo, model, ema, _, labels = make_setup("remixmatch", refiner, **overrides)
    batch = make_batch(algo, labels)
    seen = record_passes(model)
    algo.step(batch, StepState(0, 100, model, ema.model))
    return batch, seen


def test_baseline_runs_the_official_separate_passes():
    batch, seen = run_step()
    x_w, x_s1, _ = batch.x_ulb
    n = len(x_w)
    assert [len(x) for x, _ in seen] == [n, BATCH + 3 * n, n, n]
    (first, first_grad), (_, mix_grad), (third, third_grad), (rot, _) = seen
    assert torch.equal(first, x_w) and not first_grad  # the guess: weak alone, no gradient
    assert mix_grad
    assert torch.equal(third, x_s1) and third_grad  # pre-MixUp logits: strong 1 alone
    assert not torch.equal(rot, x_s1)  # some of the rotations are not 0 degrees


def test_daso_runs_the_joint_pass():
    batch, seen = run_step(StubRefiner())
    x_w, x_s1, _ = batch.x_ulb
    n = len(x_w)
    assert [len(x) for x, _ in seen] == [2 * n, BATCH + 3 * n, n]
    assert torch.equal(seen[0][0], torch.cat([x_w, x_s1])) and seen[0][1]


@pytest.mark.parametrize("passes,refiner,sizes", [
    ("joint", False, [2, 3, 1]), ("separate", True, [1, 3, 1, 1]),
])
def test_passes_switch_forces_one_structure(passes, refiner, sizes):
    batch, seen = run_step(StubRefiner() if refiner else None, passes=passes)
    n = len(batch.x_ulb[0])
    assert [len(x) for x, _ in seen] == [s * n if s != 3 else BATCH + 3 * n for s in sizes]


def test_unknown_passes_is_a_user_error():
    with pytest.raises(UserError, match="algorithm.passes"):
        make_setup("remixmatch", passes="interleaved")


def step_results(passes: str, norm: str):
    """Losses, logs and gradients of one step from fixed weights, batch and RNG state."""
    cls = get_algorithm("remixmatch")
    cfg = cls.Config(passes=passes, rampup_ratio=0.0)
    torch.manual_seed(0)
    backbone = SmallCNN(NUM_CLASSES, in_channels=1, norm=norm)
    model = Network(backbone, cls.make_heads(cfg, backbone.feat_dim, NUM_CLASSES)).train()
    labels = torch.arange(20) % NUM_CLASSES
    algo = cls(cfg, NUM_CLASSES, backbone.feat_dim, labels)
    batch = make_batch(algo, labels)
    torch.manual_seed(1)  # MixUp and rotations
    loss, logs = algo.step(batch, StepState(5, 100, model, EMA(model, 0.999).model))
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), logs, grads


def test_without_batch_norm_separate_equals_joint():
    loss_s, logs_s, grads_s = step_results("separate", "none")
    loss_j, logs_j, grads_j = step_results("joint", "none")
    assert float(logs_s["loss/premixup"]) > 0 and float(logs_s["loss/unlabeled"]) > 0
    torch.testing.assert_close(loss_s, loss_j)
    for key in ("loss/labeled", "loss/unlabeled", "loss/premixup", "loss/rotation"):
        torch.testing.assert_close(logs_s[key], logs_j[key], msg=key)
    assert torch.equal(logs_s["pseudo/final"], logs_j["pseudo/final"])
    assert grads_s.keys() == grads_j.keys()
    for key in grads_s:
        torch.testing.assert_close(grads_s[key], grads_j[key], msg=key)


def test_with_batch_norm_the_structures_differ():
    _, logs_s, _ = step_results("separate", "batch")
    _, logs_j, _ = step_results("joint", "batch")
    assert not torch.allclose(logs_s["loss/premixup"], logs_j["loss/premixup"])
    # the MixUp pass and the rotations are the same code in both: same batch, same result
    torch.testing.assert_close(logs_s["loss/rotation"], logs_j["loss/rotation"])
