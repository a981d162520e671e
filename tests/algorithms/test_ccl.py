"""CCL (Zhou et al., NeurIPS 2024): the losses on hand-computed cases, the estimate schedule,
the step (heads, labels, gradients), exact state round trip and resume, the refusals, and
``imbssl train algorithm=ccl`` with and without DASO (the official values are in
tests/parity/test_ccl_parity.py)."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch.nn import functional as F

from imbssl.algorithms import StepState
from imbssl.algorithms.ccl import (
    BALANCED_HEAD,
    CENTER_HEAD,
    PROJECTION_HEAD,
    blended_logits,
    reliable_contrastive_loss,
    sharpen,
)
from imbssl.errors import UserError
from imbssl.models.base import ModelOutput

from .conftest import BATCH, NUM_CLASSES, make_batch, make_setup, train_steps
from .tiny_runs import train_steps_in_process


def test_sharpen_hand_computed():
    got = sharpen(torch.tensor([[0.5, 0.25, 0.25]]), 2.0)
    assert torch.allclose(got, torch.tensor([[0.25, 0.0625, 0.0625]]) / 0.375)


def test_reliable_loss_hand_computed():
    """A centre (a member of every class), two class-0 rows and one class-1 row: each row's
    class density leaves itself out (official ``py_sum - label``, zero diagonal)."""
    feats = F.normalize(torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), dim=1)
    labels = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    k = torch.exp(feats @ feats.t() / 0.1)
    c, a, b, d = 0, 1, 2, 3
    rows = [torch.stack([(k[a, c] + k[a, b]) / 2, (k[a, c] + k[a, d]) / 2]),
            torch.stack([(k[b, c] + k[b, a]) / 2, (k[b, c] + k[b, d]) / 2]),
            torch.stack([(k[d, c] + k[d, a] + k[d, b]) / 3, k[d, c] / 1])]
    want = -(torch.log_softmax(rows[0].log(), 0)[0] + torch.log_softmax(rows[1].log(), 0)[0]
             + torch.log_softmax(rows[2].log(), 0)[1]) / 3
    assert float(reliable_contrastive_loss(feats, labels, 1, 0.1)) == pytest.approx(float(want),
                                                                                  rel=1e-5)


def test_blended_logits_hand_computed():
    prior = torch.tensor([0.75, 0.25])
    uniform = torch.tensor([0.5, 0.5])
    f, g = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -0.5]])
    rho = 0.5
    adjust = -torch.log(prior + 1e-12) + torch.log(uniform ** 2.0 + 1e-12)  # tau 2
    want = 0.5 * (f + adjust) + 0.5 * g
    assert torch.allclose(blended_logits(f, g, prior, prior, uniform, 2.0, rho), want)


def test_estimates_move_on_schedule_and_counts_restart():
    """epoch_iters 4, update_every 2, after epoch 0: no move in epoch 0, moves after steps
    5 and 7 (index 1 and 3 of epoch 1), counts restart at epoch starts and after moves."""
    algo, *_ = make_setup("ccl", epoch_iters=4, update_every=2, estimate_after_epochs=0,
                          estimate_all_momentum=0.5, estimate_unlabeled_momentum=0.5)
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    start_all = algo.prior_all.clone()
    for step in range(4):
        algo.start_window(step)
        algo.update_estimates(probs, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), step)
    assert torch.equal(algo.prior_all, start_all)
    assert torch.equal(algo.count_all, torch.tensor([5.0, 1.0, 1.0]))  # 4 confident class 0
    algo.start_window(4)
    assert torch.equal(algo.count_all, torch.ones(3))
    algo.update_estimates(probs, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 4)
    algo.update_estimates(probs, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 5)
    assert torch.allclose(algo.prior_all, 0.5 * start_all + 0.5 * torch.tensor([3, 1, 1]) / 5)
    assert torch.allclose(algo.prior_unlabeled,
                          0.5 * torch.full((3,), 1 / 3) + 0.5 * torch.tensor([1, 3, 1]) / 5)
    assert torch.equal(algo.count_unlabeled, torch.ones(3))


def test_step_trains_every_head_and_evaluates_the_balanced_one():
    algo, model, ema, opt, labels = make_setup("ccl", threshold=0.5)
    heads = (BALANCED_HEAD, PROJECTION_HEAD, CENTER_HEAD)
    before = {h: [p.detach().clone() for p in model.heads[h].parameters()] for h in heads}
    for loss, logs, _ in train_steps(algo, model, ema, opt, labels):
        assert math.isfinite(float(loss))
        assert {"loss/balanced_unlabeled", "loss/smoothed_contrastive",
                "loss/reliable_contrastive", "mask/low_energy"} <= set(logs)
        assert logs["pseudo/final"].shape == logs["pseudo/mask"].shape == (BATCH,)
    for h in heads:
        assert any(not torch.equal(b, p) for b, p in zip(before[h], model.heads[h].parameters(),
                                                       strict=True)), h
    feats = torch.randn(4, model.feat_dim)
    predict = algo.eval_predictor(ema.model)
    out = ModelOutput(torch.zeros(4, NUM_CLASSES), feats)
    assert torch.allclose(predict(out), ema.model.heads[BALANCED_HEAD](feats))
    diag = algo.per_class_diagnostics()["ccl"]
    assert set(diag) == {"prior_all", "prior_unlabeled"}


def test_pseudo_label_is_the_blend_of_both_heads():
    algo, model, ema, opt, labels = make_setup("ccl", threshold=0.5)
    batch = make_batch(algo, labels)
    with torch.no_grad():
        out = model(torch.cat([batch.x_lb, *batch.x_ulb, *batch.x_lb_views]))
        n, u = len(batch.x_lb), len(batch.x_ulb[0])
        f_w = out.logits[n:n + u]
        g_w = model.heads[BALANCED_HEAD](out.features[n:n + u])
        z = blended_logits(f_w, g_w, algo.labeled_prior, algo.prior_all, algo.prior_unlabeled,
                           2.0, 0.5)
        _, logs = algo.step(batch, StepState(0, 100, model, ema.model))
    assert torch.equal(logs["pseudo/final"], z.argmax(-1))
    assert torch.equal(logs["pseudo/linear"], f_w.argmax(-1))
    assert torch.equal(logs["pseudo/mask"], (torch.softmax(z, -1).max(-1).values >= 0.5).float())


def test_state_round_trips_and_the_next_step_is_identical():
    kwargs = dict(epoch_iters=2, update_every=1, estimate_after_epochs=0, threshold=0.5)
    algo, model, ema, opt, labels = make_setup("ccl", **kwargs)
    train_steps(algo, model, ema, opt, labels, steps=5)
    state = algo.state_dict()
    assert {"prior_all", "prior_unlabeled", "count_all", "count_unlabeled"} <= set(state)
    fresh, *_ = make_setup("ccl", **kwargs)
    fresh.load_state_dict(state)
    batch = make_batch(algo, labels)
    results = []
    for a in (algo, fresh):
        with torch.no_grad():
            results.append(a.step(batch, StepState(6, 10, model, ema.model)))
    assert torch.equal(results[0][0], results[1][0])
    for key in ("prior_all", "prior_unlabeled", "count_all"):
        assert torch.equal(getattr(algo, key), getattr(fresh, key)), key


def test_bad_values_and_missing_views_are_refused():
    with pytest.raises(ValueError, match="estimate_all_momentum"):
        make_setup("ccl", estimate_all_momentum=1.5)
    with pytest.raises(ValueError, match="update_every"):
        make_setup("ccl", update_every=0)
    with pytest.raises(ValueError, match="lambda_cls"):
        make_setup("ccl", lambda_cls=1.5)
    with pytest.raises(ValueError, match="never move"):  # an epoch shorter than the period
        make_setup("ccl", epoch_iters=20, update_every=500)
    with pytest.raises(UserError, match="logit_adjust"):
        make_setup("ccl", logit_adjust="loss")
    algo, model, ema, opt, labels = make_setup("ccl")
    batch = make_batch(algo, labels)
    batch.x_lb_views = []
    with pytest.raises(UserError, match="labeled contrastive views"):
        algo.step(batch, StepState(0, 10, model, ema.model))


RESUME = ["dataset=digits_lt", "trainer.batch_size=8", "trainer.eval_interval=4",
          "trainer.log_interval=2", "trainer.checkpoint_interval=4", "trainer.progress=false",
          "trainer.report=false", "trainer.tensorboard=false", "device=cpu", "pseudo=none",
          "algorithm=ccl", "dataset.n1=30", "dataset.m1=60", "algorithm.epoch_iters=3",
          "algorithm.update_every=2", "algorithm.estimate_after_epochs=0",
          # every image confident and low-energy: both counts are non-trivial at the checkpoint
          "algorithm.threshold=0.01", "algorithm.energy_cutoff=10"]


def _train(run_dir, iterations: int, resume: bool = False):
    train_steps_in_process(run_dir, iterations, resume, RESUME)


def test_an_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """8 steps straight against 4 + 4 resumed (the counts are mid-window at the checkpoint,
    the estimates move after it): every tensor of the final checkpoint is equal."""
    _train(tmp_path / "straight", 8)
    _train(tmp_path / "resumed", 4)
    _train(tmp_path / "resumed", 8, resume=True)
    ckpt = [torch.load(tmp_path / r / "checkpoints" / "ckpt_00000008.pt", weights_only=True)
            for r in ("straight", "resumed")]
    before = torch.load(tmp_path / "straight" / "checkpoints" / "ckpt_00000004.pt",
                        weights_only=True)["algorithm"]["prior_all"]
    assert not torch.allclose(ckpt[0]["algorithm"]["prior_all"], before)  # the estimate moved
    for part in ("model", "ema", "algorithm"):
        for key, value in ckpt[0][part].items():
            assert torch.equal(ckpt[1][part][key], value), (part, key)
    for name in ("metrics.jsonl", "per_class.csv"):
        assert (tmp_path / "straight" / name).read_text() == \
            (tmp_path / "resumed" / name).read_text(), name


@pytest.mark.parametrize("pseudo", ["none", "daso"])
def test_digits_lt_cli_run(tmp_path, pseudo):
    """``imbssl train algorithm=ccl pseudo=none|daso``: estimates move (epochs of 2 steps),
    per-class pseudo-label rows and the estimates in per_class.csv."""
    from .test_abc import run_digits_cli

    extra = ["pseudo.warmup_iters=1"] if pseudo == "daso" else []
    run = run_digits_cli(tmp_path, "algorithm=ccl", f"pseudo={pseudo}",
                         "algorithm.epoch_iters=2", "algorithm.update_every=1",
                         "algorithm.estimate_after_epochs=0", *extra)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert all("loss/smoothed_contrastive" in r for r in train)
    assert any("loss/daso_align" in r for r in train) == (pseudo == "daso")
    with open(run / "per_class.csv") as fh:
        est = [r for r in csv.DictReader(fh) if r["kind"] == "ccl"]
    assert {r["metric"] for r in est} == {"prior_all", "prior_unlabeled"}
    prior_all = [float(r["value"]) for r in est if r["metric"] == "prior_all"]
    first, last = prior_all[:10], prior_all[-10:]  # evaluations at steps 2 and 4
    assert sum(last) == pytest.approx(1.0, abs=1e-5) and first != last  # moved after step 2


def test_experiment_rows_are_generated_and_compose():
    """Every setting with the paper's recipe, with DASO's, and with DASO's + pseudo=daso; the
    recipe's switches and the official per-setting values arrive in the composed config."""
    from imbssl.cli import compose
    from imbssl.engine.config import experiment_generator

    gen = experiment_generator("_generate_ccl")
    assert gen.main(["--check"]) == 0, "run: python configs/experiment/_generate_ccl.py"
    settings = [f"cifar10_lt_g{g}_n{n}" for g in (100, 150) for n in (500, 1500)]
    settings += [f"cifar10_lt_g100_n{n}_{m}" for n in (500, 1500) for m in ("uniform", "reversed")]
    settings += [f"cifar100_lt_g10_n{n}" for n in (50, 150)]
    want = {f"{s}_{v}" for s in settings for v in ("ccl_official", "ccl", "ccl_daso")}
    assert set(gen.rows()) == want
    for name in ("cifar10_lt_g100_n500_ccl_official", "cifar10_lt_g100_n1500_reversed_ccl",
                 "cifar100_lt_g10_n50_ccl_daso"):
        cfg = compose([f"experiment={name}"])
        a, official = cfg.algorithm, name.endswith("_official")
        assert cfg.experiment_name == name and a.name == "ccl" and a.uratio == 1
        assert cfg.trainer.iterations == 250000 and cfg.trainer.batch_size == 64
        assert (cfg.optim.schedule, cfg.model.bn_momentum, cfg.model.ema_buffers) == (
            ("cosine", 0.001, "copy") if official else ("constant", 0.1, "average"))
        assert (cfg.pseudo.name == "daso") == name.endswith("_daso")
        if "reversed" in name:
            assert (a.estimate_all_momentum, a.estimate_unlabeled_momentum,
                    a.estimate_after_epochs, a.update_every) == (0.999, 0.999, 5, 100)
        elif name.startswith("cifar10_"):
            assert (a.estimate_all_momentum, a.estimate_after_epochs) == (0.9, 20)
        else:
            assert (a.estimate_all_momentum, a.estimate_after_epochs) == (0.5, 5)
