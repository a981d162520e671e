"""Every algorithm trains two CPU steps, with the identity refiner and with a hook-recording
stub (so DASO composes with each); pseudo-label logs follow the contract."""
from __future__ import annotations

import math

import pytest
import torch

from imbssl.algorithms import StepState, ops, registry
from imbssl.errors import UserError
from imbssl.pseudo import IdentityRefiner

from .conftest import BATCH, NUM_CLASSES, StubRefiner, make_batch, make_setup, train_steps

SSL = ["fixmatch", "mixmatch", "remixmatch", "simmatch"]
ALL = ["supervised", *SSL]
HOOKS = ["update_labeled", "refine", "observe", "extra_loss", "pseudo_logs"]


def test_registry_has_all():
    assert set(ALL) <= set(registry())


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("use_stub", [False, True], ids=["identity", "stub"])
def test_two_steps_finite(name, use_stub):
    refiner = StubRefiner() if use_stub else None
    if use_stub and name == "supervised":
        with pytest.raises(UserError, match="add pseudo=none"):  # labeled data only: no refiner
            make_setup(name, refiner)
        return
    algo, model, ema, opt, labels = make_setup(name, refiner)
    before = [p.detach().clone() for p in model.parameters()]
    results = train_steps(algo, model, ema, opt, labels)
    for loss, logs, batch in results:
        assert loss.ndim == 0 and math.isfinite(float(loss))
        for key, value in logs.items():
            assert isinstance(value, torch.Tensor), key
            if key.startswith("pseudo/"):
                assert value.shape == (len(batch.x_ulb[0]),), key
            else:
                assert value.ndim == 0 and torch.isfinite(value), key
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    if name != "supervised":
        logs = results[-1][1]
        assert {"pseudo/linear", "pseudo/final", "pseudo/mask"} <= set(logs)
        assert logs["pseudo/mask"].dtype == torch.float32


# MixMatch has no alignment loss (official DASO lib/algorithm/mixmatch.py): no extra_loss hook
ALIGNING = ["fixmatch", "remixmatch", "simmatch"]


def expected_hooks(name):
    return HOOKS if name in ALIGNING else [h for h in HOOKS if h != "extra_loss"]


@pytest.mark.parametrize("name", SSL)
def test_refiner_hooks_called_once_per_step(name):
    stub = StubRefiner()
    algo, model, ema, opt, labels = make_setup(name, stub)
    results = train_steps(algo, model, ema, opt, labels, steps=1)
    assert stub.calls == expected_hooks(name)
    logs = results[0][1]
    n_ulb = len(results[0][2].x_ulb[0])
    assert stub.seen["labeled_features"].shape == (BATCH, model.feat_dim)
    assert stub.seen["probs"].shape == (n_ulb, NUM_CLASSES)
    assert torch.allclose(stub.seen["probs"].sum(-1), torch.ones(n_ulb), atol=1e-5)
    assert not stub.seen["features_weak"].requires_grad
    assert torch.equal(stub.seen["observed"], logs["pseudo/final"])
    assert "pseudo/semantic" in logs
    if name in ALIGNING:
        assert stub.seen["strong_requires_grad"]  # the alignment loss trains the backbone
        assert "loss/stub" in logs
    else:
        assert "loss/stub" not in logs


class _ForceClassRefiner(IdentityRefiner):
    """Replaces every pseudo-label distribution by a confident one-hot on class 2."""

    def refine(self, probs, features_weak, step):
        out = torch.zeros_like(probs)
        out[:, 2] = 1.0
        return out


@pytest.mark.parametrize("name", SSL)
def test_refined_probs_decide_final_label_and_mask(name):
    # the refiner acts before the threshold (FixMatch, SimMatch) and before the targets
    algo, model, ema, opt, labels = make_setup(name, _ForceClassRefiner(), threshold=0.95) \
        if name in ("fixmatch", "simmatch") else make_setup(name, _ForceClassRefiner())
    _, logs, _ = train_steps(algo, model, ema, opt, labels, steps=1)[0]
    assert bool((logs["pseudo/final"] == 2).all())
    if name == "fixmatch":
        assert bool((logs["pseudo/mask"] == 1).all())  # one-hot passes the threshold


def test_fixmatch_dist_align_updates_state():
    algo, model, ema, opt, labels = make_setup("fixmatch", dist_align="labeled")
    train_steps(algo, model, ema, opt, labels, steps=2)
    assert int(algo.dist_align.count) == 2
    assert "dist_align.history" in algo.state_dict()


def test_remixmatch_rotation_head_and_loss():
    algo, model, ema, opt, labels = make_setup("remixmatch")
    assert model.heads["rotation"].out_features == 4
    _, logs, _ = train_steps(algo, model, ema, opt, labels, steps=1)[0]
    assert logs["loss/rotation"] > 0 and int(algo.dist_align.count) == 1


def test_mixmatch_rampup_scales_unlabeled_loss():
    # at step 0 the ramp is 0, so the loss equals the labeled term (plus nothing else)
    algo, model, ema, opt, labels = make_setup("mixmatch")
    batch = make_batch(algo, labels)
    loss, logs = algo.step(batch, StepState(0, 1000, model, ema.model))
    assert torch.allclose(loss.detach(), logs["loss/labeled"])
    assert 0.5 <= float(logs["mixup/lambda"]) <= 1.0


@pytest.mark.parametrize("name", SSL)
def test_composes_with_real_daso(name):
    daso = pytest.importorskip("imbssl.pseudo.daso")

    class Capturing(daso.DASO):
        def extra_loss(self, features_weak, features_strong, step):
            loss, logs = super().extra_loss(features_weak, features_strong, step)
            self.captured = loss
            return loss, logs

    refiner = Capturing(NUM_CLASSES, 64, queue_size=4, warmup_iters=0)
    algo, model, ema, opt, labels = make_setup(name, refiner)
    for loss, logs, _ in train_steps(algo, model, ema, opt, labels):
        assert math.isfinite(float(loss))
        assert "pseudo/semantic" in logs
        if name in ALIGNING:
            assert "loss/daso_align" in logs
            assert refiner.captured.requires_grad  # the alignment loss reaches the backbone
        else:  # MixMatch + DASO: blending only (official variant)
            assert "loss/daso_align" not in logs and not hasattr(refiner, "captured")


@pytest.mark.parametrize("name", ALL)
def test_step_under_bf16_autocast(name):
    algo, model, ema, opt, labels = make_setup(name, StubRefiner() if name in SSL else None)
    batch = make_batch(algo, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = algo.step(batch, StepState(3, 10, model, ema.model))
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(float(loss.detach()))
    if "pseudo/mask" in logs:
        assert logs["pseudo/mask"].dtype == torch.float32


def test_mixmatch_daso_blends_sharpened_average_with_view1_semantics():
    """Official DASO MixMatch: refine() gets Sharpen((p1 + p2) / 2, T) and the features of
    the FIRST weak view (from the same guess pass), without gradient; no alignment loss."""
    stub = StubRefiner()
    algo, model, ema, opt, labels = make_setup("mixmatch", stub)
    batch = make_batch(algo, labels)
    with torch.no_grad():
        out = model(torch.cat(batch.x_ulb))  # the guess pass: both weak views together
    n = len(batch.x_ulb[0])
    p1, p2 = out.logits[:n].softmax(-1), out.logits[n:].softmax(-1)
    loss, logs = algo.step(batch, StepState(5, 10, model, ema.model))
    torch.testing.assert_close(stub.seen["probs"], ops.sharpen((p1 + p2) / 2, 0.5))
    torch.testing.assert_close(stub.seen["features_weak"], out.features[:n])
    assert not stub.seen["features_weak"].requires_grad
    assert "extra_loss" not in stub.calls and "loss/stub" not in logs
    assert torch.equal(logs["pseudo/final"], stub.seen["probs"].argmax(-1))
