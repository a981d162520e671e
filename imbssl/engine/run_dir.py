"""The run folder: resolved config, code version, seed and environment beside the results."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import imbssl
from imbssl.errors import UserError

RUN_MARKERS = ("meta.json", "metrics.jsonl", "checkpoints")


def git_commit() -> dict:
    """The commit of the imbssl source tree and whether it has uncommitted changes."""
    root = Path(imbssl.__file__).resolve().parents[1]

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                             timeout=10, check=False)
        return out.stdout.strip() if out.returncode == 0 else ""

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    return {"git_commit": commit or "unknown", "git_dirty": dirty}


def environment(device: torch.device) -> dict:
    env = {"python": sys.version.split()[0], "platform": platform.platform(),
           "torch": torch.__version__, "imbssl_version": imbssl.__version__,
           "device": str(device), "num_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / m).exists() for m in RUN_MARKERS)


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to silently overwrite an existing run; clear it only when asked to."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run_dir {run_dir} exists and is not a folder; choose another run_dir")
    if run_dir.is_dir() and not os.access(run_dir, os.R_OK | os.W_OK | os.X_OK):
        raise UserError(f"run_dir {run_dir} is not readable and writable; fix its permissions "
                        "or choose another run_dir")
    if resume:
        return
    if holds_run(run_dir) and not overwrite:
        raise UserError(f"run_dir {run_dir} already holds a run; pass resume=true to continue "
                        "it, overwrite=true to start afresh, or choose another run_dir")
    if overwrite:
        for name in ("meta.json", "metrics.jsonl", "per_class.csv", "summary.json",
                     "confusion_test.npy"):
            (run_dir / name).unlink(missing_ok=True)
        for sub in ("checkpoints", "tensorboard"):
            _rmtree(run_dir / sub)
    run_dir.mkdir(parents=True, exist_ok=True)


def _rmtree(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)


def write_meta(run_dir: Path, meta: dict) -> None:
    meta = {**meta, "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = run_dir / ".meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, run_dir / "meta.json")
