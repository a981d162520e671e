"""Logit adjustment (Menon et al., ICLR 2021) for every algorithm: the labeled loss on
``f(x) + tau log pi`` and post-hoc ``f(x) - tau log pi`` at evaluation."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from imbssl.algorithms import StepState, get_algorithm
from imbssl.algorithms.base import logit_adjustment
from imbssl.engine.config import CONFIG_DIR, experiment_generator
from imbssl.errors import UserError

from .conftest import BATCH, make_batch, make_setup

ALGORITHMS = ("supervised", "fixmatch", "mixmatch", "remixmatch", "simmatch")


def build(mode: str, tau: float = 1.0, labels=(0, 0, 1, 2), name: str = "fixmatch"):
    cls = get_algorithm(name)
    cfg = cls.Config(logit_adjust=mode, la_tau=tau)
    return cls(cfg, 3, 16, torch.tensor(labels))


def test_loss_mode_adds_tau_log_prior_hand_computed():
    algo = build("loss", tau=2.0)  # pi = (2/4, 1/4, 1/4)
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    want = logits + 2.0 * torch.tensor([math.log(0.5), math.log(0.25), math.log(0.25)])
    assert torch.allclose(algo.labeled_logits(logits), want)
    # the loss it trains on: CE of row 0 with label 0 = -log softmax(1 + 2 log .5, -2 log 4...)
    z = want[0]
    ce = -(z[0] - torch.logsumexp(z, 0))
    assert torch.isclose(F.cross_entropy(algo.labeled_logits(logits)[:1], torch.tensor([0])), ce)
    # evaluation is untouched in loss mode
    assert torch.equal(algo.eval_logits(SimpleNamespace(logits=logits)), logits)


def test_posthoc_mode_subtracts_it_at_evaluation_only():
    algo = build("posthoc", tau=1.0)
    logits = torch.tensor([[0.2, 0.0, 0.0]])
    adjusted = algo.eval_logits(SimpleNamespace(logits=logits))
    assert torch.allclose(adjusted, logits - torch.log(torch.tensor([0.5, 0.25, 0.25])))
    # head class wins raw (0.2 > 0), a tail class wins after adjustment (0.2 - log .5 < -log .25)
    assert int(logits.argmax()) == 0 and int(adjusted.argmax()) == 1
    assert torch.equal(algo.labeled_logits(logits), logits)


def test_none_changes_nothing_and_offset_formula():
    algo = build("none")
    logits = torch.randn(4, 3)
    assert torch.equal(algo.labeled_logits(logits), logits)
    assert torch.equal(algo.eval_logits(SimpleNamespace(logits=logits)), logits)
    prior = torch.tensor([0.7, 0.2, 0.1])
    assert torch.allclose(logit_adjustment(prior, 0.5), 0.5 * prior.log())


@pytest.mark.parametrize("bad", [{"mode": "train"}, {"mode": "loss", "tau": -1.0},
                                 {"mode": "loss", "labels": (0, 0, 1)}])
def test_bad_la_config_is_a_user_error(bad):
    with pytest.raises(UserError, match="logit_adjust|la_tau"):
        build(bad["mode"], bad.get("tau", 1.0), bad.get("labels", (0, 0, 1, 2)))


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_trains_its_labeled_loss_on_adjusted_logits(name):
    algo, model, ema, _, labels = make_setup(name, logit_adjust="loss", la_tau=1.5)
    seen = []
    original = algo.labeled_logits

    def spy(logits):
        out = original(logits)
        seen.append((logits.detach(), out.detach()))
        return out

    algo.labeled_logits = spy
    batch = make_batch(algo, labels)
    loss, logs = algo.step(batch, StepState(0, 10, model, ema.model))
    assert torch.isfinite(loss)
    assert len(seen) == 1  # one labeled loss per step, on the labeled rows only
    raw, adjusted = seen[0]
    assert raw.shape == (BATCH, 3)
    assert torch.allclose(adjusted - raw.float(), (1.5 * algo.labeled_prior.log()).expand_as(raw))
    if name in ("supervised", "fixmatch", "simmatch"):  # hard labels: CE of the adjusted logits
        assert torch.isclose(logs["loss/labeled"], F.cross_entropy(adjusted, batch.y_lb))


@pytest.mark.parametrize("overrides", [
    ["algorithm=supervised", "pseudo=none", "algorithm.logit_adjust=loss"],  # Supervised w/ LA
    ["algorithm=supervised", "pseudo=none", "algorithm.logit_adjust=posthoc"],
    ["algorithm=fixmatch", "pseudo=none", "algorithm.logit_adjust=loss"],  # FixMatch + LA
    ["algorithm=fixmatch", "pseudo=daso_quick", "pseudo.warmup_iters=1",  # FixMatch + LA w/ DASO
     "algorithm.logit_adjust=loss"],
    ["algorithm=remixmatch", "pseudo=none", "algorithm.logit_adjust=loss", "algorithm.la_tau=2"],
], ids=["supervised_la", "supervised_posthoc", "fixmatch_la", "fixmatch_la_daso",
        "remixmatch_la_tau2"])
def test_digits_runs_with_la(tmp_path, overrides):
    from .tiny_runs import tiny_run

    tiny_run(tmp_path / "run", *overrides)


# ----------------------------------------------------------------------------- experiment files

def comparators_generator():
    return experiment_generator("_generate_comparators_a")


def expected_comparator_rows() -> set[str]:
    """The DASO paper's rows with LA, DARP, Mean Teacher or Pseudo-Label (Tables 1-3, 11-14)."""
    c10 = [f"cifar10_lt_g{g}_n{n}" for g in (100, 150) for n in (500, 1500)]
    c100 = [f"cifar100_lt_g{g}_n{n}" for g in (10, 20) for n in (50, 150)]
    mismatched = [f"cifar10_lt_g100_n{n}_{m}" for n in (500, 1500) for m in ("uniform", "reversed")]
    stl = [f"stl10_lt_g{g}_n{n}" for g in (10, 20) for n in (150, 450)]
    rows = {f"{s}_{r}" for s in c10 + c100 for r in (  # Table 1
        "supervised", "supervised_la", "fixmatch_darp", "fixmatch_la", "fixmatch_la_darp",
        "fixmatch_la_daso")}
    rows |= {f"{s}_fixmatch_darp" for s in mismatched + stl}  # Table 2
    rows |= {f"{s}_darp_estim" for s in mismatched + stl}  # its estimation runs (stage 1)
    rows |= {f"{s}_meanteacher{d}" for d in ("", "_daso") for s in (  # Table 3
        "cifar10_lt_g100_n1500", "cifar10_lt_g100_n1500_uniform", "cifar100_lt_g10_n150",
        "stl10_lt_g10_n450")}
    rows |= {f"{s}_pseudolabel" for s in (  # Table 11
        "cifar10_lt_g100_n500", "cifar10_lt_g100_n1500", "cifar100_lt_g10_n50",
        "cifar100_lt_g10_n150", "stl10_lt_g10_n150", "stl10_lt_g10_n450")}
    rows |= {f"stl10_lt_g10_n{n}_supervised{la}" for n in (150, 450) for la in ("", "_la")}
    rows |= {f"{s}_fixmatch_la{d}" for s in stl for d in ("", "_daso")}  # Table 12
    rows |= {f"{s}_remixmatch_darp" for s in (  # Table 13
        "cifar10_lt_g100_n500", "cifar10_lt_g150_n500", "cifar100_lt_g10_n50",
        "cifar100_lt_g20_n50", "stl10_lt_g10_n150", "stl10_lt_g20_n150")}
    rows |= {f"cifar100_lt_g20_n{n}_fixmatch{d}" for n in (50, 150) for d in ("", "_daso")}
    rows |= {f"cifar100_lt_g20_n50_remixmatch{d}" for d in ("", "_daso")}  # Table 13
    return rows


def test_comparator_rows_are_generated_and_say_what_their_names_say():
    from imbssl.cli import compose

    gen = comparators_generator()
    assert gen.main(["--check"]) == 0, "run: python configs/experiment/_generate_comparators_a.py"
    names = set(gen.rows())
    assert names == expected_comparator_rows()
    # Table 14's LA (inf) is a metric of its base rows, which exist (no duplicate training)
    for base in ("cifar10_lt_g100_n1500", "cifar10_lt_g150_n1500", "cifar100_lt_g10_n150",
                 "cifar100_lt_g20_n150"):
        for d in ("", "_daso"):
            assert (Path(CONFIG_DIR) / "experiment" / f"{base}_fixmatch{d}.yaml").is_file()
    for name in sorted(names):
        cfg = compose([f"experiment={name}"])
        a, p, d = cfg.algorithm, cfg.pseudo, cfg.dataset
        assert cfg.experiment_name == name and cfg.model.name == "wrn28_2"
        assert cfg.trainer.iterations == 250000
        assert f"_{a.name}" in name
        mode = "loss" if "_la" in name else "none"
        assert a.logit_adjust == mode and a.la_tau == 1.0
        if a.name == "supervised":  # official configs/*/supervised.yaml solver
            o = cfg.optim
            assert (o.lr, o.schedule, list(o.milestones), o.gamma, o.warmup_iters) == (
                0.1, "multistep", [199999, 225000], 0.01, 6250)
        matched = d.name != "stl10" and d.gamma_l == d.gamma_u and not d.reverse_unlabeled
        if name.endswith("_darp"):
            assert p.name == "darp" and (p.warmup_ratio, p.per_iters, p.alpha) == (0.4, 10, 2.0)
            assert p.target == ("labeled" if matched else "file")
            if not matched:  # stage 2 loads the estimation row's estimate (same seed)
                setting = name.rsplit("_", 2)[0]
                assert p.estimate_file == (f"runs/{setting}_darp_estim-seed0/"
                                           "darp_estim.npyz"), name
                assert f"{setting}_darp_estim" in names
        elif name.endswith("_darp_estim"):  # stage 1: labeled only, writes the estimate
            assert a.name == "darp_estim" and p.name == "none" and d.num_valid_per_class > 0
            assert a.estimate_file == f"runs/{name}-seed0/darp_estim.npyz"
        elif name.endswith("_daso"):
            assert p.name == "daso"
            assert p.dist_temperature == (1.5 if matched and d.name == "cifar10" else 0.3)
        else:
            assert p.name == "none"
        if a.name in ("meanteacher", "pseudolabel"):
            assert a.uratio == 1
        if a.name == "meanteacher":
            assert (a.lambda_u, a.rampup_ratio) == (50.0, 0.4)
        if a.name == "pseudolabel":
            assert (a.threshold, a.lambda_u, a.rampup_ratio) == (0.95, 1.0, 0.4)
        if a.name == "fixmatch":
            assert a.uratio == 2 and a.dist_align == "none"


# ----------------------------------------------------------------------------- refused
@pytest.mark.parametrize("mode", ["loss", "posthoc"])
@pytest.mark.parametrize("name", ["abc", "acr"])
def test_abc_and_acr_refuse_logit_adjust(name, mode):
    """ABC balances with its own classifier and ACR adjusts its own logits: LA is refused
    (it used to be accepted and ignored)."""
    with pytest.raises(UserError, match=f"algorithm={name}.*logit_adjust={mode}"):
        build(mode, name=name)
    assert build("none", name=name).cfg.logit_adjust == "none"


def test_cli_refuses_acr_with_logit_adjust_exit_2(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "imbssl", "train", "dataset=digits_lt",
                           "algorithm=acr", "algorithm.logit_adjust=posthoc",
                           f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True,
                          timeout=300, env=env, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "logit_adjust=posthoc" in lines[0]
    assert not (tmp_path / "run").exists()
