"""A non-finite loss stops the run with one line naming the first bad step and loss term;
no checkpoint is written after it and the last good checkpoint is kept and loads."""
from __future__ import annotations

import json
import math

import pytest
import torch

from imbssl.engine.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from imbssl.engine.trainer import NonFiniteLossError, Trainer

BAD_STEP = 6  # 1-based, as in metrics.jsonl: the 0-based step 5


def poisoned(tiny_cfg) -> Trainer:
    trainer = Trainer(tiny_cfg("trainer.iterations=12", "trainer.log_interval=4",
                               "trainer.eval_interval=4", "trainer.checkpoint_interval=4",
                               "trainer.keep_checkpoints=5", "trainer.report=false",
                               "pseudo=none"))
    step_fn = trainer.algo.step

    def step(batch, state):
        loss, logs = step_fn(batch, state)
        if state.step == BAD_STEP - 1:
            nan = torch.tensor(math.nan)
            logs["loss/unlabeled"] = logs["loss/unlabeled"] + nan
            loss = loss * nan  # NaN gradients: the weights turn NaN too
        return loss, logs

    trainer.algo.step = step
    return trainer


def test_non_finite_loss_names_step_and_term(tiny_cfg):
    trainer = poisoned(tiny_cfg)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.run()
    message = str(info.value)
    assert "\n" not in message
    assert f"loss/unlabeled at step {BAD_STEP}" in message
    assert f"loss/labeled from step {BAD_STEP + 1}" in message  # the weights were NaN then
    assert "ckpt_00000004.pt (step 4) is kept" in message
    # stopped at the flush of step 8, before its checkpoint
    assert [s for s, _ in list_checkpoints(trainer.run_dir / "checkpoints")] == [4]
    state = load_checkpoint(latest_checkpoint(trainer.run_dir / "checkpoints"))
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    summary = json.loads((trainer.run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "loss/unlabeled" in summary["error"]


def test_cli_prints_one_line_and_exits_1(tiny_cfg, capsys):
    from imbssl.cli import _run_task

    trainer = poisoned(tiny_cfg)
    with pytest.raises(SystemExit) as info:
        _run_task(trainer.cfg, trainer, debug=False)
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imbssl: error: non-finite loss")


def test_first_bad_step_is_exact_without_host_syncs(tiny_cfg):
    """The step is found on the device: flush only at the end, still the exact step."""
    trainer = poisoned(tiny_cfg)
    for _ in range(10):
        trainer.train_step()
    with pytest.raises(NonFiniteLossError, match=f"loss/unlabeled at step {BAD_STEP} "):
        trainer.flush_scalars()
