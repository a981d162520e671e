"""A diverging run never writes a non-finite checkpoint (issue 32, item 3). With
``optim.lr=5`` the losses stay finite (about 1e19) while batch-norm running variances of the
model and the EMA model become ``inf``: before a checkpoint is written every parameter and
buffer (model and EMA) and every optimizer state is checked, so the run stops with one line
(exit code 1, ``status: failed``, never ``finished``) and every checkpoint it keeps, the
"last good checkpoint" its message names included, is finite."""
from __future__ import annotations

import json
import math

import pytest
import torch

from imbssl.engine.checkpoint import list_checkpoints, load_checkpoint, non_finite_tensors
from imbssl.engine.trainer import NonFiniteLossError, Trainer

DIVERGING = ["optim.lr=5", "trainer.iterations=40", "trainer.checkpoint_interval=10",
             "trainer.eval_interval=20", "trainer.log_interval=10", "trainer.report=false",
             "trainer.keep_checkpoints=10"]


def test_non_finite_tensors_names_them():
    state = {"model": {"w": torch.ones(3), "var": torch.tensor([1.0, math.inf]),
                       "n": torch.tensor(3)},
             "optimizer": {0: {"momentum_buffer": torch.tensor([math.nan])}}}
    assert non_finite_tensors(state) == ["model/var", "optimizer/0/momentum_buffer"]
    assert non_finite_tensors({"model": {"n": torch.tensor(1)}}) == []


def test_diverging_run_keeps_only_finite_checkpoints(tiny_cfg):
    trainer = Trainer(tiny_cfg(*DIVERGING))
    with pytest.raises(NonFiniteLossError) as info:
        trainer.run()
    message = str(info.value)
    assert "\n" not in message and "running_var" in message, message
    run = trainer.run_dir
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite" in summary["error"]
    kept = list_checkpoints(run / "checkpoints")
    for _, path in kept:  # every checkpoint is finite, the one called "last good" included
        state = load_checkpoint(path)
        assert non_finite_tensors({k: state[k] for k in ("model", "ema", "optimizer")}) == []
    if kept:
        assert f"the last good checkpoint {kept[-1][1].name} is kept" in message
    else:
        assert "no checkpoint had been written" in message


def test_cli_diverged_is_one_line_exit_1(tmp_path, rel):
    out = rel.cli("train", *DIVERGING, *rel.QUIET, f"run_dir={tmp_path / 'run'}")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1, out.stderr
    assert len(lines) == 1 and "non-finite" in lines[0] and "Traceback" not in out.stderr
    status = json.loads((tmp_path / "run" / "summary.json").read_text())["status"]
    assert status != "finished"


def test_final_step_without_checkpoint_is_checked(tiny_cfg):
    """checkpoint_interval=0 writes no checkpoint: the end of the run checks the weights."""
    trainer = Trainer(tiny_cfg(*DIVERGING, "trainer.checkpoint_interval=0"))
    with pytest.raises(NonFiniteLossError, match="no checkpoint had been written"):
        trainer.run()
    assert json.loads((trainer.run_dir / "summary.json").read_text())["status"] == "failed"
