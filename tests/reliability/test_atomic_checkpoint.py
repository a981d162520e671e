"""A process killed while it writes a checkpoint leaves the previous checkpoint loadable, and
the partial file is never taken for a checkpoint."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import torch

from imbssl.engine.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)

# writes a small checkpoint, says "ready", then large ones forever: 20000 tensors, which
# torch.save writes one zip record at a time (about a second per file), so the kill lands
# in the middle of a write
WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from imbssl.engine.checkpoint import save_checkpoint

    ckpt_dir = Path(sys.argv[1])
    save_checkpoint({"step": 1, "w": [torch.full((4,), 1.0)]}, ckpt_dir, 1, keep=2)
    print("ready", flush=True)
    step = 2
    while True:
        state = {"step": step, "w": [torch.full((256,), float(step)) for _ in range(20000)]}
        save_checkpoint(state, ckpt_dir, step, keep=2)
        step += 1
""")


def kill_during_write(ckpt_dir, env) -> bool:
    """Run WRITER and SIGKILL it while a large checkpoint is being written. False when the
    write finished (renamed) between seeing the partial file and the kill landing."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(ckpt_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        deadline, partial = time.monotonic() + 60, None
        while partial is None and time.monotonic() < deadline:
            time.sleep(0.002)
            tmps = [p for p in ckpt_dir.iterdir() if p.name.startswith(".ckpt_")]
            big = [p for p in tmps if p.exists() and p.stat().st_size > 2**20]
            # after one complete large checkpoint, kill in the middle of the next write
            if big and any(s >= 2 for s, _ in list_checkpoints(ckpt_dir)):
                proc.send_signal(signal.SIGKILL)
                partial = big[0]
        assert partial is not None, "no checkpoint write was caught in progress"
    finally:
        proc.kill()
        proc.wait()
    return partial.exists()


def test_kill_during_write_keeps_previous_checkpoint(tmp_path, rel):
    for attempt in range(5):  # the kill can land just after a write completes: try again
        ckpt_dir = tmp_path / f"attempt{attempt}" / "checkpoints"
        if kill_during_write(ckpt_dir, rel.ENV):
            break

    found = list_checkpoints(ckpt_dir)
    assert found, "no complete checkpoint left"
    assert all(not p.name.startswith(".") for _, p in found)
    latest = latest_checkpoint(ckpt_dir)
    assert latest == found[-1][1] and latest.name.startswith("ckpt_")
    for step, path in found:  # every file that looks like a checkpoint is complete
        state = torch.load(path, weights_only=True)
        assert state["step"] == step
        assert all(bool((w == float(step)).all()) for w in state["w"])
    assert load_checkpoint(latest)["step"] == found[-1][0]

    # the next save (a resumed run's) removes the killed writer's leftovers
    leftovers = [p for p in ckpt_dir.iterdir() if p.name.startswith(".ckpt_")]
    assert leftovers, "the killed writer left no temporary file"
    with open(leftovers[0], "rb") as f:  # really a partial file: it does not load
        try:
            torch.load(f, weights_only=True)
            loaded = True
        except Exception:  # noqa: BLE001 - any failure to read means partial
            loaded = False
    assert not loaded
    save_checkpoint({"step": 99, "w": [torch.zeros(1)]}, ckpt_dir, 99, keep=2)
    assert not [p for p in ckpt_dir.iterdir() if p.name.startswith(".ckpt_")]
    assert [s for s, _ in list_checkpoints(ckpt_dir)] == [found[-1][0], 99]


def test_checkpoint_state_is_weights_only_loadable(tiny_cfg):
    """Everything the trainer saves is plain tensors/containers (no pickled objects)."""
    from imbssl.engine.trainer import Trainer

    trainer = Trainer(tiny_cfg("algorithm=simmatch", "pseudo=daso", "pseudo.warmup_iters=1",
                               "trainer.report=false"))
    trainer.run()
    path = latest_checkpoint(trainer.run_dir / "checkpoints")
    state = torch.load(path, weights_only=True)
    assert state["step"] == 4 and state["format"] == 2
    for key in ("model", "ema", "optimizer", "scaler", "algorithm", "algorithm_buffers",
                "labeled_stream", "unlabeled_stream", "aug_generator", "rng", "tracker",
                "eval_history", "last_eval_step", "pending_scalars"):
        assert key in state, key
    assert "labeled_prior" in state["algorithm_buffers"]  # non-persistent buffers too
