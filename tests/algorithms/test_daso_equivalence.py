"""Issue 5 acceptance: with the blend weights forced to zero (``blend_mode="off"``) and the alignment
weight zero, X+DASO is exactly X: same losses, same pseudo-label logs, same gradients, same
weights after several SGD steps, for the real algorithm classes and the real DASO refiner.

DASO still runs all of its machinery (EMA features of the labeled batch into the queues,
semantic pseudo-labels, m_hat updated every step), so these tests also show that none of it
leaks into training. Controls check the comparison is not vacuous: the unlabeled loss is
non-zero, and turning the blend (or the alignment loss) back on changes the losses.
"""
from __future__ import annotations

import json

import pytest
import torch

from imbssl.algorithms import StepState
from imbssl.pseudo.daso import DASO

from .conftest import NUM_CLASSES, make_batch, make_setup

SSL = ["fixmatch", "mixmatch", "remixmatch", "simmatch"]
ALIGNING = ["fixmatch", "remixmatch", "simmatch"]  # MixMatch+DASO has no alignment loss
STEPS = 4
# threshold 0 keeps FixMatch's / SimMatch's mask all-ones, so their unlabeled loss depends on
# every pseudo-label (with 0.95 an untrained network would mask everything out)
LOW_THRESHOLD = {"fixmatch": {"threshold": 0.0}, "simmatch": {"threshold": 0.0}}
# official ReMixMatch runs other forward passes with DASO than without (batch norm sees other
# batches); both twins use the joint one here, so only DASO itself can make them differ
SAME_PASSES = {"remixmatch": {"passes": "joint"}}


def neutral_daso(feat_dim: int, **kw) -> DASO:
    """The real DASO with blending off and alignment weight 0, active from step 0, and m_hat
    recomputed every step (so a non-zero weight would act at once)."""
    args = dict(queue_size=4, warmup_iters=0, dist_window=1, blend_mode="off", align_weight=0.0)
    args.update(kw)
    return DASO(NUM_CLASSES, feat_dim, **args)


def twin_setups(name: str, daso_kw: dict | None = None, **overrides):
    """(baseline, with DASO): same algorithm config, same initial weights."""
    overrides = {**SAME_PASSES.get(name, {}), **overrides}
    base = make_setup(name, None, **overrides)
    feat_dim = base[1].feat_dim
    with_daso = make_setup(name, neutral_daso(feat_dim, **(daso_kw or {})), **overrides)
    with_daso[1].load_state_dict(base[1].state_dict())
    with_daso[2].model.load_state_dict(base[2].model.state_dict())
    return base, with_daso


def run_twins(name: str, daso_kw: dict | None = None, steps: int = STEPS, **overrides):
    """Train both twins on the same batches with the same RNG state per step; yield per step
    (loss_a, logs_a, grads_a, loss_b, logs_b, grads_b)."""
    (algo_a, model_a, ema_a, opt_a, labels), (algo_b, model_b, ema_b, opt_b, _) = \
        twin_setups(name, daso_kw, **overrides)
    torch.manual_seed(123)
    out = []
    for step in range(steps):
        batch = make_batch(algo_a, labels)
        results = []
        for algo, model, ema, opt in ((algo_a, model_a, ema_a, opt_a),
                                      (algo_b, model_b, ema_b, opt_b)):
            torch.manual_seed(1000 + step)  # MixUp lambda / permutation, rotations
            loss, logs = algo.step(batch, StepState(step, 100, model, ema.model))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()
                     if p.grad is not None}
            opt.step()
            ema.update(model)
            results += [loss.detach(), logs, grads]
        out.append(results)
    return out, (model_a, model_b), (algo_a, algo_b)


@pytest.mark.parametrize("low_threshold", [False, True], ids=["defaults", "threshold0"])
@pytest.mark.parametrize("name", SSL)
def test_neutral_daso_equals_plain_algorithm(name, low_threshold):
    overrides = LOW_THRESHOLD.get(name, {}) if low_threshold else {}
    steps, (model_a, model_b), (_, algo_b) = run_twins(name, **overrides)
    for loss_a, logs_a, grads_a, loss_b, logs_b, grads_b in steps:
        assert torch.equal(loss_a, loss_b)
        # every log of the plain algorithm (losses, mask ratio, pseudo/linear|final|mask) is
        # bit-identical; DASO adds only its semantic pseudo-labels
        assert set(logs_b) - set(logs_a) == {"pseudo/semantic"}
        for key, value in logs_a.items():
            assert torch.equal(value, logs_b[key]), key
        assert grads_a.keys() == grads_b.keys() and grads_a
        for key in grads_a:
            assert torch.equal(grads_a[key], grads_b[key]), key
    for (key, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(),
                           strict=True):
        assert torch.equal(a, b), key
    # DASO was really running: queues filled, m_hat moved away from uniform at some step
    refiner = algo_b.refiner
    assert int(refiner.queue_len.sum()) > 0 and int(refiner.num_observed) == STEPS
    assert bool((logs_b["pseudo/semantic"] >= 0).all())


@pytest.mark.parametrize("name", SSL)
def test_unlabeled_loss_is_not_vacuous(name):
    # the comparison above covers a non-zero unlabeled loss with a non-empty mask
    steps, _, _ = run_twins(name, **LOW_THRESHOLD.get(name, {}))
    logs = steps[-1][1]
    assert float(logs["loss/unlabeled"]) > 0
    assert float(logs["pseudo/mask"].sum()) > 0


@pytest.mark.parametrize("name", SSL)
def test_control_blend_on_changes_the_losses(name):
    # same setup, blending on: the pseudo-labels (hence losses) differ at some step
    steps, _, _ = run_twins(name, daso_kw={"blend_mode": "distribution"}, **LOW_THRESHOLD.get(name, {}))
    assert any(not torch.equal(s[0], s[3]) for s in steps)
    assert any(not torch.equal(s[1]["pseudo/final"], s[4]["pseudo/final"])
               or not torch.equal(s[1]["loss/unlabeled"], s[4]["loss/unlabeled"])
               for s in steps)


@pytest.mark.parametrize("name", ALIGNING)
def test_control_alignment_on_changes_the_losses(name):
    steps, _, _ = run_twins(name, daso_kw={"align_weight": 1.0}, steps=1)
    loss_a, _, _, loss_b, logs_b, _ = steps[0]
    assert "loss/daso_align" in logs_b
    assert torch.allclose(loss_b, loss_a + logs_b["loss/daso_align"], atol=1e-5)
    assert not torch.equal(loss_a, loss_b)


def test_mixmatch_ignores_alignment_weight():
    # official DASO MixMatch: blending only, so align_weight changes nothing
    steps, _, _ = run_twins("mixmatch", daso_kw={"align_weight": 1.0})
    for loss_a, _, _, loss_b, logs_b, _ in steps:
        assert torch.equal(loss_a, loss_b) and "loss/daso_align" not in logs_b


# ------------------------------------------------------------------ through the Trainer
def _train(cfg):
    from imbssl.engine.trainer import Trainer

    trainer = Trainer(cfg)
    trainer.run()
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    return trainer, [r for r in rows if r["split"] in ("train", "test")]


@pytest.mark.parametrize("name", SSL)
def test_trainer_neutral_daso_equals_plain(tiny_cfg, tmp_path, name):
    """End to end on digits-LT: pseudo=daso with blend_mode=off, align_weight=0 (active from
    step 0) logs the same training losses and ends with the same weights as pseudo=none."""
    common = [f"algorithm={name}", "trainer.iterations=6", "trainer.log_interval=1",
              "trainer.eval_interval=3", "trainer.checkpoint_interval=0",
              "trainer.report=false"]
    if name in LOW_THRESHOLD:
        common.append("algorithm.threshold=0.5")
    common += [f"algorithm.{k}={v}" for k, v in SAME_PASSES.get(name, {}).items()]
    plain, rows_a = _train(tiny_cfg(*common, "pseudo=none", f"run_dir={tmp_path / 'a'}"))
    daso, rows_b = _train(tiny_cfg(*common, "pseudo=daso_quick", "pseudo.blend_mode=off",
                                   "pseudo.align_weight=0", "pseudo.warmup_iters=0",
                                   "pseudo.dist_window=1", f"run_dir={tmp_path / 'b'}"))
    assert isinstance(daso.algo.refiner, DASO)
    assert [r["split"] for r in rows_a].count("train") == 6
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key, value in ra.items():
            assert rb[key] == value, (ra["step"], key)  # exact float equality
    for (key, a), b in zip(plain.model.state_dict().items(),
                           daso.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    for a, b in zip(plain.ema.model.state_dict().values(),
                    daso.ema.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
