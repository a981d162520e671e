"""One writer per run folder (issue 32, item 1): a run holds ``RUN/.lock`` (an flock the
kernel drops when the process dies) while it may write; a second writer (``resume=true``,
``overwrite=true`` or a fresh start on the same run_dir) is one line on stderr, exit code 2,
naming the live process (pid and host), and the live run goes on untouched. A SIGKILLed run
never leaves the lock stuck.

The live run is a real process that pauses after step 3 (its checkpoint of step 2 written)
until the test lets it go, so "while it runs" needs no timing.
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from imbssl.cli import main
from imbssl.engine.checkpoint import list_checkpoints

TINY = ["trainer.iterations=6", "trainer.batch_size=8", "trainer.eval_interval=2",
        "trainer.log_interval=2", "trainer.checkpoint_interval=2", "trainer.keep_checkpoints=5",
        "trainer.progress=false", "trainer.tensorboard=false", "trainer.report=false",
        "device=cpu", "pseudo=none"]

def steps(run: Path, split: str = "train") -> list[int]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["split"] == split]


def refused(capsys, args: list[str]) -> str:
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, (code, err)
    return err[0]


def test_second_writer_is_refused_naming_the_live_process(tmp_path, rel, capsys):
    run = tmp_path / "run"
    args = ["train", *TINY, f"run_dir={run}"]
    live = rel.start_pausing(tmp_path, args)
    try:
        rel.wait_paused(live)
        assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2]
        named = f"pid {live.pid} on "
        # a real second process, resuming
        second = rel.cli(*args, "resume=true")
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert "in use by another live run" in lines[0] and named in lines[0], lines[0]
        # overwrite and a fresh start, from this process
        for extra in (["overwrite=true"], [], ["resume=true"]):
            line = refused(capsys, [*args, *extra])
            assert "in use by another live run" in line and named in line, (extra, line)
        assert live.poll() is None  # the live run was not disturbed
        assert rel.go_on(live) == 0, live.logfile.read_text()
    finally:
        if live.poll() is None:
            live.kill()
    # one writer: every row once, as an uninterrupted run writes them
    assert steps(run) == [2, 4, 6] and steps(run, "test") == [2, 4, 6]
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    assert not (run / ".lock").exists()


def test_a_killed_run_leaves_no_stuck_lock(tmp_path, rel, capsys):
    from hydra.core.global_hydra import GlobalHydra

    run = tmp_path / "run"
    args = ["train", *TINY, f"run_dir={run}"]
    live = rel.start_pausing(tmp_path, args)
    try:
        rel.wait_paused(live)
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait(timeout=60)
    assert (run / ".lock").exists()  # left behind, but nobody holds it
    GlobalHydra.instance().clear()
    assert main([*args, "resume=true"]) == 0, capsys.readouterr().err
    assert steps(run) == [2, 4, 6]
    assert not (run / ".lock").exists()


def test_two_identical_fresh_starts_one_runs(tmp_path, rel):
    run = tmp_path / "run"
    args = ["train", *TINY, f"run_dir={run}"]
    procs = [rel.start_pausing(tmp_path, args, name=name) for name in ("a", "b")]
    try:
        deadline = time.monotonic() + 300
        while not any(p.paused.exists() for p in procs) or all(
                p.poll() is None for p in procs):
            assert time.monotonic() < deadline
            assert not all(p.poll() is not None for p in procs), [
                p.logfile.read_text() for p in procs]
            time.sleep(0.1)
        winner = next(p for p in procs if p.paused.exists())
        loser = next(p for p in procs if p is not winner)
        assert loser.wait(timeout=300) == 2
        text = loser.logfile.read_text().strip().splitlines()
        assert len(text) == 1 and f"pid {winner.pid} on " in text[0], text
        assert rel.go_on(winner) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert steps(run) == [2, 4, 6]


@pytest.mark.parametrize("holder", ["dead", "none"])
def test_lock_file_probe(tmp_path, holder):
    from imbssl.engine.run_dir import LOCK_FILE, live_holder, lock_run_dir

    run = tmp_path / "run"
    run.mkdir()
    if holder == "dead":
        (run / LOCK_FILE).write_text("pid 1 on elsewhere since then\n")
    assert live_holder(run) is None
    lock = lock_run_dir(run)
    assert live_holder(run) is None  # its own lock is not another run
    assert (run / LOCK_FILE).read_text().startswith("pid ")
    lock.release()
    assert not (run / LOCK_FILE).exists()
