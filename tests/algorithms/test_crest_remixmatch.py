"""CReST+ with ReMixMatch as the learner of each generation (official DASO ``rm_crest.py``):
the learner and its rotation head, the tempered target driving ReMixMatch's own distribution
alignment, the ramp-up restarting with each generation, and a digits-LT run through the CLI
that crosses a generation boundary, adds labeled images and has finite losses."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from imbssl.algorithms import algorithm_class
from imbssl.algorithms.base import StepState
from imbssl.algorithms.crest import CReST, CReSTPlus, ReMixMatchCReST
from imbssl.algorithms.remixmatch import ReMixMatch
from imbssl.engine.trainer import Trainer
from imbssl.errors import UserError

QUIET = ["trainer.report=false", "trainer.tensorboard=false"]
TINY = ["trainer.batch_size=8", "trainer.log_interval=2", "trainer.progress=false", "device=cpu"]
RM = ["algorithm=crest_plus", "algorithm.base=remixmatch", "algorithm.uratio=1",
      "algorithm.lambda_u=1.5", "pseudo=none"]
LABELS = torch.tensor([0] * 8 + [1] * 4 + [2] * 2 + [3] * 1)


def _build(algo_cls, **overrides):
    """The registry names the learner class for the config (no __new__ trick)."""
    cfg = algo_cls.Config(base="remixmatch", **overrides)
    return algorithm_class(algo_cls.registered_name, cfg)(cfg, 4, 16, LABELS)


def test_base_remixmatch_builds_a_remixmatch_learner_with_its_rotation_head():
    algo = _build(CReSTPlus)
    assert isinstance(algo, ReMixMatchCReST) and isinstance(algo, ReMixMatch)
    assert algo.registered_name == "crest_plus" and algo.cfg.progressive_align
    assert algorithm_class("crest", CReST.Config()) is CReST  # base=fixmatch
    assert set(CReSTPlus.make_heads(algo.cfg, 16, 4)) == {"rotation"}
    assert CReST.make_heads(CReST.Config(), 16, 4) == {}  # FixMatch learner: no heads
    # the CReST rates of the labeled counts (8, 4, 2, 1), alpha 3: (1/8)^(1/3) for the head
    assert algo.selection_rate[0].item() == pytest.approx(0.5)
    assert algo.selection_rate[3].item() == pytest.approx(1.0)


def test_unknown_base_is_refused_in_one_line():
    with pytest.raises(UserError, match="algorithm.base=mixmatch"):
        CReST(CReST.Config(base="mixmatch"), 4, 16, LABELS)


def test_the_ramp_up_restarts_with_each_generation():
    algo = _build(CReSTPlus, generations=2, rampup_ratio=0.5)
    plain = ReMixMatch(ReMixMatch.Config(rampup_ratio=0.5), 4, 16, LABELS)
    ramp = [algo.consistency_ramp(StepState(s, 20, None, None)) for s in (0, 5, 10, 15)]
    # generation length 10, ramp over its first 5 steps: 0, 1, then again 0, 1
    assert ramp == pytest.approx([0.0, 1.0, 0.0, 1.0])
    assert plain.consistency_ramp(StepState(10, 20, None, None)) == pytest.approx(1.0)
    assert plain.consistency_ramp(StepState(5, 20, None, None)) == pytest.approx(0.5)


def test_the_tempered_target_drives_remixmatchs_distribution_alignment(tiny_cfg):
    trainer = Trainer(tiny_cfg(*RM, "algorithm.generations=3", "trainer.iterations=6"))
    algo = trainer.algo
    assert isinstance(algo, ReMixMatchCReST)
    prior = algo.labeled_prior
    batch, _ = trainer.next_batch()
    for step, t in ((0, 1.0), (2, 0.75), (4, 0.5)):
        state = StepState(step, 6, trainer.forward_model, trainer.ema.model)
        loss, logs = algo.step(batch, state)
        expected = prior.pow(t) / prior.pow(t).sum()
        assert torch.allclose(algo.dist_align.target, expected)
        assert float(logs["crest/da_temperature"]) == pytest.approx(t)
        assert torch.isfinite(loss)


def test_crest_plus_remixmatch_runs_on_digits_lt_via_the_cli(tmp_path):
    out = tmp_path / "rm_crest"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "-m", "imbssl", "train", "dataset=digits_lt", *RM,
         "algorithm.generations=2", "trainer.iterations=4", "trainer.batch_size=8",
         "trainer.eval_interval=2", "trainer.progress=false", "device=cpu", f"run_dir={out}"],
        capture_output=True, text=True, timeout=600, check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert train and all(np.isfinite([r["loss/total"] for r in train]))
    assert all(np.isfinite([r["loss/rotation"] for r in train]))  # ReMixMatch's losses
    updates = [r for r in rows if r["split"] == "labeled_set"]
    assert [r["step"] for r in updates] == [2] and updates[0]["added"] > 0
    assert updates[0]["labeled"] > updates[0]["added"] and updates[0]["restart"] == 1
    assert train[-1]["crest/generation"] == 2 and train[-1]["crest/da_temperature"] == 0.5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 4
    for name in ("config.yaml", "per_class.csv", "labeled_added_00000002.npy",
                 "checkpoints/ckpt_00000004.pt"):
        assert (out / name).is_file(), name
