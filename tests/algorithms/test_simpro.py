"""SimPro (Du et al., ICML 2024): hand-computed E- and M-steps, the step trains on the adjusted
logits with the Bayes pseudo-labels, exact state round trip, a run resumed from a checkpoint
ends exactly like the uninterrupted one, digits-LT CLI runs with and without DASO."""
from __future__ import annotations

import json
import math

import pytest
import torch

from imbssl.algorithms import StepState
from imbssl.algorithms.simpro import (
    batch_scale_ratio,
    bayes_pseudo_labels,
    prior_adjustment,
    updated_priors,
)

from .conftest import make_batch, make_setup, train_steps
from .tiny_runs import train_steps_in_process

STATE = ("unlabeled_prior", "train_prior", "epoch_pseudo_sum", "epoch_labeled_count")


def test_bayes_pseudo_labels_follow_the_unlabeled_prior():
    logits = torch.zeros(1, 3)  # a balanced network that cannot tell: the prior decides
    prior = torch.tensor([0.5, 0.3, 0.2])
    assert torch.allclose(bayes_pseudo_labels(logits, prior, 1.0), prior.unsqueeze(0), atol=1e-6)
    squared = prior ** 2 / (prior ** 2).sum()  # tau 2: p ** 2, renormalised
    assert torch.allclose(bayes_pseudo_labels(logits, prior, 2.0), squared.unsqueeze(0), atol=1e-6)
    empty = prior_adjustment(torch.tensor([0.0]), 1.0)  # log(0 + 1e-12): finite
    assert torch.allclose(empty, torch.tensor([math.log(1e-12)]))


def test_m_step_and_scale_ratio_hand_computed():
    pi_u, pi = updated_priors(torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1]),
                              torch.tensor([1.0, 3.0]), torch.tensor([4.0, 0.0]), 0.9)
    assert torch.allclose(pi_u, torch.tensor([0.45 + 0.1 * 1 / 5, 0.45 + 0.1 * 3 / 5]))
    assert torch.allclose(pi, torch.tensor([0.81 + 0.1 * 5 / 8, 0.09 + 0.1 * 3 / 8]))
    # nothing counted: pi stays, pi_u shrinks towards 0 (official: S / (sum S + 1) = 0)
    same_u, same = updated_priors(torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1]),
                                  torch.zeros(2), torch.zeros(2), 0.9)
    assert torch.allclose(same, torch.tensor([0.9, 0.1]))
    assert torch.allclose(same_u, torch.tensor([0.45, 0.45]))
    assert batch_scale_ratio(1200, 9800, 64, 512) == (9800 // 512) / (1200 // 64)
    assert batch_scale_ratio(10, 0, 64, 512) == 1.0  # no unlabeled size known
    assert batch_scale_ratio(10, 100, 64, 512) == 1.0  # both loaders shorter than a batch


def test_step_trains_on_the_bayes_pseudo_labels():
    algo, model, ema, opt, labels = make_setup("simpro", threshold=0.3)
    algo.unlabeled_prior.copy_(torch.tensor([0.7, 0.2, 0.1]))
    batch = make_batch(algo, labels)
    assert len(batch.x_lb_views) == 1  # the labeled strong view
    with torch.no_grad():
        out = model(torch.cat([batch.x_lb, *batch.x_lb_views, *batch.x_ulb]))
    n, u = 2 * len(batch.x_lb), len(batch.x_ulb[0])
    weak = out.logits[n:n + u]
    loss, logs = algo.step(batch, StepState(1, 100, model, ema.model))
    want = bayes_pseudo_labels(weak, algo.unlabeled_prior, algo.cfg.prior_tau)
    assert torch.equal(logs["pseudo/final"], want.argmax(-1))
    assert torch.equal(logs["pseudo/mask"], want.max(-1).values.ge(0.3).float())
    assert torch.equal(logs["pseudo/linear"], weak.argmax(-1))
    mask = logs["pseudo/mask"]
    assert torch.allclose(algo.epoch_pseudo_sum, (want * mask[:, None]).sum(0), atol=1e-6)
    assert torch.equal(algo.epoch_labeled_count, torch.bincount(batch.y_lb, minlength=3).float())
    assert math.isfinite(float(loss.detach()))


def test_priors_update_at_epoch_starts_and_state_round_trips():
    kwargs = dict(epoch_iters=2, threshold=0.3)
    algo, model, ema, opt, labels = make_setup("simpro", **kwargs)
    start_u, start_pi = algo.unlabeled_prior.clone(), algo.train_prior.clone()
    train_steps(algo, model, ema, opt, labels, steps=5)  # M-steps at steps 2 and 4
    assert not torch.equal(algo.train_prior, start_pi)
    assert not torch.equal(algo.unlabeled_prior, start_u)
    assert float(algo.epoch_labeled_count.sum()) == 8  # one batch since step 4
    state = algo.state_dict()
    assert set(STATE) <= set(state)
    fresh, *_ = make_setup("simpro", **kwargs)
    fresh.load_state_dict(state)
    batch = make_batch(algo, labels)
    results = [a.step(batch, StepState(6, 10, model, ema.model)) for a in (algo, fresh)]
    assert torch.equal(results[0][0], results[1][0])
    for key in STATE:
        assert torch.equal(getattr(fresh, key), getattr(algo, key)), key


def test_per_class_diagnostics_publish_both_priors():
    algo, *_ = make_setup("simpro")
    parts = algo.per_class_diagnostics()
    assert set(parts["simpro"]) == {"unlabeled_prior", "train_prior"}
    assert torch.allclose(parts["simpro"]["train_prior"], algo.labeled_prior)


def test_bad_values_are_rejected():
    from imbssl.errors import UserError

    with pytest.raises(ValueError, match="prior_momentum"):
        make_setup("simpro", prior_momentum=1.0)
    with pytest.raises(ValueError, match="epoch_iters"):
        make_setup("simpro", epoch_iters=0)
    with pytest.raises(UserError, match="logit_adjust"):
        make_setup("simpro", logit_adjust="loss")


RESUME = ["dataset=digits_lt", "algorithm=simpro", "pseudo=none", "trainer.batch_size=8",
          "trainer.eval_interval=4", "trainer.log_interval=2", "trainer.checkpoint_interval=4",
          "trainer.progress=false", "trainer.report=false", "trainer.tensorboard=false",
          "device=cpu", "algorithm.uratio=2", "algorithm.epoch_iters=3",
          "algorithm.threshold=0.3"]


def _train(run_dir, iterations: int, resume: bool = False):
    train_steps_in_process(run_dir, iterations, resume, RESUME)


def test_a_resumed_run_ends_exactly_like_the_uninterrupted_one(tmp_path):
    """Interrupted at step 4 (inside the second prior epoch), resumed to 8: model, EMA and
    the priors with the epoch's sums equal the straight run's, bit for bit."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(straight, 8)
    _train(resumed, 4)
    _train(resumed, 8, resume=True)
    a, b = (torch.load(r / "checkpoints" / "ckpt_00000008.pt", weights_only=True)
            for r in (straight, resumed))
    assert float(a["algorithm"]["epoch_labeled_count"].sum()) == 2 * 8  # steps 6 and 7
    for part in ("model", "ema", "algorithm"):
        for key, value in a[part].items():
            assert torch.equal(b[part][key], value), (part, key)


@pytest.mark.parametrize("pseudo", ["none", "daso"])
def test_digits_lt_cli_run(tmp_path, pseudo):
    """``imbssl train algorithm=simpro pseudo=none|daso``; the priors move every 2 steps and
    are written per class."""
    from .test_abc import run_digits_cli

    extra = ["pseudo.warmup_iters=1"] if pseudo == "daso" else []
    run = run_digits_cli(tmp_path, "algorithm=simpro", f"pseudo={pseudo}", "algorithm.uratio=2",
                         "algorithm.epoch_iters=2", *extra)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert any("loss/daso_align" in r for r in train) == (pseudo == "daso")
    per_class = (run / "per_class.csv").read_text()
    assert ",refiner,simpro,all," in per_class and "unlabeled_prior" in per_class


# ----------------------------------------------------------------------------- experiment files

def test_simpro_rows_are_generated_and_compose():
    from imbssl.cli import compose
    from imbssl.engine.config import experiment_generator

    gen = experiment_generator("_generate_simpro")
    assert gen.main(["--check"]) == 0, "run: python configs/experiment/_generate_simpro.py"
    kinds = ("", "_uniform", "_reversed")
    cifar10 = [f"cifar10_lt_g{g}_n500{m}" for g in (150, 100) for m in kinds]
    cifar100 = [f"cifar100_lt_g{g}_n50{m}" for g in (20, 10) for m in kinds]
    want = {f"{s}_simpro{v}" for s in cifar10 + cifar100 for v in ("_official", "", "_daso")}
    assert set(gen.rows()) == want
    for name in sorted(want):
        cfg = compose([f"experiment={name}"])
        a, d, o, t = cfg.algorithm, cfg.dataset, cfg.optim, cfg.trainer
        assert cfg.experiment_name == name and a.name == "simpro" and a.uratio == 8
        assert cfg.model.name == "wrn28_2"
        assert (a.threshold, a.prior_tau) == ((0.95, 2.0) if d.name == "cifar10" else (0.2, 1.0))
        assert (cfg.pseudo.name == "daso") == name.endswith("_daso")
        if name.endswith("_official"):  # SimPro's recipe
            assert (o.lr, o.schedule, t.iterations, t.batch_size) == (0.17, "cosine", 43000, 64)
            m = cfg.model
            assert (m.bn_momentum, m.ema_buffers, t.precision) == (0.001, "copy", "fp32")
        else:  # the DASO protocol
            assert (o.lr, o.schedule, t.iterations) == (0.03, "constant", 250000)
        assert d.reverse_unlabeled == ("_reversed" in name)
        assert d.gamma_u == (1 if "_uniform" in name else d.gamma_l)
        assert (d.n1, d.m1) == ((500, 4000) if d.name == "cifar10" else (50, 400))
