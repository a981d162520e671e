"""Helpers of the reliability tests: the CLI in a subprocess, and checkpoint comparison."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imbssl.engine.checkpoint import state_differences as differences

# one thread per process: the runs compared bit for bit use the same arithmetic, and the
# two-core CI machine runs two of them at once without oversubscription
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
       "HYDRA_FULL_ERROR": "0"}

QUIET = ["trainer.progress=false", "trainer.tensorboard=false", "trainer.report=false",
         "device=cpu"]


def cli(*args: str, timeout: float = 300, env: dict | None = None
        ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imbssl", *args], capture_output=True,
                          text=True, timeout=timeout, check=False, env=env or ENV)


def launch(*args: str, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "imbssl", *args], stdout=out,
                                stderr=subprocess.STDOUT, env=ENV)


# `imbssl train ...` that pauses (touches PAUSED, waits for STOP) at WHERE: "step:N" after
# training step N (before that step's log/eval/checkpoint), or "report" before the report
PAUSING = """
import sys, time
from pathlib import Path
import imbssl.engine.trainer as t
paused, stop, where = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
def pause():
    paused.touch()
    while not stop.exists():
        time.sleep(0.05)
if where == "report":
    report = t.Trainer.write_report
    def pausing_report(self):
        pause()
        report(self)
    t.Trainer.write_report = pausing_report
else:
    at, step = int(where.split(":")[1]), t.Trainer.train_step
    def pausing_step(self):
        step(self)
        if self.step_count == at:
            pause()
    t.Trainer.train_step = pausing_step
from imbssl.cli import main
sys.exit(main(sys.argv[4:]))
"""


def start_pausing(folder: Path, args: list[str], where: str = "step:3",
                  name: str = "live", env: dict | None = None) -> subprocess.Popen:
    """The CLI in a real process that pauses at ``where``; ``.paused``/``.stop``/``.logfile``
    are its files (stdout and stderr go to ``.logfile``)."""
    paused, stop, logfile = (folder / f"{name}.paused", folder / f"{name}.stop",
                             folder / f"{name}.log")
    with open(logfile, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", PAUSING, str(paused), str(stop), where,
                                 *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env or ENV)
    proc.paused, proc.stop, proc.logfile = paused, stop, logfile
    return proc


def wait_paused(proc, limit_s: float = 300) -> None:
    """Until the process reached its pause (the deadline only guards against a hang)."""
    deadline = time.monotonic() + limit_s
    while not proc.paused.exists():
        assert proc.poll() is None, proc.logfile.read_text()
        assert time.monotonic() < deadline, "the process never reached its pause"
        time.sleep(0.1)


def go_on(proc, limit_s: float = 300) -> int:
    """Let a paused process go on; its exit code."""
    proc.stop.touch()
    return proc.wait(timeout=limit_s)


def folder_digest(folder: Path) -> dict[str, str]:
    """relative path -> sha256 (or 'dir') of everything under ``folder``."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="session")
def rel():
    """The helpers above (test modules cannot import a conftest under importlib mode)."""
    from types import SimpleNamespace

    return SimpleNamespace(cli=cli, launch=launch, differences=differences,
                           folder_digest=folder_digest, ENV=ENV, QUIET=list(QUIET),
                           start_pausing=start_pausing, wait_paused=wait_paused, go_on=go_on)
