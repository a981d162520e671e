"""SLURM requeue (``hydra/launcher=slurm``, hydra_plugins/imbssl_launcher/requeue.py): the
launcher config composes into the requeueing launcher, whose checkpoint hook resubmits a job
with ``resume=true`` and never ``overwrite=true``; and a job signalled with SIGUSR2 (submitit's
warning) mid-training goes through submitit's own protocol in this process (its signal
handler, its resubmission pickle, its local requeue), and the requeued job ends exactly like
an uninterrupted run. No SLURM here: submitit's local job environment stands in for it.
"""
from __future__ import annotations

import importlib.util
import os
import signal

import pytest
import torch

from hydra_plugins.imbssl_launcher.requeue import requeue_overrides

needs_plugin = pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason="needs the slurm extra: pip install -e '.[slurm]'")

RUN = ["trainer.iterations=8", "trainer.batch_size=8", "trainer.checkpoint_interval=4",
       "trainer.log_interval=2", "trainer.eval_interval=4", "trainer.report=false",
       "trainer.progress=false", "trainer.tensorboard=false", "trainer.deterministic=true",
       "device=cpu", "pseudo=daso", "pseudo.warmup_iters=2", "pseudo.queue_size=8",
       "algorithm.threshold=0.5"]
FILES = ("metrics.jsonl", "per_class.csv", "summary.json", "confusion_test.npy")


def test_requeue_overrides_resume_and_never_overwrite():
    given = ["seed=3", "overwrite=true", "+resume=false", "run_dir=runs/a"]
    assert requeue_overrides(given, has_checkpoint=True) == ["seed=3", "run_dir=runs/a",
                                                             "resume=true"]
    assert requeue_overrides(["++overwrite=true", "resume=true"], True) == ["resume=true"]
    assert requeue_overrides(["seed=1"], True) == ["seed=1", "resume=true"]
    assert requeue_overrides(given, has_checkpoint=False) == given  # nothing to resume yet


@pytest.fixture(autouse=True)
def _clear_hydra():
    """make_launcher leaves Hydra initialised, as ``imbssl train -m`` does."""
    yield
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()


def make_launcher(tmp_path, task_function=None):
    """The launcher ``imbssl train -m hydra/launcher=slurm`` instantiates, set up as Hydra's
    sweeper sets it up before submitting."""
    from hydra._internal.callbacks import Callbacks
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext, RunMode

    from imbssl.cli import CONFIG_DIR
    from imbssl.engine.config import register_configs

    GlobalHydra.instance().clear()
    register_configs()
    hydra = Hydra.create_main_hydra2("imbssl-train", create_config_search_path(str(CONFIG_DIR)))
    cfg = hydra.compose_config("config", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                          f"hydra.sweep.dir={tmp_path / 'sweep'}",
                                          "hydra/job_logging=disabled",
                                          "hydra/hydra_logging=disabled"],
                               run_mode=RunMode.MULTIRUN)
    context = HydraContext(config_loader=hydra.config_loader, callbacks=Callbacks(cfg))
    return cfg, Plugins.instance().instantiate_launcher(
        config=cfg, hydra_context=context, task_function=task_function or (lambda c: None))


@needs_plugin
def test_launcher_config_composes_and_checkpoint_hook_resubmits_with_resume(tmp_path):
    cfg, launcher = make_launcher(tmp_path)
    # after Hydra's plugin scan, which executes the module again
    from hydra_plugins.imbssl_launcher.requeue import RequeueingSlurmLauncher

    assert isinstance(launcher, RequeueingSlurmLauncher)
    params = launcher.params
    assert (params["partition"], params["gpus_per_node"], params["tasks_per_node"]) == ("gpu", 1, 1)
    assert params["signal_delay_s"] == 300 and params["max_num_timeout"] == 3

    run_dir = tmp_path / "run"
    job = ["seed=3", "overwrite=true", f"run_dir={run_dir}"]
    args = ("hydra.sweep.dir", 0, "job_id_for_0", {})
    before = launcher.checkpoint(job, *args)  # no checkpoint yet: resubmitted as it was
    assert before.function is launcher and before.args == (job, *args)

    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "ckpt_00000004.pt").write_bytes(b"")
    after = launcher.checkpoint(job, *args)
    assert after.function is launcher
    assert after.args == (["seed=3", f"run_dir={run_dir}", "resume=true"], *args)
    assert job == ["seed=3", "overwrite=true", f"run_dir={run_dir}"]  # the original untouched


@pytest.fixture
def submitit_job(tmp_path, monkeypatch):
    """This process as a submitit job (its local job environment), its handlers put back."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "42")
    monkeypatch.setenv("SUBMITIT_FOLDER", str(tmp_path / "submitit"))
    (tmp_path / "submitit").mkdir()
    handled = (signal.SIGTERM, signal.SIGCONT, signal.SIGUSR2)
    previous = {s: signal.getsignal(s) for s in handled}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


def submitit_paths():
    import submitit

    return submitit.JobEnvironment().paths


def run_as_submitit_job(delayed):
    """What submitit/core/submission.py ``process_job`` does: its handlers, then the job."""
    import submitit

    env = submitit.JobEnvironment()
    env._handle_signals(env.paths, delayed)
    return delayed.result()


@pytest.mark.slow  # subprocess / multi-process training: `pytest -m slow`
@needs_plugin
def test_sigusr2_job_requeues_with_resume_and_ends_like_uninterrupted(
        tmp_path, submitit_job, monkeypatch, tiny_cfg, rel):
    from hydra.core.singleton import Singleton
    from submitit.helpers import DelayedSubmission
    from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

    from imbssl import cli
    from imbssl.engine.trainer import Trainer

    Trainer(tiny_cfg(*RUN, f"run_dir={tmp_path / 'ref'}")).run()

    signalled = []
    step_once = Trainer.train_step

    def step_and_signal_at_5(self) -> None:  # SIGUSR2 once, after a step that logs nothing
        step_once(self)
        if self.step_count == 5 and not signalled:
            signalled.append(os.getpid())
            os.kill(os.getpid(), signal.SIGUSR2)

    monkeypatch.setattr(Trainer, "train_step", step_and_signal_at_5)
    _, launcher = make_launcher(tmp_path, lambda cfg: cli._run_task(cfg, None, False))
    run_dir = tmp_path / "job"
    job = [*RUN, f"run_dir={run_dir}"]  # submitted without resume=true
    delayed = DelayedSubmission(launcher, job, "hydra.sweep.dir", 0, "job_id_for_0",
                                Singleton.get_state())
    delayed.set_timeout(timeout_min=60, max_num_timeout=3)
    with pytest.raises(SystemExit) as requeued:
        run_as_submitit_job(delayed)
    paths = submitit_paths()
    assert requeued.value.code == LOCAL_REQUEUE_RETURN_CODE  # submitit requeued the job
    assert signalled
    summary = (run_dir / "summary.json").read_text()
    assert '"status": "preempted"' in summary and '"step": 5' in summary

    resubmitted = DelayedSubmission.load(paths.submitted_pickle)
    overrides = resubmitted.args[0]
    assert overrides == [*job, "resume=true"] and "overwrite=true" not in overrides
    assert resubmitted._timeout_countdown == 3  # a preemption, not a time-out

    result = run_as_submitit_job(resubmitted)  # the requeued job
    assert result.return_value["status"] == "finished"
    final = "checkpoints/ckpt_00000008.pt"
    assert rel.differences(torch.load(tmp_path / "ref" / final, weights_only=True),
                           torch.load(run_dir / final, weights_only=True)) == []
    for name in FILES:
        assert (tmp_path / "ref" / name).read_bytes() == (run_dir / name).read_bytes(), name


@needs_plugin
def test_preemption_is_handed_to_submitits_handler(submitit_job):
    """SIGUSR2 (submitit's signal): checkpoint and requeue; SIGTERM (a preemption without the
    user signal, or scancel): only the resubmission is written; outside a job: nothing."""
    from hydra_plugins.imbssl_launcher.requeue import hand_over_to_submitit

    class Handler:  # stands for submitit's SignalHandler
        calls: list = []

        def checkpoint_and_try_requeue(self, signum, frame=None):
            self.calls.append(("requeue", signum))

        def checkpoint_and_exit(self, signum, frame=None):
            self.calls.append(("checkpoint", signum))

    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    hand_over_to_submitit(signal.SIGUSR2)  # no submitit handler installed: nothing
    signal.signal(signal.SIGUSR2, Handler().checkpoint_and_try_requeue)
    hand_over_to_submitit(signal.SIGUSR2)
    hand_over_to_submitit(signal.SIGTERM)
    hand_over_to_submitit(None)  # another process was signalled: its own job requeues
    assert Handler.calls == [("requeue", signal.SIGUSR2), ("checkpoint", signal.SIGTERM)]
