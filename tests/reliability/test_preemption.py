"""Preemption: SIGTERM or SIGUSR1 (SLURM's warning signals) during training finishes the
step, checkpoints it, writes ``status: preempted`` in summary.json and exits with code 75;
``resume=true`` then ends exactly like an uninterrupted run (same bar as the SIGKILL test:
the final checkpoint tensor for tensor, the log files byte for byte).

The SIGUSR1 test runs in this process and signals itself after a step that is neither a
log nor a checkpoint step, so the preemption checkpoint carries pending log sums; the SIGTERM
test runs the real command line.
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch

from imbssl.engine.checkpoint import list_checkpoints

# slow: multi-process / subprocess training (`pytest -m slow`; CI runs them)
pytestmark = pytest.mark.slow

FILES = ("metrics.jsonl", "per_class.csv", "summary.json", "confusion_test.npy")


def test_sigusr1_checkpoints_the_step_and_resume_equals_uninterrupted(tiny_cfg, tmp_path, rel):
    from imbssl.engine.trainer import Preempted, Trainer

    overrides = ["trainer.iterations=8", "trainer.checkpoint_interval=4",
                 "trainer.log_interval=2", "trainer.eval_interval=4", "trainer.report=false",
                 "trainer.deterministic=true", "pseudo=daso", "pseudo.warmup_iters=2",
                 "pseudo.queue_size=8", "algorithm.threshold=0.5"]
    ref = Trainer(tiny_cfg(*overrides, f"run_dir={tmp_path / 'ref'}"))
    ref.run()

    run_dir = tmp_path / "signalled"
    trainer = Trainer(tiny_cfg(*overrides, f"run_dir={run_dir}"))
    step_once = trainer.train_step

    def step_and_signal_at_5() -> None:
        step_once()
        if trainer.step_count == 5:  # neither a log (2) nor a checkpoint (4) step
            os.kill(os.getpid(), signal.SIGUSR1)

    trainer.train_step = step_and_signal_at_5
    previous = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(Preempted, match="SIGUSR1 received: stopped after step 5"):
        trainer.run()
    assert signal.getsignal(signal.SIGUSR1) is previous  # handlers restored
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["step"] == 5
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [4, 5]
    state = torch.load(run_dir / "checkpoints" / "ckpt_00000005.pt", weights_only=True)
    assert state["pending_scalars"] and state["pending_scalars"][0][2] == 1  # step 5's sums

    resumed = Trainer(tiny_cfg(*overrides, f"run_dir={run_dir}", "resume=true"))
    assert resumed.run()["status"] == "finished" and resumed._resumed_at == 5
    final = "checkpoints/ckpt_00000008.pt"
    assert rel.differences(torch.load(tmp_path / "ref" / final, weights_only=True),
                           torch.load(run_dir / final, weights_only=True)) == []
    for name in FILES:
        assert (tmp_path / "ref" / name).read_bytes() == (run_dir / name).read_bytes(), name


ITERS = 20
COMMON = [f"trainer.iterations={ITERS}", "trainer.batch_size=8", "trainer.eval_interval=4",
          "trainer.log_interval=2", "trainer.checkpoint_interval=4", "trainer.keep_checkpoints=2",
          "trainer.deterministic=true", "dataset.n1=30", "dataset.m1=60", "algorithm=fixmatch",
          "pseudo=daso", "pseudo.warmup_iters=2", "pseudo.dist_window=3", "pseudo.queue_size=8",
          "algorithm.threshold=0.5"]


def _logged_steps(run) -> list[int]:
    path = run / "metrics.jsonl"
    text = path.read_text() if path.is_file() else ""
    return [json.loads(line)["step"] for line in text[: text.rfind("\n") + 1].splitlines()]


def test_sigterm_cli_exit_75_and_resume_equals_uninterrupted(tmp_path, rel):
    args = [*COMMON, *rel.QUIET]
    ref = rel.launch("train", *args, f"run_dir={tmp_path / 'ref'}", log=tmp_path / "ref.log")
    run = tmp_path / "term"
    proc = rel.launch("train", *args, f"run_dir={run}", log=tmp_path / "term.log")
    deadline, signalled = time.monotonic() + 900, False
    while proc.poll() is None and time.monotonic() < deadline:
        if max(_logged_steps(run), default=0) >= 6:
            proc.send_signal(signal.SIGTERM)
            signalled = True
            break
        time.sleep(0.01)
    assert proc.wait(timeout=900) == 75, (tmp_path / "term.log").read_text()[-3000:]
    assert signalled
    assert ref.wait(timeout=900) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    log = (tmp_path / "term.log").read_text()
    assert "SIGTERM received: stopped after step" in log
    summary = json.loads((run / "summary.json").read_text())
    stopped = summary["step"]
    assert summary["status"] == "preempted" and 6 <= stopped < ITERS
    assert stopped in [s for s, _ in list_checkpoints(run / "checkpoints")]

    resumed = rel.cli("train", *args, f"run_dir={run}", "resume=true", timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped}" in resumed.stderr
    final = f"checkpoints/ckpt_{ITERS:08d}.pt"
    assert rel.differences(torch.load(tmp_path / "ref" / final, weights_only=True),
                           torch.load(run / final, weights_only=True)) == []
    for name in FILES:
        assert (tmp_path / "ref" / name).read_bytes() == (run / name).read_bytes(), name
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
