"""MixMatch ablation switches (MixMatch paper Table 4): each changes exactly what it says."""
from __future__ import annotations

import math

import pytest
import torch

from imbssl.algorithms import StepState, ops
from imbssl.algorithms.mixmatch import MIXUP_MODES, mix_batches
from imbssl.engine.config import experiment_generator
from imbssl.errors import UserError

from .conftest import NUM_CLASSES, StubRefiner, make_batch, make_setup, train_steps

N_LB, N_U = 4, 8


def tagged_batch():
    """Row i of [labeled; unlabeled] is the basis vector e_i, as image and as label, so the
    support of a mixed row says exactly which rows were mixed into it."""
    eye = torch.eye(N_LB + N_U)
    x = eye.view(N_LB + N_U, 1, 1, N_LB + N_U)
    return x[:N_LB], eye[:N_LB], x[N_LB:], eye[N_LB:]


def supports(x_mix):
    """The set of source rows present in each mixed row."""
    return [set(torch.nonzero(row.flatten() > 0).flatten().tolist()) for row in x_mix]


LB, U = set(range(N_LB)), set(range(N_LB, N_LB + N_U))


@pytest.mark.parametrize("mode", MIXUP_MODES)
def test_mixup_modes_mix_only_what_they_say(mode):
    x_lb, y_lb, x_u, y_u = tagged_batch()
    crossed = mixed_lb = mixed_u = False
    for seed in range(20):
        torch.manual_seed(seed)
        x_mix, y_mix, lam = mix_batches(x_lb, y_lb, x_u, y_u, mode, 0.75)
        assert torch.equal(x_mix.view(N_LB + N_U, -1), y_mix)  # images and labels mixed alike
        assert 0.5 <= float(lam) <= 1.0
        rows = supports(x_mix)
        assert all(i in s for i, s in enumerate(rows))  # lambda' >= 0.5: own row dominates
        lb_rows, u_rows = rows[:N_LB], rows[N_LB:]
        crossed |= any(s & U for s in lb_rows) or any(s & LB for s in u_rows)
        mixed_lb |= any(len(s) > 1 for s in lb_rows)
        mixed_u |= any(len(s) > 1 for s in u_rows)
        if mode == "none":
            assert torch.equal(x_mix, torch.cat([x_lb, x_u])) and float(lam) == 1.0
    # every mode mixes exactly the parts it names (seen over 20 draws)
    assert crossed == (mode == "all")
    assert mixed_lb == (mode in ("all", "labeled", "separate"))
    assert mixed_u == (mode in ("all", "unlabeled", "separate"))


def test_mixup_labeled_only_leaves_unlabeled_untouched_and_vice_versa():
    x_lb, y_lb, x_u, y_u = tagged_batch()
    torch.manual_seed(0)
    x_mix, y_mix, _ = mix_batches(x_lb, y_lb, x_u, y_u, "labeled", 0.75)
    assert torch.equal(x_mix[N_LB:], x_u) and torch.equal(y_mix[N_LB:], y_u)
    x_mix, y_mix, _ = mix_batches(x_lb, y_lb, x_u, y_u, "unlabeled", 0.75)
    assert torch.equal(x_mix[:N_LB], x_lb) and torch.equal(y_mix[:N_LB], y_lb)


def test_mixup_mode_all_is_the_default_mixup():
    x_lb, y_lb, x_u, y_u = tagged_batch()
    torch.manual_seed(3)
    ours = mix_batches(x_lb, y_lb, x_u, y_u, "all", 0.75)
    torch.manual_seed(3)
    ref = ops.mixup(torch.cat([x_lb, x_u]), torch.cat([y_lb, y_u]), 0.75)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))


def reference_guess(model, views, temperature):
    """Sharpen(1/K sum_k softmax(model(u_k)), T) from one pass over the K views."""
    with torch.no_grad():
        logits = model(torch.cat(views)).logits.float()
    probs = torch.stack([p.softmax(-1) for p in logits.split(len(views[0]))])
    return ops.sharpen(probs.mean(0), temperature)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_k_views_guess_averages_exactly_k_views(k):
    stub = StubRefiner()
    algo, model, ema, _, labels = make_setup("mixmatch", stub, num_views=k)
    assert algo.unlabeled_views == ("weak",) * k
    batch = make_batch(algo, labels)
    assert len(batch.x_ulb) == k
    expected = reference_guess(model, batch.x_ulb, 0.5)
    algo.step(batch, StepState(5, 10, model, ema.model))
    torch.testing.assert_close(stub.seen["probs"], expected)
    if k == 1:  # the guess is the single view's sharpened prediction
        with torch.no_grad():
            one = model(batch.x_ulb[0]).logits.float().softmax(-1)
        torch.testing.assert_close(stub.seen["probs"], ops.sharpen(one, 0.5))


def test_temperature_one_means_no_sharpening():
    stub = StubRefiner()
    algo, model, ema, _, labels = make_setup("mixmatch", stub, temperature=1.0)
    batch = make_batch(algo, labels)
    with torch.no_grad():
        logits = model(torch.cat(batch.x_ulb)).logits.float()
    avg = torch.stack([p.softmax(-1) for p in logits.split(len(batch.x_ulb[0]))]).mean(0)
    algo.step(batch, StepState(5, 10, model, ema.model))
    torch.testing.assert_close(stub.seen["probs"], avg)


def test_parameter_ema_guess_uses_ema_weights_in_training_mode():
    stub = StubRefiner()
    algo, model, ema, _, labels = make_setup("mixmatch", stub, guess_with_ema=True)
    with torch.no_grad():  # make the EMA weights differ from the online ones
        for p in ema.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = make_batch(algo, labels)
    ema.model.train()
    expected = reference_guess(ema.model, batch.x_ulb, 0.5)
    online = reference_guess(model, batch.x_ulb, 0.5)
    ema.model.eval()
    algo.step(batch, StepState(5, 10, model, ema.model))
    torch.testing.assert_close(stub.seen["probs"], expected)
    assert not torch.allclose(stub.seen["probs"], online)
    assert not ema.model.training  # its mode is restored


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_daso_composes_with_every_k(k):
    daso = pytest.importorskip("imbssl.pseudo.daso")
    refiner = daso.DASO(NUM_CLASSES, 64, queue_size=4, warmup_iters=0)
    algo, model, ema, opt, labels = make_setup("mixmatch", refiner, num_views=k)
    for loss, logs, batch in train_steps(algo, model, ema, opt, labels):
        assert math.isfinite(float(loss)) and "pseudo/semantic" in logs
        assert len(logs["pseudo/final"]) == len(batch.x_ulb[0])


@pytest.mark.parametrize("mode", MIXUP_MODES)
def test_every_mode_trains(mode):
    algo, model, ema, opt, labels = make_setup("mixmatch", mixup_mode=mode)
    for loss, logs, _ in train_steps(algo, model, ema, opt, labels, steps=2):
        assert math.isfinite(float(loss))
        assert (float(logs["mixup/lambda"]) == 1.0) == (mode == "none")


@pytest.mark.parametrize(("key", "value"), [("num_views", 0), ("mixup_mode", "both"),
                                            ("temperature", 0.0)])
def test_bad_switch_is_a_user_error(key, value):
    with pytest.raises(UserError, match=key):
        make_setup("mixmatch", **{key: value})


# ----------------------------------------------------------------------------- experiment files

def ablation_generator():
    return experiment_generator("_generate_mixmatch_ablation")


SWITCHES = {"full": {}, "k1": {"num_views": 1}, "k3": {"num_views": 3}, "k4": {"num_views": 4},
            "t1": {"temperature": 1.0}, "param_ema": {"guess_with_ema": True},
            "no_mixup": {"mixup_mode": "none"}, "mixup_labeled": {"mixup_mode": "labeled"},
            "mixup_unlabeled": {"mixup_mode": "unlabeled"},
            "mixup_separate": {"mixup_mode": "separate"}}


def test_ablation_files_are_generated_and_set_one_switch_each():
    from imbssl.cli import compose

    gen = ablation_generator()
    assert gen.main(["--check"]) == 0, "run: python configs/experiment/_generate_mixmatch_ablation.py"
    assert set(gen.rows()) == {f"mixmatch_ablation_{r}_{n}" for r in SWITCHES for n in (250, 4000)}
    defaults = {"num_views": 2, "temperature": 0.5, "mixup_mode": "all", "guess_with_ema": False}
    for labels in (250, 4000):
        for row, switch in SWITCHES.items():
            cfg = compose([f"experiment=mixmatch_ablation_{row}_{labels}"])
            a, d = cfg.algorithm, cfg.dataset
            assert a.name == "mixmatch" and cfg.pseudo.name == "none"
            assert {k: a[k] for k in defaults} == {**defaults, **switch}, row
            assert (a.mixup_alpha, a.lambda_u, a.uratio) == (0.75, 75.0, 1)
            assert d.name == "cifar10" and d.gamma_l == d.gamma_u == 1 and d.n1 * 10 == labels
            assert d.n1 + d.m1 + d.num_valid_per_class == 5000  # every training image used
            assert cfg.trainer.iterations == 2 ** 20 and cfg.model.name == "wrn28_2"
