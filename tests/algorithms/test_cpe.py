"""CPE (Ma et al., AAAI 2024): hand-computed expert losses, branch weights and shares; the
classwise batch-norm network; the step's experts; exact state round trip; digits-LT runs
through the CLI (with DASO) and an interrupted run resumed exactly."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from imbssl.algorithms import StepState
from imbssl.algorithms.cpe import (
    HEADS,
    branch_consistency_loss,
    branch_weights,
    expert_labeled_loss,
    updated_share,
)
from imbssl.models import BranchOutput, build_model

from .conftest import make_batch, make_setup, train_steps
from .test_ctaugment_training import checkpoint
from .tiny_runs import train_steps_in_process


def test_expert_labeled_loss_adds_tau_log_prior():
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    y = torch.tensor([2, 0])
    prior = torch.tensor([0.7, 0.2, 0.1])
    want = F.cross_entropy(logits + 2.0 * prior.log(), y)
    assert torch.allclose(expert_labeled_loss(logits, y, prior, 2.0), want)
    assert torch.allclose(expert_labeled_loss(logits, y, prior, 0.0), F.cross_entropy(logits, y))


def test_branch_weights_keep_each_branch_to_its_classes():
    labels = torch.tensor([0, 2, 3, 5, 1])
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
    w = branch_weights(labels, mask, [2, 4], branches=3)
    assert w.tolist() == [[1, 1, 0, 1, 1], [0, 1, 0, 1, 0], [0, 0, 0, 1, 0]]
    assert branch_weights(labels, mask, [2, 4], branches=1).tolist() == [[1, 1, 0, 1, 1]]


def test_branch_consistency_loss_is_normalised_by_the_total_weight():
    logits = torch.randn(3, 4, 5)
    labels = torch.tensor([0, 3, 4, 1])
    w = torch.tensor([[1.0, 1, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]])
    ce = torch.stack([F.cross_entropy(logits[j], labels, reduction="none") for j in range(3)])
    assert torch.allclose(branch_consistency_loss(logits, labels, w), (ce * w).sum() / 4)
    assert branch_consistency_loss(logits, labels, torch.zeros_like(w)) == 0


def test_updated_share_hand_computed():
    share = torch.full((4,), 0.25)
    labels = torch.tensor([0, 0, 1, 3])
    new = updated_share(share, labels, torch.tensor([1.0, 1.0, 0.0, 1.0]), 0.9)
    # counts (2, 0, 0, 1) / 3
    assert torch.allclose(new, 0.9 * share + 0.1 * torch.tensor([2 / 3, 0, 0, 1 / 3]))
    assert torch.equal(updated_share(share, labels, torch.zeros(4), 0.9), share)  # none kept
    assert torch.allclose(updated_share(share, labels, None, 0.5),
                          0.5 * share + 0.5 * torch.tensor([0.5, 0.25, 0.0, 0.25]))


def test_classwise_bn_network_averages_its_branches():
    torch.manual_seed(0)
    net = build_model("small_cnn", 4, 1, classwise_bn=3, bn_momentum=0.3).train()
    out = net(torch.randn(6, 1, 8, 8))
    assert isinstance(out, BranchOutput)
    assert out.branch_features.shape == (3, 6, net.feat_dim) and out.branch_logits.shape == (3, 6, 4)
    assert torch.allclose(out.logits, out.branch_logits.mean(0), atol=1e-6)
    assert torch.allclose(out.logits, net.backbone.fc(out.features), atol=1e-6)
    # the branches keep PyTorch's default momentum (official wrn_cbn.py); the backbone takes 0.3
    assert [n.momentum for n in net.classwise_norms.norms] == [0.1, 0.1, 0.1]
    assert {m.momentum for m in net.backbone.modules()
            if isinstance(m, torch.nn.BatchNorm2d)} == {0.3}
    assert not isinstance(build_model("small_cnn", 4, 1)(torch.randn(2, 1, 8, 8)), BranchOutput)


def test_step_pseudo_labels_are_the_uniform_experts():
    algo, model, ema, opt, labels = make_setup("cpe", cuts=[1, 2])
    batch = make_batch(algo, labels)
    with torch.no_grad():
        out = model(torch.cat([batch.x_lb, *batch.x_ulb]))
    n, u = len(batch.x_lb), len(batch.x_ulb[0])
    probs = torch.softmax(model.heads[HEADS["uniform"]](out.features[n:n + u]), dim=-1)
    loss, logs = algo.step(batch, StepState(0, 10, model, ema.model))
    assert torch.equal(logs["pseudo/final"], probs.argmax(-1))
    assert torch.equal(logs["pseudo/mask"], probs.max(-1).values.ge(0.95).float())
    for name in ("long_tailed", "uniform", "inverse"):
        assert math.isfinite(float(logs[f"loss/{name}_labeled"]))
    assert math.isfinite(float(loss.detach()))
    evaluated = algo.eval_predictor(model)(out)
    assert torch.allclose(evaluated, model.heads[HEADS["uniform"]](out.features))


def test_shares_update_after_the_first_epoch_and_round_trip():
    kwargs = dict(cuts=[1, 2], threshold=0.0, epoch_iters=2)
    algo, model, ema, opt, labels = make_setup("cpe", **kwargs)
    train_steps(algo, model, ema, opt, labels, steps=2)  # epoch 0: no update
    assert torch.equal(algo.all_share, torch.full((3, 3), 1 / 3))
    train_steps(algo, model, ema, opt, labels, steps=1)
    algo_after = algo.state_dict()
    fresh, *_ = make_setup("cpe", **kwargs)
    fresh.load_state_dict(algo_after)
    batch = make_batch(algo, labels)
    results = [a.step(batch, StepState(4, 10, model, ema.model)) for a in (algo, fresh)]
    assert torch.equal(results[0][0], results[1][0])
    for key in ("confident_share", "all_share"):
        assert torch.equal(getattr(fresh, key), getattr(algo, key)), key
    assert not torch.equal(algo.all_share, torch.full((3, 3), 1 / 3))
    diag = algo.per_class_diagnostics()["cpe"]
    assert set(diag) == {f"{e}_{k}_share" for e in ("long_tailed", "uniform", "inverse")
                         for k in ("confident", "all")}


def test_bad_values_are_rejected():
    from imbssl.errors import UserError

    with pytest.raises(ValueError, match="cuts"):
        make_setup("cpe", cuts=[2])
    with pytest.raises(ValueError, match="expert_taus"):
        make_setup("cpe", expert_taus=[0.0, -1.0, 2.0])
    with pytest.raises(UserError, match="logit_adjust"):
        make_setup("cpe", logit_adjust="loss", cuts=[1, 2])
    algo, *_ = make_setup("cpe", cuts=[1, 2])
    with pytest.raises(UserError, match="classwise_bn"):
        algo.configure_network(build_model("small_cnn", 3, 1, classwise_bn=2))
    algo.configure_network(build_model("small_cnn", 3, 1, classwise_bn=3))


@pytest.mark.parametrize("pseudo", ["none", "daso"])
def test_digits_lt_cli_run(tmp_path, pseudo):
    """``imbssl train algorithm=cpe model.classwise_bn=3 pseudo=none|daso``."""
    from .test_abc import run_digits_cli

    extra = ["pseudo.warmup_iters=1"] if pseudo == "daso" else []
    run = run_digits_cli(tmp_path, "algorithm=cpe", f"pseudo={pseudo}", "model.classwise_bn=3",
                         "algorithm.epoch_iters=1", *extra)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert all("loss/inverse_unlabeled" in r for r in train)
    assert any("loss/daso_align" in r for r in train) == (pseudo == "daso")
    per_class = (run / "per_class.csv").read_text()
    assert "uniform_confident_share" in per_class


@pytest.mark.parametrize(("override", "word"), [("model.classwise_bn=2", "classwise_bn"),
                                                 ("pseudo=darp", "pseudo=daso")])
def test_refusals_are_one_line_exit_2(tmp_path, override, word):
    proc = subprocess.run([sys.executable, "-m", "imbssl", "train", "algorithm=cpe",
                           "pseudo=none", override, "trainer.iterations=1",
                           "device=cpu", f"run_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert word in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _train(run_dir, iterations: int, resume: bool = False, *extra: str) -> None:
    train_steps_in_process(run_dir, iterations, resume, [
        "algorithm=cpe", "pseudo=none", "model.classwise_bn=3", "algorithm.epoch_iters=2",
        "algorithm.threshold=0.3", "trainer.batch_size=8", "trainer.eval_interval=6",
        "trainer.log_interval=3", "trainer.checkpoint_interval=6", "trainer.progress=false",
        "trainer.report=false", "trainer.tensorboard=false", "device=cpu", "dataset.n1=30",
        "dataset.m1=60", *extra])


def test_an_interrupted_run_resumes_exactly(tmp_path):
    _train(tmp_path / "straight", 12)
    _train(tmp_path / "resumed", 6)
    _train(tmp_path / "resumed", 12, resume=True)
    a, b = checkpoint(tmp_path / "straight", 12), checkpoint(tmp_path / "resumed", 12)
    assert any("classwise_norms" in key for key in a["model"])
    for part in ("model", "ema", "algorithm"):
        for key, value in a[part].items():
            assert torch.equal(b[part][key], value), (part, key)


@pytest.mark.slow
def test_classwise_bn_trains_the_same_under_torch_compile(tmp_path):
    """CPE's rows turn on ``trainer.compile`` (the DASO protocol): 4 steps of the compiled
    network (inductor) end where the eager ones do, to float rounding, branches included."""
    fp32 = ("trainer.precision=fp32", "trainer.eval_interval=4", "trainer.checkpoint_interval=4")
    _train(tmp_path / "eager", 4, False, *fp32, "trainer.compile=false")
    _train(tmp_path / "compiled", 4, False, *fp32, "trainer.compile=true")
    a, b = checkpoint(tmp_path / "eager", 4), checkpoint(tmp_path / "compiled", 4)
    assert any("classwise_norms.norms.2.running_var" in key for key in b["model"])
    for part in ("model", "ema", "algorithm"):
        assert set(a[part]) == set(b[part]), part
        for key, value in a[part].items():
            torch.testing.assert_close(b[part][key], value, atol=1e-3, rtol=1e-3, msg=key)


def test_experiment_rows_are_current_and_compose():
    from imbssl.cli import compose
    from imbssl.engine.config import experiment_generator

    gen = experiment_generator("_generate_cpe")
    assert gen.main(["--check"]) == 0, "run: python configs/experiment/_generate_cpe.py"
    names = set(gen.rows())
    assert len(names) == 9 * 3 + 2 and "cifar100_lt_g10_n150_cpe_official" in names
    own_uniform = compose(["experiment=cifar10_lt_g100_n500_uniform_m400_cpe_official"])
    # CPE's uniform: official ulb_num_labels 4000, ulb_imb_ratio 1 -> 400 images a class
    assert (own_uniform.dataset.m1, own_uniform.dataset.gamma_u) == (400, 1)
    official = compose(["experiment=cifar100_lt_g10_n150_cpe_official"])
    assert official.algorithm.cuts == [35, 70] and official.model.classwise_bn == 3
    assert (official.trainer.iterations, official.trainer.eval_interval) == (262144, 1024)
    assert (official.optim.schedule, official.model.bn_momentum) == ("cosine", 0.001)
    daso = compose(["experiment=cifar10_lt_g150_n500_cpe_daso"])
    assert daso.pseudo.name == "daso" and daso.trainer.iterations == 250000
    assert daso.algorithm.cuts == [2, 4] and daso.model.wrn_residual == "official"
