"""The run folder: resolved config, code version, seed and environment beside the results."""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import imbssl
from imbssl.errors import UserError
from imbssl.fileio import atomic_open

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


#: what a run writes into its folder (cleared by overwrite=true; Hydra's .hydra/ and the
#: job log are Hydra's and are rewritten/appended by it)
RUN_FILES = ("config.yaml", "meta.json", "metrics.jsonl", "per_class.csv", "summary.json",
             "confusion_test.npy")
RUN_SUBDIRS = ("checkpoints", "tensorboard", "report")


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Raise a one-line ``UserError`` when the run cannot start in ``run_dir``; reads only."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run_dir {run_dir} exists and is not a folder; choose another run_dir")
    if run_dir.is_dir():
        if not os.access(run_dir, os.R_OK | os.W_OK | os.X_OK):
            raise UserError(f"run_dir {run_dir} is not readable and writable; fix its "
                            "permissions or choose another run_dir")
        try:
            next(iter(run_dir.iterdir()), None)
        except OSError as exc:
            raise UserError(f"run_dir {run_dir} cannot be read ({exc.strerror or exc}); fix "
                            "it or choose another run_dir") from None
    else:
        parent = _existing_parent(run_dir)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"run_dir {run_dir} cannot be created: {parent} is not writable; "
                            "choose another run_dir")
    if resume and overwrite:
        raise UserError("resume=true and overwrite=true contradict each other; pass one")
    if not resume and not overwrite and holds_run(run_dir):
        raise UserError(f"run_dir {run_dir} already holds a run; pass resume=true to continue "
                        "it, overwrite=true to start afresh, or choose another run_dir")
    ckpt = run_dir / "checkpoints"
    if resume and ckpt.exists() and not ckpt.is_dir():
        raise UserError(f"{ckpt} is not a folder; the run folder is damaged: start afresh "
                        "with overwrite=true or choose another run_dir")


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to silently overwrite an existing run; clear it only when asked to."""
    check_run_dir(run_dir, resume, overwrite)
    if overwrite and not resume:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        for sub in RUN_SUBDIRS:
            _rmtree(run_dir / sub)
    run_dir.mkdir(parents=True, exist_ok=True)


def _rmtree(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)


def truncate_logs(run_dir: Path, step: int) -> None:
    """Drop the rows a run logged after its checkpoint at ``step`` (and any half-written last
    line), so that a resumed run appends exactly what an uninterrupted run would have.

    ``metrics.jsonl``: JSON lines with ``"step" > step`` go; ``per_class.csv``: rows whose
    first column (step) is larger go. Each file is rewritten atomically, and only if needed.
    """
    _rewrite_kept(run_dir / "metrics.jsonl", lambda line: _json_step(line) <= step)
    _rewrite_kept(run_dir / "per_class.csv", lambda line: _csv_step(line) <= step, header=True)


def _json_step(line: str) -> float:
    try:
        obj = json.loads(line)
        return float(obj["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf  # unreadable: drop


def _csv_step(line: str) -> float:
    try:
        return float(line.split(",", 1)[0])
    except ValueError:
        return math.inf


def _rewrite_kept(path: Path, keep, header: bool = False) -> None:
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    complete = text[: text.rfind("\n") + 1]
    lines = complete.splitlines(keepends=True)
    head, body = (lines[:1], lines[1:]) if header else ([], lines)
    kept = head + [ln for ln in body if keep(ln.rstrip("\n"))]
    new = "".join(kept)
    if new == text:
        return
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        f.write(new)


def write_meta(run_dir: Path, meta: dict) -> None:
    meta = {**meta, "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with atomic_open(run_dir / "meta.json", "w", encoding="utf-8") as f:
        f.write(json.dumps(meta, indent=2))
