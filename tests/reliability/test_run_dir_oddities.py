"""Run-folder oddities (issue 32, item 10; the checkpoint-named folder and dangling link are
in test_checkpoint_fields.py): ``hydra.job.chdir=true`` with a relative run_dir writes into
that folder (not ``rel/rel``) and the same command resumes; ``hydra.run.dir`` pointed at
another run is refused before Hydra rewrites its ``.hydra/``; after a SIGKILL before the
first checkpoint both messages say what works (``overwrite=true``); a top-level
``+key=value`` that the config does not know is refused with one line."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from imbssl.cli import main

TINY = ["trainer.iterations=4", "trainer.batch_size=8", "trainer.eval_interval=2",
        "trainer.log_interval=2", "trainer.checkpoint_interval=2", "trainer.progress=false",
        "trainer.tensorboard=false", "trainer.report=false", "device=cpu", "pseudo=none"]


def run_cli(capsys, *args: str) -> tuple[int, list[str]]:
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    code = main(list(args))
    return code, capsys.readouterr().err.strip().splitlines()


def test_chdir_with_a_relative_run_dir_resumes(tmp_path, rel):
    args = [sys.executable, "-m", "imbssl", "train", *TINY, "run_dir=rel",
            "hydra.job.chdir=true"]
    first = subprocess.run(args, cwd=tmp_path, env=rel.ENV, capture_output=True, text=True,
                           timeout=300, check=False)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "rel" / "metrics.jsonl").is_file()
    assert not (tmp_path / "rel" / "rel").exists()
    again = subprocess.run([*args, "resume=true", "trainer.iterations=6"], cwd=tmp_path,
                           env=rel.ENV, capture_output=True, text=True, timeout=300,
                           check=False)
    assert again.returncode == 0, again.stderr
    summary = json.loads((tmp_path / "rel" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 6


def test_hydra_run_dir_at_another_run_is_refused(tmp_path, rel, capsys):
    old = tmp_path / "old"
    assert run_cli(capsys, "train", *TINY, f"run_dir={old}")[0] == 0
    before = rel.folder_digest(old)
    code, err = run_cli(capsys, "train", *TINY, f"run_dir={tmp_path / 'new'}",
                        f"hydra.run.dir={old}")
    assert code == 2 and len(err) == 1 and "hydra.run.dir" in err[0], err
    assert rel.folder_digest(old) == before
    assert not (tmp_path / "new").exists()


def test_killed_before_the_first_checkpoint_messages_say_what_works(tmp_path, rel, capsys):
    run = tmp_path / "run"
    args = ["train", *TINY, f"run_dir={run}"]
    live = rel.start_pausing(tmp_path, args, "step:1")
    try:
        rel.wait_paused(live)
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait(timeout=60)
    assert not list(run.glob("checkpoints/*.pt"))  # killed before its first checkpoint
    code, fresh = run_cli(capsys, *args)
    assert code == 2 and len(fresh) == 1 and "overwrite=true" in fresh[0], fresh
    assert "pass resume=true" not in fresh[0], fresh  # resume cannot work: no checkpoint
    code, resumed = run_cli(capsys, *args, "resume=true")
    assert code == 2 and len(resumed) == 1 and "overwrite=true" in resumed[0], resumed
    assert "without resume=true to start" not in resumed[0]
    assert run_cli(capsys, *args, "overwrite=true")[0] == 0


@pytest.mark.parametrize("override", ["+seeed=3", "++sede=1"])
def test_unknown_top_level_key_is_refused(tmp_path, capsys, override):
    code, err = run_cli(capsys, "train", *TINY, f"run_dir={tmp_path / 'run'}", override)
    key = override.lstrip("+").split("=")[0]
    assert code == 2 and len(err) == 1 and f"unknown top-level config key {key!r}" in err[0]
    assert not (tmp_path / "run").exists()
