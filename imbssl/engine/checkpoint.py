"""Atomic checkpoints: write to a temporary file, flush + fsync, rename; keep the last few.

A reader (a resumed run, ``imbssl eval``) therefore only ever sees complete files: a process
killed while writing leaves a hidden ``.ckpt_<step>.pt.tmp-<pid>`` file, which no listing
matches and the next save removes. Everything saved loads with
``torch.load(weights_only=True)`` (tensors, numbers, strings and plain containers).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from imbssl.errors import UserError
from imbssl.fileio import atomic_open

_NAME = re.compile(r"^ckpt_(\d+)\.pt$")
_TMP = re.compile(r"^\.ckpt_\d+\.pt\.tmp-\d+$")


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to ``path`` so that a reader never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        torch.save(obj, f)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"ckpt_{step:08d}.pt"


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def remove_partial(ckpt_dir: Path) -> None:
    """Delete temporary files left by a writer that was killed (one writer per run)."""
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if _TMP.match(p.name):
                p.unlink(missing_ok=True)


def save_checkpoint(state: dict, ckpt_dir: Path, step: int, keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``step`` and delete all but the last ``keep``."""
    path = checkpoint_path(ckpt_dir, step)
    save_atomic(state, path)
    for _, old in list_checkpoints(ckpt_dir)[:-max(keep, 1)]:
        old.unlink(missing_ok=True)
    remove_partial(ckpt_dir)
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely; a corrupt or foreign file is a one-line ``UserError``."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"checkpoint {path} is a folder, not a checkpoint file") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        older = [p for s, p in list_checkpoints(path.parent) if p.name != path.name]
        hint = (f"delete it to resume from {older[-1].name}" if older else
                "start afresh with overwrite=true")
        raise UserError(f"checkpoint {path} cannot be read ({type(exc).__name__}: it is "
                        f"damaged or not an imbssl checkpoint); {hint}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise UserError(f"checkpoint {path} is not an imbssl checkpoint (no training state)")
    return state


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None
