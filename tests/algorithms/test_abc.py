"""ABC (Lee et al., NeurIPS 2021): Bernoulli masks, the gradual schedule, the ABC head at
evaluation, and ABC + DASO (official daso_model.py: both heads' targets blended, one m_hat)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imbssl.algorithms import StepState
from imbssl.algorithms.abc import (
    ABC_HEAD,
    balance_parameter,
    bernoulli_mask,
    gradual_parameter,
)
from imbssl.engine.config import experiment_generator
from imbssl.models.base import ModelOutput
from imbssl.pseudo import IdentityRefiner

from .conftest import NUM_CLASSES, StubRefiner, make_batch, make_setup, train_steps


def test_balance_parameter_is_tail_count_over_class_count():
    bal = balance_parameter(torch.tensor([30, 10, 3]))
    assert torch.allclose(bal, torch.tensor([0.1, 0.3, 1.0]))
    with pytest.raises(ValueError, match="every class"):
        balance_parameter(torch.tensor([5, 0, 1]))


def test_mask_rate_per_class_equals_its_bernoulli_parameter():
    """Seeded: the kept fraction of each class is within 4 binomial standard deviations of
    its parameter N_min / N_k (labeled counts 30, 10, 3 -> 0.1, 0.3, 1)."""
    algo, *_ = make_setup("abc")  # labeled labels: 20 images, counts 7, 7, 6
    assert torch.allclose(algo.bal_param, torch.tensor([6 / 7, 6 / 7, 1.0]))
    bal = balance_parameter(torch.tensor([30, 10, 3]))
    n = 20000
    labels = torch.arange(3).repeat_interleave(n)
    torch.manual_seed(0)
    mask = bernoulli_mask(bal, labels)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    for k, p in enumerate(bal.tolist()):
        rate = float(mask[labels == k].mean())
        std = math.sqrt(p * (1 - p) / n)
        assert abs(rate - p) <= 4 * std + 1e-12, (k, rate, p)
    assert float(mask[labels == 2].min()) == 1.0  # the tail class is always kept


def test_gradual_schedule_hand_computed():
    bal = torch.tensor([0.1, 0.5, 1.0])
    # 2000 steps of 500: 4 epochs; e completed epochs -> 1 - (e / 4) (1 - bal)
    expected = {0: [1.0, 1.0, 1.0], 499: [1.0, 1.0, 1.0],
                500: [0.775, 0.875, 1.0],    # e = 1: 1 - 0.25 * (0.9, 0.5, 0)
                1999: [0.325, 0.625, 1.0],   # e = 3: 1 - 0.75 * (0.9, 0.5, 0)
                2000: [0.1, 0.5, 1.0]}       # the end: the labeled parameter itself
    for step, want in expected.items():
        got = gradual_parameter(bal, step, 2000, 500)
        assert torch.allclose(got, torch.tensor(want)), step
    # the official schedule: 250k iterations, epoch 499 of 500 -> 1 - 499/500 (1 - bal)
    got = gradual_parameter(bal, 249_999, 250_000, 500)
    assert torch.allclose(got, 1 - 499 / 500 * (1 - bal))


def test_unlabeled_mask_follows_the_gradual_parameter_of_the_abc_pseudo_label():
    """At the last step of a 2-epoch run (keep = bal) with threshold 0 the unlabeled mask
    rate of each ABC pseudo-label class is its Bernoulli parameter (seeded, 4 std)."""
    algo, model, ema, opt, labels = make_setup("abc", threshold=1e-6, epoch_iters=1)
    algo.bal_param = torch.tensor([0.2, 0.6, 1.0])
    finals, masks = [], []
    torch.manual_seed(1)
    for _ in range(60):
        batch = make_batch(algo, labels)
        with torch.no_grad():
            _, logs = algo.step(batch, StepState(1, 1, model, ema.model))
        finals.append(logs["pseudo/final"])
        masks.append(logs["pseudo/mask"])
    final, mask = torch.cat(finals), torch.cat(masks)
    checked = 0
    for k, p in enumerate([0.2, 0.6, 1.0]):
        sel = mask[final == k]
        if len(sel) < 50:
            continue
        checked += 1
        assert abs(float(sel.mean()) - p) <= 4 * math.sqrt(p * (1 - p) / len(sel)) + 1e-12
    assert checked >= 2, torch.bincount(final, minlength=3)


def test_two_steps_log_both_heads_and_evaluate_with_the_abc_head():
    algo, model, ema, opt, labels = make_setup("abc")
    assert model.heads[ABC_HEAD].out_features == NUM_CLASSES
    before = model.heads[ABC_HEAD].weight.detach().clone()
    results = train_steps(algo, model, ema, opt, labels)
    loss, logs, batch = results[-1]
    assert math.isfinite(float(loss))
    assert {"loss/abc_labeled", "loss/abc_unlabeled", "mask/abc_ratio", "pseudo/linear",
            "pseudo/final", "pseudo/mask"} <= set(logs)
    assert logs["pseudo/final"].shape == (len(batch.x_ulb[0]),)
    assert not torch.equal(before, model.heads[ABC_HEAD].weight)  # the ABC head trains
    feats = torch.randn(5, model.feat_dim)
    out = ModelOutput(torch.zeros(5, NUM_CLASSES), feats)
    predict = algo.eval_predictor(ema.model)
    assert torch.allclose(predict(out), ema.model.heads[ABC_HEAD](feats))


class _ForceClass(IdentityRefiner):
    """Records each refine call and returns a confident one-hot on class 2."""

    def __init__(self):
        super().__init__()
        self.refined = 0

    def refine(self, probs, features_weak, step):
        self.refined += 1
        out = torch.zeros_like(probs)
        out[:, 2] = 1.0
        return out


@pytest.mark.parametrize("daso_pseudo_label", [True, False])
def test_abc_with_daso_blends_the_abc_head_target_too(daso_pseudo_label):
    refiner = _ForceClass()
    algo, model, ema, opt, labels = make_setup("abc", refiner,
                                               daso_pseudo_label=daso_pseudo_label)
    _, logs, _ = train_steps(algo, model, ema, opt, labels, steps=1)[0]
    assert refiner.refined == (2 if daso_pseudo_label else 1)
    if daso_pseudo_label:  # the ABC head's target is the refined one (mask: conf 1 x Bernoulli)
        assert bool((logs["pseudo/final"] == 2).all())


def test_abc_with_real_daso_observes_the_main_classifier_once():
    stub = StubRefiner()
    algo, model, ema, opt, labels = make_setup("abc", stub)
    train_steps(algo, model, ema, opt, labels, steps=1)
    assert stub.calls == ["update_labeled", "refine", "refine", "observe", "extra_loss",
                          "pseudo_logs"]
    assert stub.seen["strong_requires_grad"]
    daso = pytest.importorskip("imbssl.pseudo.daso")
    refiner = daso.DASO(NUM_CLASSES, model.feat_dim, queue_size=4, warmup_iters=0)
    algo, model, ema, opt, labels = make_setup("abc", refiner)
    for loss, logs, _ in train_steps(algo, model, ema, opt, labels):
        assert math.isfinite(float(loss)) and "loss/daso_align" in logs
    assert int(refiner.num_observed) == 2  # observe once a step (the main classifier's)


CLI_TINY = ["dataset=digits_lt", "trainer.iterations=4", "trainer.batch_size=8",
            "trainer.eval_interval=2", "trainer.log_interval=2", "trainer.checkpoint_interval=2",
            "trainer.progress=false", "trainer.tensorboard=false", "trainer.report=false",
            "device=cpu"]


def run_digits_cli(tmp_path, *overrides: str) -> Path:
    """``imbssl train dataset=digits_lt ...`` in a subprocess; checks the run folder is
    complete and every logged loss finite; returns the run folder."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "imbssl", "train", *CLI_TINY, *overrides,
                           f"run_dir={run}"], capture_output=True, text=True, timeout=600,
                          env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.yaml", "meta.json", "metrics.jsonl", "per_class.csv", "summary.json",
                 "confusion_test.npy", "checkpoints/ckpt_00000004.pt"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 4
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    for r in train:
        losses = {k: v for k, v in r.items() if k.startswith("loss/")}
        assert "loss/total" in losses and all(math.isfinite(v) for v in losses.values()), r
    per_class = (run / "per_class.csv").read_text()
    assert ",pseudo,final,all," in per_class and ",pseudo,linear,all," in per_class
    return run


@pytest.mark.parametrize("pseudo", ["none", "daso"])
def test_digits_lt_cli_run(tmp_path, pseudo):
    """``imbssl train algorithm=abc pseudo=none|daso`` (FixMatch + ABC, + DASO)."""
    extra = ["pseudo.warmup_iters=1"] if pseudo == "daso" else []
    run = run_digits_cli(tmp_path, "algorithm=abc", f"pseudo={pseudo}", *extra)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert all("loss/abc_labeled" in r for r in train)
    assert any("loss/daso_align" in r for r in train) == (pseudo == "daso")


# ----------------------------------------------------------------------------- experiment files

def comparators_generator():
    return experiment_generator("_generate_comparators_b")


def test_abc_and_acr_rows_are_generated_and_compose():
    from imbssl.cli import compose

    gen = comparators_generator()
    assert gen.main(["--check"]) == 0, "run: python configs/experiment/_generate_comparators_b.py"
    table1 = [f"cifar10_lt_g{g}_n{n}" for g in (100, 150) for n in (500, 1500)]
    table1 += [f"cifar100_lt_g10_n{n}" for n in (50, 150)]
    mismatched = [f"cifar10_lt_g100_n{n}_{m}" for n in (500, 1500) for m in ("uniform", "reversed")]
    # ABC also on CIFAR-100-LT gamma 20 (Table 1) and STL-10-LT (Table 12); ACR as before
    abc = table1 + [f"cifar100_lt_g20_n{n}" for n in (50, 150)]
    abc += [f"stl10_lt_g{g}_n{n}" for g in (10, 20) for n in (150, 450)]
    want = {f"{s}_fixmatch_abc{d}" for s in abc for d in ("", "_daso")}
    want |= {f"{s}_acr" for s in table1 + mismatched}
    assert set(gen.rows()) == want
    for name in sorted(want):
        cfg = compose([f"experiment={name}"])
        assert cfg.experiment_name == name
        assert cfg.model.name == "wrn28_2" and cfg.trainer.iterations == 250000
        daso = name.endswith("_daso")
        assert (cfg.pseudo.name == "daso") == daso
        if "_abc" in name:
            a = cfg.algorithm
            assert (a.name, a.uratio, a.dist_align, a.epoch_iters) == ("abc", 2, "none", 500)
        else:
            assert (cfg.algorithm.name, cfg.algorithm.uratio) == ("acr", 1)
        if daso:
            t_dist = 1.5 if name.startswith("cifar10_") else 0.3
            assert cfg.pseudo.dist_temperature == t_dist and cfg.pseudo.warmup_iters == 5000
        d = cfg.dataset
        if name.startswith("stl10_"):
            assert d.name == "stl10" and d.gamma_l == int(name.split("_g")[1].split("_")[0])
            continue
        assert d.reverse_unlabeled == ("_reversed" in name)
        assert d.gamma_u == (1 if "_uniform" in name else d.gamma_l)
