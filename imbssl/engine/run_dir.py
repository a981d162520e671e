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
from imbssl.engine.run_lock import (  # noqa: F401 - the run folder's lock, re-exported
    LOCK_FILE,
    RunFolderBusy,
    RunLock,
    busy_message,
    live_holder,
    lock_run_dir,
    take_run_lock,
)
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
    holder = live_holder(run_dir)
    if holder is not None:
        raise RunFolderBusy(busy_message(run_dir, holder))
    ckpt = run_dir / "checkpoints"
    if not resume and not overwrite and holds_run(run_dir):
        if _has_checkpoint(ckpt):
            raise UserError(f"run_dir {run_dir} already holds a run; pass resume=true to "
                            "continue it, overwrite=true to start afresh, or choose another "
                            "run_dir")
        raise UserError(f"run_dir {run_dir} holds a run that stopped before its first "
                        "checkpoint, so there is nothing to resume; pass overwrite=true to "
                        "start it afresh, or choose another run_dir")
    if resume and ckpt.exists() and not ckpt.is_dir():
        raise UserError(f"{ckpt} is not a folder; the run folder is damaged: start afresh "
                        "with overwrite=true or choose another run_dir")
    if resume and not _has_checkpoint(ckpt):
        raise UserError(f"resume=true but {ckpt} holds no checkpoint (the run stopped before "
                        "its first one, or never started), so there is nothing to resume; "
                        "start it afresh with overwrite=true (or without resume=true in a new "
                        "run_dir)")


def _has_checkpoint(ckpt_dir: Path) -> bool:
    from imbssl.engine.checkpoint import list_checkpoints

    return bool(list_checkpoints(ckpt_dir))


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


# ----------------------------------------------------------------- resume: the same config
def _as_saved(cfg) -> dict:
    """``cfg`` as config.yaml stores it (resolved YAML read back), so equal configs compare
    equal whatever the value types."""
    import yaml
    from omegaconf import OmegaConf

    return yaml.safe_load(OmegaConf.to_yaml(cfg, resolve=True)) or {}


def saved_config(run_dir: Path) -> dict:
    """The run's config.yaml as plain data (no YAML tags: a crafted file runs nothing)."""
    import yaml

    path = run_dir / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"resume=true but {path} is missing, so the config the run was "
                        "started with is unknown; restore it, or start afresh with "
                        "overwrite=true") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"resume=true but {path} cannot be read ({type(exc).__name__}); "
                        "restore it, or start afresh with overwrite=true") from None
    if not isinstance(data, dict):
        raise UserError(f"resume=true but {path} is not a config (a YAML mapping); restore it, "
                        "or start afresh with overwrite=true")
    return data


def check_resume_config(run_dir: Path, cfg) -> dict[str, tuple]:
    """The changes of ``cfg`` against the run's saved config.yaml that resume accepts
    (``RESUMABLE_KEYS``); any other change is a one-line ``UserError`` listing the keys."""
    from imbssl.engine.config import config_changes, resumable

    changes = config_changes(saved_config(run_dir), _as_saved(cfg))
    refused = {k: changes[k] for k in sorted(changes, key=lambda k: (not k.endswith(".name"), k))
               if not resumable(k)}  # a changed group (dataset.name...) first
    if refused:
        shown = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(refused.items())[:8]]
        more = f" and {len(refused) - 8} more" if len(refused) > 8 else ""
        raise UserError(
            f"resume=true but the config differs from the run's ({run_dir / 'config.yaml'}): "
            f"{'; '.join(shown)}{more}; resume with the run's values, or start a new run "
            "(another run_dir, or overwrite=true); only trainer.iterations, the log/checkpoint "
            "intervals and output switches may change on resume")
    return {k: v for k, v in changes.items() if k not in ("resume", "overwrite")}


def record_resume(run_dir: Path, cfg, step: int, changes: dict[str, tuple]) -> None:
    """Note the resume in meta.json (``resumes``: step, time, changed keys old -> new) and,
    when keys changed, write the new config as the run's config.yaml (so the next resume
    compares against it)."""
    from omegaconf import OmegaConf

    meta_path = run_dir / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = {}
    if not isinstance(meta, dict):
        meta = {}
    entry = {"step": int(step), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "changed": {k: [old, new] for k, (old, new) in changes.items()}}
    meta["resumes"] = [*meta.get("resumes", []), entry]
    with atomic_open(meta_path, "w", encoding="utf-8") as f:
        f.write(json.dumps(meta, indent=2))
    if changes:
        with atomic_open(run_dir / "config.yaml", "w", encoding="utf-8") as f:
            f.write(OmegaConf.to_yaml(cfg, resolve=True))


def write_summary_anyway(run_dir: Path, log, summary: dict) -> None:
    """Write summary.json even on a full disk, so a stopped run never still says
    ``running``: atomically when possible, else in place (the whole summary in compact
    form, or only its status, step and error); never raises."""
    if log is None:
        return
    try:
        log.write_summary(summary)
        return
    except (OSError, RuntimeError):  # DiskFullError is a RuntimeError
        pass
    from imbssl.fileio import overwrite_in_place

    path = run_dir / "summary.json"
    brief = {k: summary[k] for k in ("status", "step", "error") if k in summary}
    for version in (summary, brief):
        try:
            text = json.dumps(version, default=str) + "\n"
        except (TypeError, ValueError):
            continue
        if overwrite_in_place(path, text):
            return


def check_hydra_run_dir(overrides: list[str], run_dir: Path) -> None:
    """``hydra.run.dir`` is where Hydra writes ``.hydra/`` and its job log; it follows
    ``run_dir``. Pointed at another folder that holds a run, Hydra would overwrite that
    run's files: a one-line ``UserError`` (read only)."""
    for arg in overrides:
        key, sep, value = arg.lstrip("+~").partition("=")
        if key != "hydra.run.dir" or not sep or "${" in value:
            continue
        target = Path(value).absolute()
        if target != run_dir and (holds_run(target) or (target / ".hydra").exists()):
            raise UserError(f"hydra.run.dir={value} points at another run's folder, whose "
                            ".hydra/ files Hydra would overwrite; leave hydra.run.dir out (it "
                            "follows run_dir) or point it at a new folder")
