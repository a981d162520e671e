"""CDMAD (Lee and Kim, CVPR 2024): hand-computed debiased pseudo-labels, the step's bias and
targets, the debiased evaluation, state round trip, exact resume across the start of the
debiasing, refused settings, and digits-LT runs alone and with DASO (per-class diagnostics)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from imbssl.algorithms import StepState, get_algorithm
from imbssl.algorithms.cdmad import measure_bias, measure_bias_scaling_bn_update
from imbssl.engine.checkpoint import state_differences
from imbssl.engine.trainer import Trainer

from .conftest import NUM_CLASSES, make_batch, make_setup, train_steps

QUIET = ["trainer.report=false", "trainer.tensorboard=false", "trainer.progress=false"]
RUN = ["algorithm=cdmad", "pseudo=none", "algorithm.epoch_iters=2",
       "algorithm.debias_after_epochs=1", "trainer.iterations=8", "trainer.batch_size=8",
       "trainer.eval_interval=2", "trainer.log_interval=2", "trainer.checkpoint_interval=2",
       "trainer.keep_checkpoints=10", "trainer.deterministic=true", "device=cpu", *QUIET]


def _algo(**overrides):
    algo, *_ = make_setup("cdmad", epoch_iters=2, debias_after_epochs=0, **overrides)
    return algo


def test_pseudo_targets_subtract_the_bias_once_debiasing():
    algo = _algo()
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.2, 0.1]])
    bias = torch.tensor([1.5, -1.0, 0.0])
    feats = torch.zeros(2, algo.feat_dim)
    # epoch 0 (steps 0, 1): raw logits; epoch 1: softmax(f - g)
    targets, mask, pseudo, linear = algo.pseudo_targets(logits, feats, bias, 1)
    assert torch.allclose(targets, torch.softmax(logits, -1)) and pseudo.tolist() == [0, 1]
    targets, mask, pseudo, linear = algo.pseudo_targets(logits, feats, bias, 2)
    assert torch.allclose(targets, torch.softmax(logits - bias, -1))
    assert pseudo.tolist() == [1, 1] and linear.tolist() == [0, 1]  # linear: the raw argmax
    assert mask.tolist() == [1.0, 1.0]  # tau 0: every image


def test_hard_targets_and_a_confidence_floor():
    algo = _algo(soft_targets=False, min_confidence=0.5)
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.1, 0.0, 0.0]])
    targets, mask, pseudo, _ = algo.pseudo_targets(logits, torch.zeros(2, 1), torch.zeros(3), 0)
    assert targets.tolist() == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    assert mask.tolist() == [1.0, 0.0]  # 0.91 >= 0.5; 0.36 < 0.5


def test_step_measures_the_bias_and_trains_both_strong_views_towards_the_debiased_targets():
    algo, model, ema, opt, labels = make_setup("cdmad", epoch_iters=1, debias_after_epochs=0)
    assert algo.unlabeled_views == ("weak", "strong", "strong")
    batch = make_batch(algo, labels)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    want_bias = measure_bias(model, torch.ones(1, 1, 8, 8))  # train mode, before the forward
    model.load_state_dict(snapshot)  # undo that measurement's batch-norm statistics
    loss, logs = algo.step(batch, StepState(1, 10, model, ema.model))
    assert torch.allclose(algo.bias, want_bias, atol=1e-6)
    assert algo.input_shape.tolist() == [1, 8, 8]
    # the weak view's logits as the step saw them (same weights, BN in train mode on the batch)
    model.load_state_dict(snapshot)
    measure_bias(model, torch.ones(1, 1, 8, 8))
    with torch.no_grad():
        out = model(torch.cat([batch.x_lb, *batch.x_ulb]))
    n, u = len(batch.x_lb), len(batch.x_ulb[0])
    logits_w, s1, s2 = out.logits[n:n + u], out.logits[n + u:n + 2 * u], out.logits[n + 2 * u:]
    targets = torch.softmax(logits_w - want_bias, -1)
    assert torch.equal(logs["pseudo/final"], targets.argmax(-1))
    assert torch.equal(logs["pseudo/linear"], logits_w.argmax(-1))
    loss_u = torch.cat([-(targets * F.log_softmax(s, -1)).sum(-1) for s in (s1, s2)]).mean()
    assert torch.allclose(logs["loss/unlabeled"], loss_u, atol=1e-5)
    assert float(logs["cdmad/debiasing"]) == 1.0


@pytest.mark.parametrize("scale", [1.0, 0.25, 0.0])
def test_the_measurement_moves_bn_statistics_by_the_scaled_momentum(scale):
    _, model, *_ = make_setup("cdmad")
    _, full, *_ = make_setup("cdmad")  # the same seeded network: a full update for reference
    image = torch.ones(1, 1, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    bias = measure_bias_scaling_bn_update(model, image, scale)
    assert torch.allclose(bias, measure_bias(full, image))
    after, updated = model.state_dict(), full.state_dict()
    for key, old in before.items():  # r <- r + scale * (r_full - r)
        torch.testing.assert_close(after[key], old + scale * (updated[key] - old), msg=key)
    assert any(not torch.equal(v, after[k]) for k, v in before.items()) == (scale > 0)


def test_the_default_scale_gives_the_solid_image_its_official_share():
    from imbssl.algorithms.cdmad import CDMADConfig, official_update_scale

    # k / (k + n) = 1 / (N + 1): FixMatch 1 of 5 forwards officially, 1 + 1 joint here
    assert CDMADConfig().bias_bn_update_scale == official_update_scale(4, 1) == 0.25
    k = CDMADConfig(base="remixmatch").bias_bn_update_scale
    assert abs(k / (k + 5) - 1 / 12) < 1e-12
    assert CDMADConfig(bias_bn_update_scale=1.0).bias_bn_update_scale == 1.0


def test_evaluation_subtracts_the_bias_of_the_evaluated_network_in_eval_mode():
    algo, model, ema, opt, labels = make_setup("cdmad")
    train_steps(algo, model, ema, opt, labels, steps=2)
    net = ema.model.eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        predict = algo.eval_predictor(net)
        out = net(x)
        got = predict(out)
        bias = net(torch.ones(1, 1, 8, 8)).logits[0]
    assert torch.allclose(got, out.logits - bias, atol=1e-6)
    raw = make_setup("cdmad", debias_eval=False)[0]
    assert raw.eval_predictor(net)(out) is out.logits


def test_state_round_trips():
    algo, model, ema, opt, labels = make_setup("cdmad")
    train_steps(algo, model, ema, opt, labels, steps=2)
    fresh = make_setup("cdmad")[0]
    fresh.load_state_dict(algo.state_dict())
    assert fresh.input_shape.tolist() == [1, 8, 8] and torch.equal(fresh.bias, algo.bias)
    assert fresh.solid_image("cpu").shape == (1, 1, 8, 8)


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match="strong_views"):
        make_setup("cdmad", strong_views=0)
    with pytest.raises(ValueError, match="min_confidence"):
        make_setup("cdmad", min_confidence=1.5)
    with pytest.raises(ValueError, match="epoch_iters"):
        make_setup("cdmad", epoch_iters=0)
    with pytest.raises(RuntimeError, match="solid image"):
        make_setup("cdmad")[0].solid_image("cpu")  # no training image seen yet


def test_posthoc_logit_adjustment_is_refused_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "imbssl", "train", "algorithm=cdmad",
                           "algorithm.logit_adjust=posthoc", "trainer.iterations=1",
                           f"run_dir={tmp_path / 'run'}", "device=cpu", *QUIET],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "logit_adjust=posthoc" in lines[0]


#: the ReMixMatch variant with its official lambda_u and alignment (restarted every epoch)
REMIX = ["algorithm.base=remixmatch", "algorithm.lambda_u=2.0", "algorithm.dist_align=labeled"]


@pytest.mark.parametrize("base", [[], REMIX], ids=["fixmatch", "remixmatch"])
def test_a_run_resumed_before_the_debiasing_starts_ends_exactly_alike(tmp_path, base):
    """8 steps (0-7), debiasing from step 4; resumed from the checkpoint after step 2 (with
    ReMixMatch: the alignment window of epoch 1, its ramp and rotation head carry over)."""
    from imbssl.cli import compose

    ref, run = tmp_path / "ref", tmp_path / "resumed"
    Trainer(compose([*RUN, *base, f"run_dir={ref}"])).run()
    shutil.copytree(ref, run)
    for step in (4, 6, 8):
        (run / "checkpoints" / f"ckpt_{step:08d}.pt").unlink()
    trainer = Trainer(compose([*RUN, *base, f"run_dir={run}", "resume=true"]))
    trainer.prepare()
    assert trainer.step_count == 2
    trainer.run()
    final = "checkpoints/ckpt_00000008.pt"
    a = torch.load(ref / final, weights_only=True)
    b = torch.load(run / final, weights_only=True)
    assert state_differences(a, b) == []
    for name in ("metrics.jsonl", "per_class.csv", "summary.json"):
        assert (ref / name).read_bytes() == (run / name).read_bytes(), name
    rows = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    debias = [r["cdmad/debiasing"] for r in rows if r["split"] == "train"]
    assert debias == [0.0, 0.0, 1.0, 1.0]  # steps 0-1, 2-3 (epoch 1), 4-5, 6-7 (epochs > 1)


@pytest.mark.parametrize("pseudo", ["none", "daso"])
def test_digits_lt_cli_run(tmp_path, pseudo):
    """``imbssl train algorithm=cdmad pseudo=none|daso``: the bias per class is logged."""
    from .test_abc import run_digits_cli

    extra = ["pseudo.warmup_iters=1"] if pseudo == "daso" else []
    run = run_digits_cli(tmp_path, "algorithm=cdmad", f"pseudo={pseudo}",
                         "algorithm.epoch_iters=1", "algorithm.debias_after_epochs=-1", *extra)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert all(r["cdmad/debiasing"] == 1.0 for r in train)
    assert any("loss/daso_align" in r for r in train) == (pseudo == "daso")
    pc = pd.read_csv(run / "per_class.csv")
    bias = pc[(pc.kind == "cdmad") & (pc.metric == "bias")]
    assert len(bias) == 2 * 10 and bias.value.notna().all()  # two evaluations, 10 classes
    assert NUM_CLASSES == 3  # the unit tests above use the 3-class fixture


# ----------------------------------------------------------------------------- ReMixMatch variant

def _remix_setup(**overrides):
    """(algorithm, model, ema, optimizer, labels) of ``algorithm=cdmad algorithm.base=
    remixmatch`` (the class the registry builds for it), official lambda_u and alignment."""
    from imbssl.algorithms import algorithm_class
    from imbssl.models import EMA
    from imbssl.models.base import Network
    from imbssl.models.small_cnn import SmallCNN

    from .conftest import NUM_LABELED

    values = dict(base="remixmatch", lambda_u=2.0, dist_align="labeled", epoch_iters=2,
                  debias_after_epochs=0)
    values.update(overrides)
    torch.manual_seed(0)
    cfg = get_algorithm("cdmad").Config(**values)
    cls = algorithm_class("cdmad", cfg)
    labels = torch.arange(NUM_LABELED) % NUM_CLASSES
    backbone = SmallCNN(NUM_CLASSES, in_channels=1)
    model = Network(backbone, get_algorithm("cdmad").make_heads(cfg, backbone.feat_dim,
                                                                 NUM_CLASSES)).train()
    algo = cls(cfg, NUM_CLASSES, backbone.feat_dim, labels)
    ema = EMA(model, 0.999)
    return algo, model, ema, torch.optim.SGD(model.parameters(), lr=0.03), labels


def test_the_registry_builds_the_remixmatch_learner_with_its_views_and_rotation_head():
    from imbssl.algorithms import algorithm_class
    from imbssl.algorithms.cdmad import CDMAD, ReMixMatchCDMAD
    from imbssl.algorithms.remixmatch import ReMixMatch

    cfg = get_algorithm("cdmad").Config()
    assert algorithm_class("cdmad", cfg) is CDMAD and cfg.base == "fixmatch"
    cfg = get_algorithm("cdmad").Config(base="remixmatch")
    assert algorithm_class("cdmad", cfg) is ReMixMatchCDMAD
    assert issubclass(ReMixMatchCDMAD, ReMixMatch)
    assert set(CDMAD.make_heads(cfg, 8, 3)) == {"rotation"}
    algo = _remix_setup()[0]
    assert algo.unlabeled_views == ("weak", "strong", "strong")
    assert algo.labeled_views == ("strong",)  # official TransformDoub(strong, weak)
    assert _remix_setup(labeled_mixup_view="weak")[0].labeled_views == ()


def test_the_remixmatch_guess_subtracts_the_bias_once_debiasing():
    algo = _remix_setup(dist_align="none", debias_after_epochs=1)[0]
    algo.bias.copy_(torch.tensor([1.5, -1.0, 0.0]))
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.2, 0.1]])
    feats = torch.zeros(2, algo.feat_dim)
    for step, want in ((3, logits), (4, logits - algo.bias)):  # epochs 1 and 2 of 2 steps
        state = StepState(step, 10, None, None)
        targets, linear, pseudo = algo.guess_targets(logits, feats, state)
        assert torch.allclose(targets, torch.softmax(want, -1))  # T 1: no sharpening
        assert linear.tolist() == [0, 1] and pseudo.tolist() == want.argmax(-1).tolist()


def test_the_alignment_window_restarts_with_each_epoch():
    algo = _remix_setup()[0]
    da = algo.dist_align
    for step in range(3):
        algo.restart_alignment_window(step)
        da.update(torch.softmax(torch.randn(4, NUM_CLASSES), -1))
    assert int(da.count) == 1 and torch.equal(da.history[1:], torch.zeros_like(da.history[1:]))
    kept = _remix_setup(dist_align_epoch_reset=False)[0]
    for step in range(3):
        kept.restart_alignment_window(step)
        kept.dist_align.update(torch.softmax(torch.randn(4, NUM_CLASSES), -1))
    assert int(kept.dist_align.count) == 3


def test_the_remixmatch_step_adds_the_official_terms():
    """L = Lx1 + Lx2 + w (lambda_u Lu + lambda_kl Le) + lambda_rot Lr (official ``loss``), the
    bias measured first, the strong labeled view mixed, the weak one in Lx2."""
    algo, model, ema, opt, labels = _remix_setup()
    batch = make_batch(algo, labels)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    want_bias = measure_bias(model, torch.ones(1, 1, 8, 8))
    model.load_state_dict(snapshot)
    seen = {}
    original = algo.mixup_labeled_images
    algo.mixup_labeled_images = lambda b: seen.setdefault("mixed", original(b))
    loss, logs = algo.step(batch, StepState(2, 10, model, ema.model))
    assert torch.allclose(algo.bias, want_bias, atol=1e-6)
    assert seen["mixed"] is batch.x_lb_views[0]
    ramp = 2 / 10  # rampup_ratio 1: linear over the whole run
    want = (logs["loss/labeled"] + logs["loss/labeled_weak"] + logs["loss/rotation"]
            + ramp * (2.0 * logs["loss/unlabeled"] + 0.5 * logs["loss/premixup"]))
    assert torch.allclose(loss.detach(), want, atol=1e-5)
    assert float(logs["cdmad/debiasing"]) == 1.0
    no_x2 = _remix_setup(weak_labeled_loss=False)[0]
    assert "loss/labeled_weak" not in no_x2.step(make_batch(no_x2, labels),
                                                 StepState(2, 10, model, ema.model))[1]


def test_the_remixmatch_variant_evaluates_debiased_and_round_trips():
    algo, model, ema, opt, labels = _remix_setup()
    for step in range(2):
        loss, _ = algo.step(make_batch(algo, labels), StepState(step, 10, model, ema.model))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net = model.eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        out = net(x)
        got = algo.eval_predictor(net)(out)
        bias = net(torch.ones(1, 1, 8, 8)).logits[0]
    assert torch.allclose(got, out.logits - bias, atol=1e-6)
    fresh = _remix_setup()[0]
    fresh.load_state_dict(algo.state_dict())
    assert torch.equal(fresh.bias, algo.bias)
    assert torch.equal(fresh.dist_align.history, algo.dist_align.history)


@pytest.mark.parametrize("override,words", [
    ("algorithm.base=mixmatch", "algorithm.base=mixmatch"),
    ("algorithm.min_confidence=0.5", "algorithm.min_confidence"),
    ("algorithm.labeled_mixup_view=both", "labeled_mixup_view"),
    ("algorithm.temperature=0", "algorithm.temperature"),
])
def test_bad_remixmatch_settings_are_refused_in_one_line(tmp_path, override, words):
    proc = subprocess.run([sys.executable, "-m", "imbssl", "train", "algorithm=cdmad",
                           "algorithm.base=remixmatch", override, "trainer.iterations=1",
                           f"run_dir={tmp_path / 'run'}", "device=cpu", *QUIET],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines


@pytest.mark.parametrize("pseudo", ["none", "daso"])
def test_remixmatch_digits_lt_cli_run(tmp_path, pseudo):
    """``imbssl train algorithm=cdmad algorithm.base=remixmatch pseudo=none|daso``."""
    from .test_abc import run_digits_cli

    extra = ["pseudo.warmup_iters=1"] if pseudo == "daso" else []
    run = run_digits_cli(tmp_path, "algorithm=cdmad", "algorithm.base=remixmatch",
                         f"pseudo={pseudo}", "algorithm.epoch_iters=1",
                         "algorithm.debias_after_epochs=-1", *REMIX[1:], *extra)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert all(r["cdmad/debiasing"] == 1.0 and "loss/rotation" in r for r in train)
    assert all("loss/labeled_weak" in r for r in train)
    assert any("loss/daso_align" in r for r in train) == (pseudo == "daso")
    pc = pd.read_csv(run / "per_class.csv")
    assert len(pc[(pc.kind == "cdmad") & (pc.metric == "bias")]) == 2 * 10


# ----------------------------------------------------------------------------- official recipe

def test_adamw_decays_every_parameter_by_lr_times_wd_per_step():
    """optim.name=adamw: Adam plus p <- p (1 - lr wd) (official WeightEMA.step
    ``param.mul_(1 - args.wd * args.lr)``); a zero gradient leaves only the decay."""
    from imbssl.engine.config import OptimConfig
    from imbssl.engine.setup import build_optimizer

    net = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in net.parameters()]
    opt = build_optimizer(net, OptimConfig(name="adamw", lr=0.0015, weight_decay=0.04,
                                           decay_scope="all"), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, b in zip(net.parameters(), before, strict=True):
        assert torch.allclose(p, b * (1 - 0.0015 * 0.04), atol=1e-9)


def test_the_remixmatch_official_recipe_replaces_the_daso_recipe():
    """recipe=cdmad_remixmatch_official: remixmatchcdmad.py's lr 2e-3, batch 64, 300 epochs."""
    from imbssl.cli import compose

    for base in ([], ["trainer=daso_protocol"]):
        cfg = compose(["algorithm=cdmad", "algorithm.base=remixmatch", *base,
                       "recipe=cdmad_remixmatch_official"])
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adamw", 0.002, 0.04)
        assert cfg.optim.schedule == "constant" and cfg.optim.decay_scope == "all"
        assert not cfg.model.ema_warmup and not cfg.model.ema_train_mode
        assert cfg.model.ema_buffers == "average" and cfg.model.ema_decay == 0.999
        assert (cfg.trainer.iterations, cfg.trainer.batch_size, cfg.trainer.eval_interval) == \
            (150000, 64, 500)


def test_the_official_recipe_replaces_the_daso_recipe_and_trains(tmp_path):
    from imbssl.cli import compose

    for base in ([], ["trainer=daso_protocol"]):
        cfg = compose(["algorithm=cdmad", *base, "recipe=cdmad_official"])
        assert cfg.optim.name == "adamw" and cfg.optim.lr == 0.0015
        assert cfg.optim.weight_decay == 0.04 and cfg.optim.schedule == "constant"
        assert not cfg.model.ema_warmup and not cfg.model.ema_train_mode
        assert cfg.model.ema_buffers == "average" and cfg.model.ema_decay == 0.999
        assert (cfg.trainer.iterations, cfg.trainer.batch_size, cfg.trainer.eval_interval) == \
            (250000, 32, 500)
    cfg = compose(["algorithm=cdmad", "recipe=cdmad_official", *RUN[:5], "trainer.iterations=2",
                   "trainer.batch_size=8", "trainer.eval_interval=2", "trainer.compile=false",
                   "device=cpu", *QUIET, f"run_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.run()["status"] == "finished"


def test_an_unknown_optimizer_is_refused_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "imbssl", "train", "optim.name=adam",
                           f"run_dir={tmp_path / 'run'}", "device=cpu", *QUIET],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2 and "sgd or adamw" in proc.stderr, proc.stderr[-2000:]


# ----------------------------------------------------------------------------- experiment files

def test_rows_are_generated_and_compose():
    from imbssl.cli import compose
    from imbssl.engine.config import experiment_generator

    gen = experiment_generator("_generate_cdmad")
    assert gen.main(["--check"]) == 0, "run: python configs/experiment/_generate_cdmad.py"
    settings = [f"cifar10_lt_g{g}_n{n}" for g in (100, 150) for n in (500, 1500)]
    settings += [f"cifar10_lt_g100_n{n}_{m}" for n in (500, 1500) for m in ("uniform", "reversed")]
    settings += [f"cifar100_lt_g10_n{n}" for n in (50, 150)]
    want = {f"{s}_cdmad{v}" for s in settings for v in ("_official", "", "_daso")}
    paper = ["cifar10_lt_g100_n1500", "cifar10_lt_g150_n1500", "cifar10_lt_g100_n1500_uniform"]
    remix = {f"{s}_remixmatch_cdmad{v}" for s in paper for v in ("_official", "", "_daso")}
    assert set(gen.rows()) == want | remix
    # official fixmatchcdmad.py: |L| + |U| of make_imb_data >= 30000 -> wd 0.01 (uniform rows)
    assert gen.official_counts(1500, 10, 100) == [1500, 899, 539, 323, 193, 116, 69, 41, 25, 15]
    for name in sorted(remix):
        cfg = compose([f"experiment={name}"])
        assert cfg.experiment_name == name and cfg.algorithm.name == "cdmad"
        a, uniform = cfg.algorithm, "_uniform" in name
        assert a.base == "remixmatch" and a.lambda_u == 2.0
        # official remixmatchcdmad.py: aligned iff imb_ratio == imb_ratio_u; |L| + |U| >= 30000
        # (uniform rows) -> --w_rot 0.5, --wd 0.02
        assert a.dist_align == ("none" if uniform else "labeled")
        assert a.lambda_rot == (0.5 if uniform else 1.0)
        assert (cfg.pseudo.name == "daso") == name.endswith("_daso")
        if name.endswith("_official"):
            assert (cfg.optim.name, cfg.optim.lr) == ("adamw", 0.002)
            assert cfg.optim.weight_decay == (0.02 if uniform else 0.04)
            assert (cfg.trainer.iterations, cfg.trainer.batch_size) == (150000, 64)
            assert not cfg.model.ema_warmup and cfg.trainer.eval_interval == 500
        else:
            assert cfg.optim.name == "sgd" and cfg.trainer.iterations == 250000
    for name in sorted(want):
        cfg = compose([f"experiment={name}"])
        assert cfg.algorithm.base == "fixmatch"
        assert cfg.experiment_name == name and cfg.algorithm.name == "cdmad"
        assert cfg.model.name == "wrn28_2" and cfg.trainer.iterations == 250000
        assert (cfg.pseudo.name == "daso") == name.endswith("_daso")
        d = cfg.dataset
        assert d.reverse_unlabeled == ("_reversed" in name)
        assert d.gamma_u == (1 if "_uniform" in name else d.gamma_l)
        if name.endswith("_official"):
            wd = 0.01 if "_uniform" in name else (0.08 if name.startswith("cifar100") else 0.04)
            assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adamw", 0.0015, wd)
            assert cfg.trainer.batch_size == 32 and not cfg.model.ema_warmup
        else:
            assert cfg.optim.name == "sgd" and cfg.trainer.batch_size == 64
            assert cfg.model.ema_warmup


def test_null_shared_fields_take_the_official_value_of_the_base():
    from imbssl.algorithms.cdmad import CDMADConfig

    fix, remix = CDMADConfig(), CDMADConfig(base="remixmatch")
    assert (fix.lambda_u, fix.dist_align) == (1.0, "none")  # fixmatchcdmad.py
    assert (remix.lambda_u, remix.dist_align) == (2.0, "labeled")  # remixmatchcdmad.py
    kept = CDMADConfig(base="remixmatch", lambda_u=1.5, dist_align="none")
    assert (kept.lambda_u, kept.dist_align) == (1.5, "none")


def test_the_plain_remixmatch_command_trains_with_the_official_values(tmp_path):
    from hydra.core.global_hydra import GlobalHydra

    from imbssl.cli import compose
    from imbssl.engine.trainer import Trainer

    GlobalHydra.instance().clear()
    trainer = Trainer(compose(["algorithm=cdmad", "algorithm.base=remixmatch", "pseudo=none",
                               "trainer.iterations=1", "trainer.batch_size=8", "device=cpu",
                               f"run_dir={tmp_path / 'run'}"]))
    assert (trainer.algo.cfg.lambda_u, trainer.algo.cfg.dist_align) == (2.0, "labeled")
