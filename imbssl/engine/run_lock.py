"""One writer per run folder: an exclusive ``flock`` on ``RUN/.lock`` that process 0 holds
while the run may write its folder; the kernel drops it when the process dies, so a killed
run never leaves it stuck, and a second writer is refused with one line naming the live one."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from imbssl.errors import UserError

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
            holder = _holder(f, wait=exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN))
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


def _holder(f, wait: bool = False) -> str:
    """The holder's line of the lock file; with ``wait``, up to a second for a holder that
    has locked the file but not yet written its name (two runs started at once)."""
    for _ in range(20 if wait else 1):
        try:
            f.seek(0)
            text = f.read(200).strip().splitlines()
        except OSError:
            text = []
        if text:
            return text[0]
        if wait:
            time.sleep(0.05)
    return "a process that has not written its name yet"


def _same_file(f, path: Path) -> bool:
    try:
        a, b = os.fstat(f.fileno()), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


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
