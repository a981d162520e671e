"""``hydra/launcher=slurm`` (configs/hydra/launcher/slurm.yaml): hydra-submitit-launcher's
SLURM launcher, whose jobs requeue themselves to continue with ``resume=true``.

It lives in ``hydra_plugins`` because Hydra instantiates launchers from that package only
(hydra/core/plugins.py, ``is_in_toplevel_plugins_module``).

submitit's protocol (submitit/core/job_environment.py, ``SignalHandler``): SLURM signals the
job with SIGUSR2 ``signal_delay_s`` before its time limit (``--signal=USR2@...``) and, where
the cluster sets ``preempt_send_user_signal``, on preemption; submitit's handler then calls
the submitted callable's ``checkpoint(*args)`` and requeues the ``DelayedSubmission`` it
returns (after every preemption, and after each of the first ``max_num_timeout`` time-outs).
The stock launcher resubmits the job's overrides unchanged: the requeued job would start
afresh, or stop because its run folder already holds a run. Here:

* ``checkpoint`` resubmits with ``resume=true`` and without ``overwrite=true`` once the run
  folder holds a checkpoint (a job stopped before its first one is resubmitted as it was);
* while training, the trainer holds SIGUSR2 itself (finishes the step, checkpoints it,
  ``status: preempted``, exit 75); the job then passes the signal on to submitit's handler.
  After a SIGTERM (a preemption without the user signal, or ``scancel``) the resubmission is
  only written, not requeued: if SLURM requeues the job itself, it resumes.
"""
from __future__ import annotations

import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
except ImportError:  # without the `slurm` extra hydra/launcher=slurm does not compose anyway
    SlurmLauncher = None

EXIT_PREEMPTED = 75  # imbssl.cli.EXIT_PREEMPTED


def requeue_overrides(overrides: Sequence[str], has_checkpoint: bool) -> list[str]:
    """A requeued job's overrides: ``resume=true`` and no ``overwrite`` once the run has a
    checkpoint to continue from, else unchanged."""
    if not has_checkpoint:
        return list(overrides)
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("resume",
                                                                             "overwrite")]
    return [*kept, "resume=true"]


def hand_over_to_submitit(signum: int | None) -> None:
    """Pass a preemption the trainer stopped for on to submitit's handler (installed before
    the job ran): SIGUSR2 checkpoints and requeues the job, another signal only writes the
    resubmission. Both exit; nothing happens outside a submitit job."""
    import submitit

    handler = getattr(signal.getsignal(submitit.JobEnvironment._usr_sig()), "__self__", None)
    if handler is None or signum is None:
        return
    if signum == submitit.JobEnvironment._usr_sig():
        handler.checkpoint_and_try_requeue(signum)
    else:
        handler.checkpoint_and_exit(signum)


if SlurmLauncher is not None:

    class RequeueingSlurmLauncher(SlurmLauncher):
        """hydra-submitit-launcher's SlurmLauncher; a requeued job continues its run."""

        def __call__(self, sweep_overrides: list[str], *args: Any) -> Any:
            try:
                return super().__call__(sweep_overrides, *args)
            except SystemExit as exc:  # imbssl's CLI turns Preempted into exit 75
                if exc.code == EXIT_PREEMPTED:
                    hand_over_to_submitit(getattr(exc.__context__, "signum", None))
                raise

        def checkpoint(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
            """The resubmission submitit requeues: the same job, continued (``resume=true``)."""
            has_checkpoint = self._run_has_checkpoint(sweep_overrides)
            return super().checkpoint(requeue_overrides(sweep_overrides, has_checkpoint),
                                      *args, **kwargs)

        def _run_has_checkpoint(self, sweep_overrides: list[str]) -> bool:
            from imbssl.engine.checkpoint import latest_checkpoint

            assert self.hydra_context is not None and self.config is not None
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config,
                                                                     list(sweep_overrides))
            return latest_checkpoint(Path(str(cfg.run_dir)) / "checkpoints") is not None
