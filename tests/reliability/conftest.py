"""Helpers of the reliability tests: the CLI in a subprocess, and checkpoint comparison."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imbssl.engine.checkpoint import state_differences as differences

# one thread per process: the runs compared bit for bit use the same arithmetic, and the
# two-core CI machine runs two of them at once without oversubscription
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
       "HYDRA_FULL_ERROR": "0"}

QUIET = ["trainer.progress=false", "trainer.tensorboard=false", "trainer.report=false",
         "device=cpu"]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imbssl", *args], capture_output=True,
                          text=True, timeout=timeout, check=False, env=ENV)


def launch(*args: str, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "imbssl", *args], stdout=out,
                                stderr=subprocess.STDOUT, env=ENV)


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
                           folder_digest=folder_digest, ENV=ENV, QUIET=list(QUIET))
