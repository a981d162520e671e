"""Where a run stops early, and how it says so: preemption signals (finish the step,
checkpoint it, raise ``Preempted``), non-finite losses (``NonFiniteLossError``), a full disk
(one-line ``DiskFullError``), and evaluation or report failures, which only warn
(``missing`` in summary.json) and never end training."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading

from imbssl.engine import distributed as ddp
from imbssl.fileio import DiskFullError, disk_full, is_disk_full

NEVER = 2**62  # "no non-finite value yet" in the first-bad-step accumulators


# SLURM's kill (SIGTERM), a `sbatch --signal` warning (SIGUSR1) and submitit's warning
# (SIGUSR2: `--signal=USR2@signal_delay_s`, and on preemption; submitit/core/job_environment.py)
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


class Preempted(RuntimeError):
    """SIGTERM, SIGUSR1 or SIGUSR2 arrived: the step was finished and checkpointed;
    resume=true continues exactly. ``signum``: the signal (None: another process's)."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


@contextlib.contextmanager
def signals_as_flag(flag: dict):
    """While training, the preemption signals only note themselves in ``flag["signal"]`` (read
    between steps); the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield flag  # handlers can only be set from the main thread
        return
    previous = {s: signal.getsignal(s) for s in PREEMPTION_SIGNALS}

    def note(signum, _frame) -> None:
        flag["signal"] = signum

    for s in PREEMPTION_SIGNALS:
        signal.signal(s, note)
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Stops:
    """The trainer's stop handling (a part of :class:`imbssl.engine.trainer.Trainer`; reads
    ``_signal``, ``world``, ``step_count``, ``run_dir``, ``is_main``; appends to ``_missing``)."""

    def _as_disk_full(self, exc: BaseException) -> DiskFullError | None:
        """``exc`` as the one-line full-disk error naming the file (None: another error)."""
        if isinstance(exc, DiskFullError) or not is_disk_full(exc):
            return exc if isinstance(exc, DiskFullError) else None
        return disk_full(exc.filename or f"a log file in {self.run_dir}", exc)

    def _preemption_requested(self) -> bool:
        """A preemption signal reached this process. With several processes: whether one
        reached any process, asked only at flush steps (log/eval/checkpoint: one tiny
        all-reduce where the host syncs anyway), so all stop after the same step and the
        other steps stay free of host syncs."""
        asked = self._signal["signal"] is not None
        if self.world == 1:
            return asked
        return self._flush_step() and ddp.any_process(asked, self.device)

    def _preempt(self) -> None:
        """Checkpoint the finished step (unless it just was) and raise ``Preempted``."""
        if self._saved_step != self.step_count:
            self.save()
        signum = self._signal["signal"]
        name = signal.Signals(signum).name if signum is not None else "a preemption signal"
        raise Preempted(f"{name} received: stopped after step {self.step_count} and "
                        f"checkpointed it in {self.run_dir / 'checkpoints'}; continue with "
                        "resume=true", signum)

    def _guarded(self, what: str, action, fallback=None) -> None:
        """Run ``action``; an evaluation or report failure is logged (one line on stderr, and
        ``missing`` in summary.json) instead of ending the run. Full disks, non-finite losses
        and preemption still stop it."""
        try:
            action()
        except (NonFiniteLossError, Preempted, DiskFullError):
            raise
        except Exception as exc:  # noqa: BLE001 - diagnostics must not kill training
            if is_disk_full(exc):
                raise
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            note = f"{what} at step {self.step_count} failed ({type(exc).__name__}: {first})"
            self._missing.append(note)
            if self.is_main:
                print(f"imbssl: warning: {note}; training goes on", file=sys.stderr)
            if fallback is not None:
                fallback(note)
