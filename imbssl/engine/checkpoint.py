"""Atomic checkpoints: write to a temporary file, flush + fsync, rename; keep the last few.

A reader (a resumed run, ``imbssl eval``) therefore only ever sees complete files: a process
killed while writing leaves a hidden ``.ckpt_<step>.pt.tmp-<pid>`` file, which no listing
matches and the next save removes. Everything saved loads with
``torch.load(weights_only=True)`` (tensors, numbers, strings and plain containers).

Each checkpoint carries ``checksum``, a SHA-256 of its payload (every key, tensor dtype, shape
and byte), so a file that still unpickles but was altered on disk (a flipped bit) is told
apart from a good one. ``load_checkpoint`` checks it; ``newest_loadable`` walks back from the
newest checkpoint to the newest good one.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch

from imbssl.errors import UserError
from imbssl.fileio import atomic_open, disk_full, is_disk_full

_NAME = re.compile(r"^ckpt_(\d+)\.pt$")
_TMP = re.compile(r"^\.ckpt_\d+\.pt\.tmp-\d+$")
CHECKSUM_KEY = "checksum"


class DamagedCheckpoint(UserError):
    """A checkpoint file that cannot be read, or whose payload fails its checksum."""


def _digest(obj, h) -> None:
    """Feed ``obj`` into the hash ``h`` in a canonical order (dict keys sorted)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _digest(obj[key], h)
    elif isinstance(obj, list | tuple):
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            _digest(item, h)
    else:
        h.update(f"V{obj!r}".encode())


def payload_checksum(state: dict) -> str:
    """SHA-256 of everything in ``state`` except its own checksum."""
    h = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != CHECKSUM_KEY}, h)
    return "sha256:" + h.hexdigest()


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to ``path`` so that a reader never sees a partial file."""
    import io

    path.parent.mkdir(parents=True, exist_ok=True)
    data = io.BytesIO()  # serialise in memory: torch.save turns a failed file write (a full
    try:  # disk) into a RuntimeError; a plain write keeps its OSError
        torch.save(obj, data)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(path, exc) from exc
        raise
    with atomic_open(path) as f:
        f.write(data.getbuffer())
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
    save_atomic({**state, CHECKSUM_KEY: payload_checksum(state)}, path)
    for _, old in list_checkpoints(ckpt_dir)[:-max(keep, 1)]:
        old.unlink(missing_ok=True)
    remove_partial(ckpt_dir)
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely and check its payload checksum; a corrupt or foreign file is a
    one-line ``DamagedCheckpoint``."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"checkpoint {path} is a folder, not a checkpoint file") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        older = [p for s, p in list_checkpoints(path.parent) if p.name != path.name]
        hint = (f"resume=true falls back to {older[-1].name}" if older else
                "start afresh with overwrite=true")
        raise DamagedCheckpoint(f"checkpoint {path} cannot be read ({type(exc).__name__}: it "
                                f"is damaged or not an imbssl checkpoint); {hint}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise DamagedCheckpoint(f"checkpoint {path} is not an imbssl checkpoint (no training "
                                "state)")
    saved = state.get(CHECKSUM_KEY)
    if saved is not None and saved != payload_checksum(state):
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: its payload does not match its "
                                "checksum")
    problem = field_problem(state, path)
    if problem:
        raise DamagedCheckpoint(f"checkpoint {path} is not a usable imbssl checkpoint: "
                                f"{problem}")
    return state


#: what a training checkpoint (one with a ``format``) holds, and of which type; checked on
#: load, before anything on disk changes (a resume truncates the logs to its step)
TRAINING_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": int, "num_classes": int, "model_name": str, "model": dict, "ema": dict,
    "optimizer": dict, "scaler": dict, "algorithm": dict, "labeled_stream": dict,
    "unlabeled_stream": dict, "aug_generator": torch.Tensor, "rng": dict, "tracker": dict,
    "eval_history": dict,
}
#: fields that older checkpoints lack: checked when present
OPTIONAL_FIELDS: dict[str, type | tuple[type, ...]] = {
    "last_eval_step": int, "pending_scalars": list, "algorithm_buffers": dict,
    "labeled_added": (dict, type(None)),
}


def field_problem(state: dict, path: Path) -> str | None:
    """Why ``state`` cannot be a checkpoint of ``path`` (None: it can): ``step`` an integer
    >= 0 equal to the step in the file name; a training checkpoint's fields of their types."""
    step = state.get("step")
    if type(step) is not int or step < 0:
        return f"its step {step!r} is not a step number (an integer >= 0)"
    named = _NAME.match(path.name)
    if named and int(named.group(1)) != step:
        return f"it holds step {step} but its name says step {int(named.group(1))}"
    if "format" not in state:
        return None
    fields = {**TRAINING_FIELDS, **{k: v for k, v in OPTIONAL_FIELDS.items() if k in state}}
    for key, kind in fields.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            return (f"its {key!r} is {'missing' if key not in state else type(value).__name__}"
                    f", not {getattr(kind, '__name__', kind)}")
    if state["num_classes"] < 1 or not -1 <= state.get("last_eval_step", -1) <= step:
        return "its num_classes or last_eval_step is out of range"
    history = state["eval_history"]
    if not all(isinstance(v, list) and all(isinstance(x, int | float) for x in v)
               for v in history.values()):
        return "its eval_history is not lists of numbers"
    return None


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def newest_loadable(ckpt_dir: Path, map_location: str | torch.device = "cpu",
                    ) -> tuple[Path, dict, list[tuple[Path, str]]]:
    """The newest checkpoint that loads and passes its checksum, its state, and the newer
    damaged ones with why; none good is one ``DamagedCheckpoint`` line (nothing is deleted)."""
    damaged: list[tuple[Path, str]] = []
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        if not path.is_file():  # a folder, or a link to nothing, under a checkpoint's name
            damaged.append((path, f"{path} is not a checkpoint file (a folder or a dangling "
                                  "link)"))
            continue
        try:
            return path, load_checkpoint(path, map_location), damaged
        except DamagedCheckpoint as exc:
            damaged.append((path, str(exc)))
    names = ", ".join(p.name for p, _ in damaged)
    raise DamagedCheckpoint(f"resume=true but no checkpoint in {ckpt_dir} is usable ({names}: "
                            "damaged or unreadable); nothing was deleted; start afresh with "
                            "overwrite=true or restore a copy")


def state_differences(a, b, path: str = "") -> list[str]:
    """Where two checkpoint states differ: paths of unequal tensors (``torch.equal``, same
    dtype and shape), missing keys, list lengths and other values; empty when equal."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b))
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in state_differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b))
                for d in state_differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]



def non_finite_tensors(parts: dict) -> list[str]:
    """Paths (``model/bn1.running_var``) of the floating-point tensors in ``parts`` that hold
    a NaN or an infinity; one host sync for all of them."""
    found: list[tuple[str, torch.Tensor]] = []

    def walk(obj, path: str) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() or obj.is_complex():
                found.append((path, obj))
        elif isinstance(obj, dict):
            for key, value in obj.items():
                walk(value, f"{path}/{key}" if path else str(key))
        elif isinstance(obj, list | tuple):
            for i, value in enumerate(obj):
                walk(value, f"{path}[{i}]")

    walk(parts, "")
    if not found:
        return []
    finite = torch.stack([torch.isfinite(t).all().to(found[0][1].device) for _, t in found])
    return [path for (path, _), ok in zip(found, finite.tolist()) if not ok]
