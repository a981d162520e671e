"""CReST / CReST+: selection rates on a hand-computed split (paper formula and the official
code's ``alpha`` convention), confident-first selection, generations and their temperature,
the labeled-set update in the trainer (logged per class), exact resume across a generation
boundary, and the refused supervised base."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from imbssl.algorithms.crest import (
    generation_bounds,
    gradual_temperature,
    select_pseudo_labeled,
    selection_rates,
)
from imbssl.cli import CONFIG_DIR
from imbssl.engine.checkpoint import state_differences
from imbssl.engine.config import experiment_generator
from imbssl.engine.trainer import Trainer
from imbssl.errors import UserError

QUIET = ["trainer.report=false", "trainer.tensorboard=false"]
TINY = ["trainer.batch_size=8", "trainer.log_interval=2", "trainer.progress=false", "device=cpu"]


def test_selection_rates_follow_the_paper_on_a_hand_computed_split():
    # N = (100, 50, 20, 10): the paper's mu_k = (N_{K+1-k} / N_1)^alpha_paper, alpha_paper = 1/3
    rates = selection_rates(torch.tensor([100, 50, 20, 10]), alpha=3.0)
    hand = torch.tensor([0.1 ** (1 / 3), 0.2 ** (1 / 3), 0.5 ** (1 / 3), 1.0])
    assert torch.allclose(rates, hand, atol=1e-6)
    assert rates.tolist() == pytest.approx([0.464159, 0.584804, 0.793701, 1.0], abs=1e-6)


def test_selection_rates_match_the_official_alpha_convention():
    counts = torch.tensor([1500, 899, 539, 323, 193, 116, 69, 41, 24, 15])  # CIFAR-10-LT g100
    alpha = 3.0
    # official fm_crest.py: mu_per_cls = (dist / dist.max()) ** (1 / ALPHA), class i uses
    # mu_per_cls[K - (i + 1)]
    mu_per_cls = torch.pow(counts.double() / counts.max(), 1 / alpha)
    official = torch.stack([mu_per_cls[len(counts) - (i + 1)] for i in range(len(counts))])
    assert torch.allclose(selection_rates(counts, alpha).double(), official, atol=1e-6)
    # classes in another order: a class's rate follows its frequency rank, not its index
    perm = torch.tensor([3, 0, 9, 5, 1, 8, 2, 7, 4, 6])
    assert torch.allclose(selection_rates(counts[perm], alpha).double(), official[perm],
                          atol=1e-6)


def test_selection_takes_the_most_confident_fraction_of_each_predicted_class():
    # 6 images predicted as class 0 (rate 0.5 -> 3), 3 as class 1 (rate 1.0 -> 3),
    # 1 as class 2 (rate 0.9 -> floor 0.9 = 0)
    conf0 = [0.9, 0.6, 0.8, 0.5, 0.95, 0.7]
    rows = [[c, 1 - c, 0.0] for c in conf0] + [[0.1, 0.8, 0.1], [0.2, 0.7, 0.1],
                                              [0.0, 0.9, 0.1], [0.1, 0.2, 0.7]]
    idx, labels = select_pseudo_labeled(torch.tensor(rows), torch.tensor([0.5, 1.0, 0.9]))
    assert idx.tolist() == [4, 0, 2, 8, 6, 7]
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_generations_and_progressive_temperature():
    assert [generation_bounds(s, 100, 5) for s in (0, 19, 20, 99)] == [
        (0, 0, 20), (0, 0, 20), (1, 20, 20), (4, 80, 20)]
    assert generation_bounds(21, 22, 5) == (4, 16, 6)  # the last one takes the remainder
    temps = [gradual_temperature(g, 5, 0.5) for g in range(5)]  # official gradual_temp
    assert temps == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5])
    assert gradual_temperature(0, 1, 0.5) == 1.0


def test_crest_with_the_supervised_base_is_refused(tiny_cfg):
    with pytest.raises(UserError, match="supervised baseline") as err:
        Trainer(tiny_cfg("algorithm=crest", "pseudo=none", "algorithm.base=supervised"))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="dist_align=labeled"):
        Trainer(tiny_cfg("algorithm=crest", "pseudo=none", "algorithm.progressive_align=true"))


GEN = ["algorithm=crest_plus", "pseudo=none", "algorithm.generations=3",
       "algorithm.threshold=0.5", "trainer.iterations=12", "trainer.eval_interval=3",
       "trainer.checkpoint_interval=3", "trainer.keep_checkpoints=10",
       "trainer.deterministic=true", *QUIET]


@pytest.fixture(scope="module")
def crest_run(tmp_path_factory):
    """A CReST+ run of 3 generations of 4 steps (updates after steps 4 and 8)."""
    from imbssl.cli import compose

    root = tmp_path_factory.mktemp("crest")
    cfg = compose([*TINY, *GEN, f"run_dir={root / 'ref'}"])
    trainer = Trainer(cfg)
    init_size = len(trainer.data.labeled)
    trainer.run()
    return root, cfg, trainer, init_size


def test_labeled_set_updates_are_applied_and_logged_per_class(crest_run):
    root, _, trainer, init_size = crest_run
    run = root / "ref"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in rows if r["split"] == "labeled_set"]
    assert [r["step"] for r in updates] == [4, 8]
    assert all(r["labeled"] == init_size + r["added"] and r["restart"] == 1 for r in updates)
    added = trainer.labeled_added
    assert len(added["indices"]) == updates[-1]["added"] == len(trainer.data.labeled) - init_size
    # the added images are the unlabeled images, labeled with their pseudo-labels
    unl = trainer.data.unlabeled
    assert torch.equal(trainer.data.labeled.images[init_size:], unl.images[added["indices"]])
    assert torch.equal(trainer.data.labeled.labels[init_size:], added["labels"])
    # per class: K x K (true class x pseudo-label) counts and the tidy per-class rows
    conf = np.load(run / "labeled_added_00000008.npy")
    true = unl.labels[added["indices"]]
    k = trainer.data.num_classes
    assert conf.shape == (k, k) and conf.sum() == len(added["indices"])
    for t, p in [(int(a), int(b)) for a, b in zip(true, added["labels"])][:5]:
        assert conf[t, p] >= 1
    assert conf.sum(axis=1).tolist() == torch.bincount(true, minlength=k).tolist()
    pc = pd.read_csv(run / "per_class.csv")
    mine = pc[(pc.source == "labeled_set") & (pc.step == 8) & (pc.metric == "predicted")]
    assert mine.sort_values("class").value.tolist() == conf.sum(axis=0).tolist()
    # the temperature schedule was logged: t = 1, 0.75, 0.5 in generations 1, 2, 3
    train = [r for r in rows if r["split"] == "train"]
    assert train[-1]["crest/generation"] == 3 and train[-1]["crest/da_temperature"] == 0.5


def test_a_run_resumed_before_a_generation_boundary_ends_exactly_alike(crest_run):
    from imbssl.cli import compose

    root, _, _, _ = crest_run
    ref, run = root / "ref", root / "resumed"
    shutil.copytree(ref, run)
    for step in (9, 12):  # keep the checkpoints of steps 3 and 6: step 6 holds generation 2
        (run / "checkpoints" / f"ckpt_{step:08d}.pt").unlink()
    trainer = Trainer(compose([*TINY, *GEN, f"run_dir={run}", "resume=true"]))
    trainer.prepare()
    assert trainer.step_count == 6 and len(trainer.labeled_added["indices"]) > 0
    trainer.run()
    final = "checkpoints/ckpt_00000012.pt"
    a = torch.load(ref / final, weights_only=True)
    b = torch.load(run / final, weights_only=True)
    assert state_differences(a, b) == []
    assert a["labeled_added"] is not None
    for name in ("metrics.jsonl", "per_class.csv", "summary.json", "labeled_added_00000008.npy"):
        assert (ref / name).read_bytes() == (run / name).read_bytes(), name


def test_a_new_generation_restarts_network_and_schedule(tiny_cfg):
    cfg = tiny_cfg("algorithm=crest", "pseudo=none", "algorithm.generations=2",
                   "trainer.iterations=4", "model.ema_warmup=true", *QUIET)
    trainer = Trainer(cfg)
    assert trainer.algo.phase(3, 4) == (1, 2)
    for _ in range(2):
        trainer.train_step()
    assert trainer.algo.labeled_update_due(2, 4) and not trainer.algo.labeled_update_due(4, 4)
    torch.manual_seed(123)
    fresh = trainer._new_model().state_dict()
    torch.manual_seed(123)
    trainer.update_labeled_set()
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, fresh[name].to(value.device)), name
        assert torch.equal(trainer.ema.model.state_dict()[name], value), name
    assert len(trainer.optimizer.state) == 0


def comparators_generator():
    return experiment_generator("_generate_comparators_c")


def test_crest_and_crt_rows_are_generated_and_compose():
    from imbssl.cli import compose

    gen = comparators_generator()
    assert gen.main(["--check"]) == 0, "run: python configs/experiment/_generate_comparators_c.py"
    rows = gen.rows()
    # FixMatch w/ CReST+: Table 1 (8, CIFAR-100-LT gamma 20 included) + Table 2 (8); CReST:
    # Table 2 (8) + Table 11's matched (4); FixMatch + LA w/ CReST+: Table 1 (8); ReMixMatch
    # w/ CReST+: Table 13 (6); Supervised w/ cRT: Table 11. LA (inf) + CReST+ (Table 14) is a
    # metric of the FixMatch w/ CReST+ rows, not a row of its own (no duplicate training)
    counts = {"_fixmatch_crest_plus": 16, "_fixmatch_crest": 12, "_fixmatch_la_crest_plus": 8,
              "_remixmatch_crest_plus": 6, "_supervised_crt": 6}
    for tail, n in counts.items():
        assert len([r for r in rows if r.endswith(tail)]) == n, tail
    assert len(rows) == sum(counts.values())
    assert not [r for r in rows if "_lainf" in r]
    for base in ("cifar10_lt_g100_n1500", "cifar10_lt_g150_n1500", "cifar100_lt_g10_n150",
                 "cifar100_lt_g20_n150"):  # where Table 14's LA (inf) + CReST+ is read
        assert f"{base}_fixmatch_crest_plus" in rows
    experiments = Path(CONFIG_DIR) / "experiment"
    for name in rows:
        cfg = compose([f"experiment={name}", "seed=3"])
        a, t = cfg.algorithm, cfg.trainer
        assert cfg.experiment_name == name and cfg.model.name == "wrn28_2"
        assert (t.iterations, t.batch_size, t.eval_interval) == (250000, 64, 500), name
        assert cfg.pseudo.name == "none", name
        if name.endswith("_crt"):
            ssl = name[: -len("_crt")]
            assert a.name == "crt" and a.init_from == f"runs/{ssl}-seed3", name
            assert (experiments / f"{ssl}.yaml").is_file(), name
            base_cfg = compose([f"experiment={ssl}"])
            assert base_cfg.algorithm.name == "supervised", name
            # the official supervised solver (configs/*/supervised.yaml) for the base run
            assert (base_cfg.optim.lr, base_cfg.optim.schedule) == (0.1, "multistep"), name
            assert (a.sampler, a.sampler_beta, a.eval_network) == ("class_aware", 0.999,
                                                                   "online"), name
            continue
        plus = name.endswith("_crest_plus")
        remix = "_remixmatch_" in name
        assert a.name == ("crest_plus" if plus else "crest"), name
        assert a.base == ("remixmatch" if remix else "fixmatch"), name
        assert (a.generations, a.alpha, a.t_min) == (5, 3.0, 0.5), name
        assert (a.uratio, a.lambda_u) == ((1, 1.5) if remix else (2, 1.0)), name
        la = "loss" if "_la_" in name else "none"
        assert a.logit_adjust == la, name
        assert a.dist_align == ("labeled" if plus else "none"), name
        assert a.progressive_align == plus, name

@pytest.mark.parametrize("algo", ["crest", "crest_plus"])
def test_crest_runs_on_digits_lt_via_the_cli(tmp_path, algo):
    import os
    import subprocess
    import sys

    out = tmp_path / algo
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "-m", "imbssl", "train", "dataset=digits_lt", f"algorithm={algo}",
         "pseudo=none", "algorithm.generations=2", "trainer.iterations=4",
         "trainer.batch_size=8", "trainer.eval_interval=2", "trainer.progress=false",
         "device=cpu", f"run_dir={out}"],
        capture_output=True, text=True, timeout=600, check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss/total"] for r in rows if r["split"] == "train"]
    assert losses and all(np.isfinite(losses))
    assert [r["step"] for r in rows if r["split"] == "labeled_set"] == [2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 4
    for name in ("config.yaml", "meta.json", "per_class.csv", "report.html",
                 "labeled_added_00000002.npy", "checkpoints/ckpt_00000004.pt"):
        assert (out / name).is_file(), name
