"""TRAS (Wei et al., Machine Learning 2024): the adjustment, transfer scale and transferred target on
hand-computed cases; the teacher's pseudo-labels follow the adjusted logits; the student trains
after the warm-up and evaluation switches to it then; exact state round trip and resume;
digits-LT runs with and without DASO."""
from __future__ import annotations

import json
import math

import pytest
import torch

from imbssl.algorithms import StepState
from imbssl.algorithms.tras import (
    STUDENT_HEAD,
    prior_adjustment,
    transfer_loss,
    transfer_scale,
    transferred_logits,
)
from imbssl.errors import UserError
from imbssl.models.base import ModelOutput

from .conftest import NUM_CLASSES, make_batch, make_setup, train_steps
from .tiny_runs import train_steps_in_process


def test_adjustment_scale_and_target_hand_computed():
    prior = torch.tensor([0.5, 0.3, 0.2])
    a = prior_adjustment(prior, 1.0)
    assert torch.allclose(a, torch.log(prior + 1e-12))
    assert torch.allclose(prior_adjustment(prior, 0.0), torch.zeros(3), atol=1e-6)  # tro 0: none
    s = transfer_scale(a, 2.0, 2.0)
    # softmax(-log pi) = (1/pi) / sum(1/pi): rarer classes get the larger scale
    inv = 1 / prior
    assert torch.allclose(s, 2 * inv / inv.sum() + 2)
    teacher = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    target = transferred_logits(teacher, torch.tensor([2, 0]), a, s)
    assert torch.allclose(target[0], teacher[0] - s[2] * a)
    assert torch.allclose(target[1], teacher[1] - s[0] * a)


def test_transfer_loss_hand_computed():
    z, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    q = torch.softmax(t / 2, dim=-1)  # the target softened at 2T
    want = -(q * torch.log_softmax(z, dim=-1)).sum()
    assert float(transfer_loss(z, t, torch.ones(1), 1.0)) == pytest.approx(float(want))
    assert float(transfer_loss(z, t, torch.zeros(1), 1.0)) == 0.0  # masked out


def test_teacher_pseudo_labels_follow_the_adjusted_logits():
    algo, model, ema, opt, labels = make_setup("tras", threshold=0.5)
    batch = make_batch(algo, labels)
    with torch.no_grad():  # the same concatenated forward pass (batch-norm batch statistics)
        out = model(torch.cat([batch.x_lb, *batch.x_ulb]))
    n, u = len(batch.x_lb), len(batch.x_ulb[0])
    weak = out.logits[n:n + u]
    adjusted = torch.softmax(weak - algo.adjustment, dim=-1)
    loss, logs = algo.step(batch, StepState(0, 100, model, ema.model))
    assert torch.equal(logs["pseudo/final"], adjusted.argmax(-1))
    assert torch.equal(logs["pseudo/linear"], weak.argmax(-1))
    assert torch.equal(logs["pseudo/mask"], (adjusted.max(-1).values >= 0.5).float())
    assert "loss/transfer" not in logs and math.isfinite(float(loss.detach()))


def test_student_trains_after_the_warm_up_and_then_evaluates():
    algo, model, ema, opt, labels = make_setup("tras", epoch_iters=2, warmup_epochs=1,
                                               threshold=0.3)
    feats = torch.randn(4, model.feat_dim)
    out = ModelOutput(torch.randn(4, NUM_CLASSES), feats)
    before = model.heads[STUDENT_HEAD].weight.detach().clone()
    steps = train_steps(algo, model, ema, opt, labels, steps=4)  # epochs 0, 1: teacher only
    assert all("loss/transfer" not in logs for _, logs, _ in steps)
    assert torch.equal(before, model.heads[STUDENT_HEAD].weight)
    assert not bool(algo.student_trained)
    assert torch.equal(algo.eval_predictor(ema.model)(out), out.logits)  # the teacher
    batch = make_batch(algo, labels)
    loss, logs = algo.step(batch, StepState(4, 10, model, ema.model))  # epoch 2: the student
    assert {"loss/student_labeled", "loss/transfer", "mask/student_ratio"} <= set(logs)
    loss.backward()
    assert model.heads[STUDENT_HEAD].weight.grad is not None
    assert bool(algo.student_trained)
    head = ema.model.heads[STUDENT_HEAD]
    assert torch.allclose(algo.eval_predictor(ema.model)(out), head(feats))
    assert float(algo.student_selected.sum()) == float(logs["mask/student_ratio"]) * len(batch.x_ulb[0])
    assert torch.allclose(algo.label_predictor(ema.model)(out), out.logits - algo.adjustment)


def test_per_class_diagnostics_publish_scale_adjustment_and_selection():
    algo, *_ = make_setup("tras")
    parts = algo.per_class_diagnostics()
    assert set(parts["tras"]) == {"transfer_scale", "adjustment", "student_selected"}
    assert all(v.shape == (NUM_CLASSES,) for v in parts["tras"].values())


def test_state_round_trips_and_the_next_step_is_identical():
    kwargs = dict(epoch_iters=1, warmup_epochs=0, threshold=0.2)
    algo, model, ema, opt, labels = make_setup("tras", **kwargs)
    train_steps(algo, model, ema, opt, labels, steps=3)
    state = algo.state_dict()
    assert {"student_trained", "student_selected"} <= set(state)
    fresh, *_ = make_setup("tras", **kwargs)
    fresh.load_state_dict(state)
    assert bool(fresh.student_trained) and torch.equal(fresh.student_selected,
                                                       algo.student_selected)
    batch = make_batch(algo, labels)
    results = [a.step(batch, StepState(3, 10, model, ema.model)) for a in (algo, fresh)]
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(algo.student_selected, fresh.student_selected)


def test_daso_refines_the_teachers_adjusted_probabilities(stub_refiner):
    algo, model, ema, opt, labels = make_setup("tras", refiner=stub_refiner)
    batch = make_batch(algo, labels)
    with torch.no_grad():
        out = model(torch.cat([batch.x_lb, *batch.x_ulb]))
    n, u = len(batch.x_lb), len(batch.x_ulb[0])
    _, logs = algo.step(batch, StepState(0, 10, model, ema.model))
    adjusted = torch.softmax(out.logits[n:n + u] - algo.adjustment, dim=-1)
    assert torch.allclose(stub_refiner.seen["probs"], adjusted, atol=1e-6)
    assert torch.equal(stub_refiner.seen["observed"], logs["pseudo/final"])
    assert stub_refiner.calls.count("observe") == 1 and "loss/stub" in logs


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match="epoch_iters"):
        make_setup("tras", epoch_iters=0)
    with pytest.raises(ValueError, match="warmup_epochs"):
        make_setup("tras", warmup_epochs=-1)
    with pytest.raises(ValueError, match="transfer_temperature"):
        make_setup("tras", transfer_temperature=0.0)
    with pytest.raises(UserError, match="logit_adjust"):
        make_setup("tras", logit_adjust="loss")


@pytest.mark.parametrize("pseudo", ["none", "daso"])
def test_digits_lt_cli_run(tmp_path, pseudo):
    """``imbssl train algorithm=tras pseudo=none|daso``; the student trains from step 1."""
    from .test_abc import run_digits_cli

    extra = ["pseudo.warmup_iters=1"] if pseudo == "daso" else []
    run = run_digits_cli(tmp_path, "algorithm=tras", f"pseudo={pseudo}",
                         "algorithm.epoch_iters=1", "algorithm.warmup_epochs=0", *extra)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert all(math.isfinite(r["loss/transfer"]) for r in train)
    assert any("loss/daso_align" in r for r in train) == (pseudo == "daso")
    per_class = (run / "per_class.csv").read_text()
    assert ",refiner,tras," in per_class and "transfer_scale" in per_class


def _train(run_dir, iterations: int, resume: bool = False):
    train_steps_in_process(run_dir, iterations, resume, [
        "algorithm=tras", "algorithm.epoch_iters=2", "algorithm.warmup_epochs=1",
        "algorithm.threshold=0.3", "pseudo=none", "trainer.batch_size=8",
        "trainer.eval_interval=3", "trainer.log_interval=3", "trainer.checkpoint_interval=6",
        "trainer.progress=false", "trainer.report=false", "trainer.tensorboard=false",
        "device=cpu", "dataset.n1=30", "dataset.m1=60"])


def test_an_interrupted_and_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path):
    """The student starts at step 4; the run stops at 6 and resumes to 12."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(straight, 12)
    _train(resumed, 6)
    _train(resumed, 12, resume=True)

    def ckpt(run):
        return torch.load(run / "checkpoints" / "ckpt_00000012.pt", weights_only=True)

    a, b = ckpt(straight), ckpt(resumed)
    assert bool(a["algorithm"]["student_trained"])
    for part in ("model", "ema", "algorithm"):
        for key, value in a[part].items():
            assert torch.equal(b[part][key], value), (part, key)

    def evaluations(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if r["split"] == "test"]

    assert evaluations(straight)[-2:] == evaluations(resumed)[-2:]


def test_rows_are_generated_and_compose():
    """configs/experiment/_generate_tras.py: TRAS (+ DASO) in the DASO paper's CIFAR-10-LT
    gamma-100 settings and TRAS in its official run.sh setting; each composes."""
    from imbssl.cli import compose
    from imbssl.engine.config import experiment_generator

    gen = experiment_generator("_generate_tras")
    assert gen.main(["--check"]) == 0, "run: python configs/experiment/_generate_tras.py"
    daso_settings = [f"cifar10_lt_g100_n{n}{m}" for n in (500, 1500)
                     for m in ("", "_uniform", "_reversed")]
    want = {f"{s}_tras{d}" for s in daso_settings for d in ("", "_daso")}
    want.add("cifar10_lt_g100_n1000_tras")
    assert set(gen.rows()) == want
    for name in sorted(want):
        cfg = compose([f"experiment={name}"])
        assert cfg.experiment_name == name and cfg.model.name == "wrn28_2"
        assert cfg.trainer.iterations == 250000
        a = cfg.algorithm
        assert (a.name, a.uratio, a.transfer_a, a.transfer_b, a.epoch_iters,
                a.warmup_epochs) == ("tras", 1, 2.0, 2.0, 500, 10)
        daso = name.endswith("_daso")
        assert (cfg.pseudo.name == "daso") == daso
        d = cfg.dataset
        assert d.reverse_unlabeled == ("_reversed" in name)
        assert d.gamma_u == (1 if "_uniform" in name else d.gamma_l)
        if daso:
            assert cfg.pseudo.dist_temperature == (0.3 if ("_uniform" in name or "_reversed"
                                                           in name) else 1.5)
    own = compose(["experiment=cifar10_lt_g100_n1000_tras"]).dataset
    assert (own.n1, own.m1, own.gamma_l, own.gamma_u) == (1000, 4000, 100, 100)
