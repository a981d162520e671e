"""The run folder: resolved config, code version, seed and environment beside the results."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import platform
import socket
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


# ----------------------------------------------------------------- one writer per run folder
LOCK_FILE = ".lock"


class RunFolderBusy(UserError):
    """Another live process writes the run folder (it holds ``RUN/.lock``)."""


class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock``, held while a run may write its folder.

    The kernel drops the lock when the holder's file is closed, so a run killed in any way
    (SIGKILL included) never leaves it stuck; the file itself then stays behind, names the
    dead holder and is simply locked again by the next run. The holder writes
    ``pid <pid> on <host>`` into it, so a refused second writer can name it. ``release``
    removes the file while still holding the lock; :func:`lock_run_dir` checks, after locking,
    that the file it locked is still the one at the path (else another process removed it in
    between and it tries again), so two processes can never both hold it.
    """

    def __init__(self, path: Path, file, created_dir: Path | None):
        self.path, self._file, self._created_dir = path, file, created_dir

    @property
    def held(self) -> bool:
        return self._file is not None

    def release(self) -> None:
        """Unlock and remove the lock file (and the run folder, if this lock created it and
        nothing else was written there). Idempotent."""
        if self._file is None:
            return
        _HELD.discard(_key(self.path))
        with contextlib.suppress(OSError):  # e.g. a folder made read-only meanwhile
            self.path.unlink(missing_ok=True)
        self._file.close()
        self._file = None
        if self._created_dir is not None:
            with contextlib.suppress(OSError):
                self._created_dir.rmdir()  # only if still empty


def lock_run_dir(run_dir: Path) -> RunLock:
    """Take the run folder's lock (creating the folder if needed); a folder that another live
    process holds is a one-line ``RunFolderBusy`` naming it (pid and host)."""
    created = None if run_dir.exists() else run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    while True:
        f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the run's life
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(f)
            f.close()
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunFolderBusy(busy_message(run_dir, holder)) from None
        if _same_file(f, path):
            break
        f.close()  # removed by its previous holder while we opened it: lock the new one
    with contextlib.suppress(OSError):  # a full disk: the lock holds even when the name cannot
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
        f.flush()
    _HELD.add(_key(path))
    return RunLock(path, f, created)


#: lock files this process holds (its own lock is not "another live run")
_HELD: set[str] = set()


def _key(path: Path) -> str:
    return os.path.realpath(path)


def busy_message(run_dir: Path, holder: str) -> str:
    return (f"run_dir {run_dir} is in use by another live run ({holder}); one process writes "
            "a run folder at a time: wait for it to end (or stop it), then continue it with "
            "resume=true, or choose another run_dir")


def live_holder(run_dir: Path) -> str | None:
    """Who holds the run folder's lock (``pid N on HOST since TIME``), or None when no live
    process does. Reads only: an existing lock file is opened read-only and probed."""
    from imbssl.engine import distributed as ddp

    path = run_dir / LOCK_FILE
    if not ddp.is_main() or _key(path) in _HELD:  # process 0 alone takes it
        return None
    try:
        f = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
    except OSError:
        return None  # no lock file: nobody holds it
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _holder(f)
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return None


def _holder(f) -> str:
    try:
        f.seek(0)
        text = f.read(200).strip().splitlines()
    except OSError:
        text = []
    return text[0] if text else "a process that has not written its name yet"


def _same_file(f, path: Path) -> bool:
    try:
        a, b = os.fstat(f.fileno()), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)




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


def take_run_lock(run_dir: Path, is_main: bool, device) -> RunLock | None:
    """Process 0 takes the run folder's lock (it alone writes the folder); with several
    processes all agree, so a refused lock stops every one of them with the same line."""
    from imbssl.engine import distributed as ddp

    lock, busy = None, None
    if is_main:
        try:
            lock = lock_run_dir(run_dir)
        except RunFolderBusy as exc:
            busy = exc
    if ddp.any_process(busy is not None, device):
        if lock is not None:
            lock.release()
        raise busy or RunFolderBusy(f"run_dir {run_dir} is in use by another live run (see "
                                    "process 0's message)")
    return lock


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
