"""Atomic file writes: a reader never sees a half-written file, whatever kills the writer.
A full disk (ENOSPC, or a quota: EDQUOT) is a one-line ``DiskFullError`` naming the file."""
from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
#: write failures the CLI reports as one line with exit code 74 (sysexits EX_IOERR)
WRITE_FAILURES = (*NO_SPACE, errno.EROFS, errno.EIO)


class DiskFullError(RuntimeError):
    """A write failed for lack of space; the file it replaces (if any) is left as it was."""


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in NO_SPACE


def disk_full(path: str | os.PathLike, exc: OSError) -> DiskFullError:
    """The one-line error for a write to ``path`` that ran out of space."""
    return DiskFullError(f"no space left on the device while writing {path} "
                         f"({os.strerror(exc.errno)}); free some space, then resume=true "
                         "continues from the last checkpoint")


def temp_path(path: Path) -> Path:
    """The temporary file ``atomic_open`` writes before renaming: ``.NAME.tmp-PID``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success flush, fsync and rename it over
    ``path``; on any failure remove it and leave ``path`` as it was (a full disk is a
    ``DiskFullError`` naming ``path``)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full(path, exc) from exc
        raise


def is_write_failure(exc: BaseException) -> bool:
    """A full disk, a quota, a read-only file system or an I/O error (not a bug)."""
    return isinstance(exc, OSError) and exc.errno in WRITE_FAILURES


def describe_write_failure(exc: OSError, where: str = "") -> str:
    """One line for a failed write: which file, why, and what to do."""
    path = exc.filename or where or "a file"
    if exc.errno in NO_SPACE:
        return str(disk_full(path, exc))
    if exc.errno == errno.EROFS:
        return (f"cannot write {path}: it is on a read-only file system; write somewhere "
                "writable (run_dir=..., or --out for imbssl report)")
    return f"cannot write {path} ({os.strerror(exc.errno)}); check the disk, then try again"


def overwrite_in_place(path: str | os.PathLike, text: str) -> bool:
    """Rewrite a small existing file in place (no temporary file): the last resort on a full
    disk, where overwriting the blocks a file already has needs no new space. Not atomic: a
    crash in between leaves a damaged file. True when it worked."""
    data = text.encode("utf-8")
    try:
        with open(path, "r+b") as f:
            f.write(data)
            f.truncate(len(data))
            f.flush()
            os.fsync(f.fileno())
        return True
    except OSError:
        return False
