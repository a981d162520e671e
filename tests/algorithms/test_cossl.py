"""CoSSL: the TFE draws and mixing, the phase switch (warm-up, the balanced classifier in both
networks, evaluation through it), the co-learning step's pseudo-labels from the teacher head on
the EMA features, exact resume before, at and after the switch, DASO composition, refusals;
on each base (``algorithm.base``: FixMatch, MixMatch, ReMixMatch)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from imbssl.algorithms import StepState, algorithm_class
from imbssl.algorithms.cossl import (
    BASES,
    COSSL_HEAD,
    CoSSL,
    CoSSLConfig,
    MixMatchCoSSL,
    ReMixMatchCoSSL,
    tfe_draws,
    tfe_mix,
)
from imbssl.algorithms.ops import sharpen
from imbssl.engine.checkpoint import state_differences
from imbssl.engine.trainer import Trainer
from imbssl.errors import UserError

from .conftest import make_batch, make_setup

QUIET = ["trainer.report=false", "trainer.tensorboard=false"]
TINY = ["trainer.batch_size=8", "trainer.log_interval=2", "trainer.progress=false", "device=cpu"]
#: 12 steps, co-learning after step 6, a checkpoint every 3 steps (3: before, 6: at the switch)
RUN = ["algorithm=cossl", "algorithm.pretrain_fraction=0.5", "algorithm.warm_iterations=20",
       "algorithm.warm_batch_size=16", "trainer.iterations=12", "trainer.eval_interval=3",
       "trainer.checkpoint_interval=3", "trainer.keep_checkpoints=10",
       "trainer.deterministic=true", *QUIET]


def test_tfe_draws_mix_tail_rows_only():
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1] * 500)
    u, lam = tfe_draws(len(labels), 0.6, gen)
    mixed = u < torch.tensor([0.0, 0.9])[labels]
    assert not mixed[labels == 0].any()  # the largest class never mixes
    assert 0.85 < mixed[labels == 1].float().mean() < 0.95
    assert bool(((lam >= 0.6) & (lam <= 1.0)).all())
    x, u = torch.ones(2, 3), torch.zeros(4, 3)
    out = tfe_mix(x, torch.tensor([0, 1]), u, torch.tensor([False, True]), torch.tensor([0.5, 0.7]))
    assert torch.equal(out, torch.tensor([[1.0] * 3, [0.7] * 3]))


def test_co_learning_pseudo_labels_come_from_the_teacher_head_on_ema_features():
    algo, model, ema, opt, labels = make_setup("cossl", threshold=0.0)
    algo.co_learning = True
    algo.classifier_loss = lambda head, ema_model: (torch.zeros(()), torch.zeros(()))
    batch = make_batch(algo, labels)
    with torch.no_grad():
        want = ema.model.heads[COSSL_HEAD](ema.model(batch.x_ulb[0]).features).argmax(1)
    loss, logs = algo.step(batch, StepState(1, 10, model, ema.model))
    assert torch.equal(logs["pseudo/final"], want) and torch.equal(logs["pseudo/linear"], want)
    assert float(logs["cossl/co_learning"]) == 1.0
    model.zero_grad()
    loss.backward()
    assert model.heads[COSSL_HEAD].weight.grad is None  # the FixMatch loss leaves the head


def test_each_base_has_its_learner_and_its_own_defaults():
    learners = {"fixmatch": CoSSL, "mixmatch": MixMatchCoSSL, "remixmatch": ReMixMatchCoSSL}
    for base, cls in learners.items():
        assert algorithm_class("cossl", CoSSLConfig(base=base)) is cls
    fix, mix, remix = (CoSSLConfig(base=b) for b in BASES)
    assert (fix.uratio, fix.lambda_u, fix.colearn_lambda_u, fix.dist_align) == (2, 1.0, 1.0, "none")
    assert (mix.uratio, mix.lambda_u, mix.colearn_lambda_u, mix.dist_align) == (1, 75.0, 1.0, "none")
    assert (remix.uratio, remix.lambda_u, remix.colearn_lambda_u, remix.dist_align) == (
        1, 1.5, 1.5, "labeled")
    assert CoSSLConfig(base="remixmatch", lambda_u=2.0).colearn_lambda_u == 2.0  # set wins
    heads = CoSSL.make_heads(remix, 16, 3)  # the registered class gives the base's heads
    assert set(heads) == {"rotation", COSSL_HEAD}


@pytest.mark.parametrize("base", ["mixmatch", "remixmatch"])
def test_co_learning_guess_comes_from_the_teacher_head_on_ema_features(base):
    algo, model, ema, opt, labels = make_setup("cossl", base=base)
    algo = algorithm_class("cossl", algo.cfg)(algo.cfg, 3, model.feat_dim, labels)
    algo.co_learning = True
    algo.classifier_loss = lambda head, ema_model: (torch.zeros(()), torch.zeros(()))
    batch = make_batch(algo, labels)
    with torch.no_grad():
        head = model.heads[COSSL_HEAD]
        probs = [torch.softmax(head(ema.model(x).features), 1) for x in batch.x_ulb]
        if base == "mixmatch":  # mean over the K weak views
            guess = sharpen(torch.stack(probs).mean(0), 0.5)
        else:  # the weak view, aligned (first batch: p~ = its own mean) and sharpened
            p = probs[0] * algo.labeled_prior / probs[0].mean(0)
            guess = sharpen(p / p.sum(1, keepdim=True), 0.5)
    loss, logs = algo.step(batch, StepState(1, 10, model, ema.model))
    assert torch.equal(logs["pseudo/final"], guess.argmax(1))
    assert float(logs["cossl/co_learning"]) == 1.0 and "mixup/lambda" in logs
    model.zero_grad()
    loss.backward()
    assert model.heads[COSSL_HEAD].weight.grad is None  # the base's losses leave the head
    if base == "remixmatch":
        assert model.heads["rotation"].weight.grad is not None


def test_remixmatch_alignment_restarts_at_the_switch_and_ramps_stop(tiny_cfg):
    trainer = Trainer(tiny_cfg("algorithm=cossl", "algorithm.base=remixmatch", "pseudo=none",
                               "algorithm.pretrain_fraction=0.5", "algorithm.warm_iterations=3",
                               *QUIET))
    trainer.run()
    algo = trainer.algo
    assert algo.co_learning and int(algo.dist_align.count) == 2  # steps 3 and 4 only
    assert algo.consistency_ramp(StepState(0, 4, trainer.model, trainer.ema.model)) == 1.0


@pytest.fixture(scope="module", params=BASES)
def cossl_run(request, tmp_path_factory):
    from imbssl.cli import compose

    base = request.param
    root = tmp_path_factory.mktemp(f"cossl_{base}")
    trainer = Trainer(compose([*TINY, *RUN, f"algorithm.base={base}", f"run_dir={root / 'ref'}"]))
    trainer.run()
    return root, trainer, base


def test_the_switch_warms_the_balanced_classifier_and_evaluation_reads_it(cossl_run):
    root, trainer, _ = cossl_run
    rows = [json.loads(line) for line in (root / "ref" / "metrics.jsonl").read_text().splitlines()]
    phase = [r for r in rows if r["split"] == "phase"]
    assert [r["step"] for r in phase] == [6] and phase[0]["cossl/tfe_features"] > 0
    train = {r["step"]: r for r in rows if r["split"] == "train"}
    assert train[6]["cossl/co_learning"] == 0.0 and train[8]["cossl/co_learning"] == 1.0
    assert "loss/classifier" in train[8] and "loss/classifier" not in train[6]
    assert trainer.algo.co_learning
    predict = trainer.algo.eval_predictor(trainer.ema.model)
    out = trainer.ema.model(torch.zeros(2, *trainer.data.labeled.images.shape[1:]))
    assert torch.equal(predict(out), trainer.ema.model.heads[COSSL_HEAD](out.features))
    per_class = (root / "ref" / "per_class.csv").read_text()
    assert ",refiner,cossl,all," in per_class and ",tfe_probability," in per_class and ",pseudo,final,all," in per_class


def test_meta_json_holds_the_base_values_config_yaml_leaves_null(cossl_run):
    import yaml

    root, trainer, base = cossl_run
    meta = json.loads((root / "ref" / "meta.json").read_text())["algorithm"]
    composed = yaml.safe_load((root / "ref" / "config.yaml").read_text())["algorithm"]
    assert composed["uratio"] is None and composed["lambda_u"] is None
    assert meta["base"] == base and meta["uratio"] == trainer.algo.cfg.uratio
    assert (meta["uratio"], meta["lambda_u"]) == {"fixmatch": (2, 1.0), "mixmatch": (1, 75.0),
                                                  "remixmatch": (1, 1.5)}[base]


@pytest.mark.parametrize("kept", [3, 6, 9])  # before, at (saved after the warm-up), after
def test_a_resumed_run_ends_exactly_alike(cossl_run, kept):
    from imbssl.cli import compose

    root, _, base = cossl_run
    ref, run = root / "ref", root / f"resumed_{kept}"
    shutil.copytree(ref, run)
    for step in (3, 6, 9, 12):
        if step > kept:
            (run / "checkpoints" / f"ckpt_{step:08d}.pt").unlink()
    trainer = Trainer(compose([*TINY, *RUN, f"algorithm.base={base}", f"run_dir={run}",
                               "resume=true"]))
    trainer.prepare()
    assert trainer.step_count == kept and trainer.algo.co_learning == (kept >= 6)
    trainer.run()
    final = "checkpoints/ckpt_00000012.pt"
    a = torch.load(ref / final, weights_only=True)
    b = torch.load(run / final, weights_only=True)
    assert state_differences(a, b) == []
    for name in ("metrics.jsonl", "per_class.csv"):
        assert (ref / name).read_bytes() == (run / name).read_bytes(), name


@pytest.mark.parametrize("base", BASES)
def test_daso_composes(tiny_cfg, base):
    trainer = Trainer(tiny_cfg("algorithm=cossl", f"algorithm.base={base}", "pseudo=daso",
                               "pseudo.warmup_iters=1",
                               "algorithm.pretrain_fraction=0.5", "algorithm.warm_iterations=5",
                               "trainer.iterations=4", "trainer.eval_interval=2", *QUIET))
    summary = trainer.run()
    assert summary["status"] == "finished" and trainer.algo.co_learning
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text()
            .splitlines()]
    co_rows = [r for r in rows if "loss/classifier" in r]
    assert co_rows and all("pseudo/semantic" not in r for r in co_rows)  # logged per class
    # MixMatch has no semantic alignment loss (imbssl's MixMatch, official DASO mixmatch.py)
    assert any("loss/daso_align" in r for r in co_rows) == (base != "mixmatch")


@pytest.mark.parametrize("override, field", [
    ("algorithm.pretrain_fraction=1.0", "pretrain_fraction"),
    ("algorithm.max_lam=1.5", "max_lam"), ("algorithm.warm_batch_size=0", "warm_batch_size"),
    ("algorithm.colearn_lambda_u=-1", "colearn_lambda_u")])
def test_bad_values_are_one_line_errors(tiny_cfg, override, field):
    with pytest.raises(UserError, match=field) as err:
        Trainer(tiny_cfg("algorithm=cossl", "pseudo=none", override))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, words", [
    (["algorithm.base=simmatch"], ["algorithm.base=simmatch", "remixmatch"]),
    (["algorithm.base=mixmatch", "algorithm.dist_align=labeled"], ["dist_align", "MixMatch"])])
def test_a_bad_base_is_one_line_and_exit_2(tmp_path, capsys, overrides, words):
    from hydra.core.global_hydra import GlobalHydra

    from imbssl.cli import main

    GlobalHydra.instance().clear()
    code = main(["train", *TINY, *QUIET, "trainer.iterations=4", f"run_dir={tmp_path / 'run'}",
                 "algorithm=cossl",
                 "pseudo=none", *overrides])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and all(w in lines[0] for w in words), lines


def test_rows_are_generated_and_compose():
    from imbssl.cli import compose
    from imbssl.engine.config import experiment_generator
    from imbssl.typed_config import typed

    gen = experiment_generator("_generate_cossl")
    assert gen.main(["--check"]) == 0, "run: python configs/experiment/_generate_cossl.py"
    rows = gen.rows()
    # FixMatch: the DASO paper's 8 CIFAR-10-LT settings and CoSSL's gamma 50, each +/- DASO;
    # MixMatch, ReMixMatch: CoSSL's own gamma 50, 100, 150 (N1 1500, M1 3000), each +/- DASO
    assert len(rows) == 18 + 2 * 3 * 2 and "cifar10_lt_g50_n1500_cossl" in rows
    for name in rows:
        cfg = compose([f"experiment={name}", "seed=3"])
        assert cfg.experiment_name == name and cfg.algorithm.name == "cossl"
        assert cfg.model.name == "wrn28_2" and cfg.trainer.iterations == 250000
        assert (cfg.pseudo.name == "daso") == name.endswith("_daso")
        base = next((b for b in ("remixmatch", "mixmatch") if f"_{b}_" in name), "fixmatch")
        algo = typed(cfg, "algorithm", CoSSLConfig)
        assert algo.base == base and algo.uratio == (2 if base == "fixmatch" else 1)
    for gamma in (50, 100, 150):
        for base in ("mixmatch", "remixmatch"):
            data = compose([f"experiment=cifar10_lt_g{gamma}_n1500_{base}_cossl"]).dataset
            assert (data.n1, data.m1, data.gamma_l, data.gamma_u) == (1500, 3000, gamma, gamma)
    g50 = compose(["experiment=cifar10_lt_g50_n1500_cossl"]).dataset
    assert (g50.n1, g50.m1, g50.gamma_l, g50.gamma_u) == (1500, 3000, 50, 50)
