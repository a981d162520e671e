"""Preemption with several processes (gloo, CPU): a signal that reaches one process stops
every process after the same step, the next log/eval/checkpoint step, where they agree with
one tiny all-reduce; no other step pays a collective (or a host sync) for it, and a
one-process run none at all. (That a two-process run resumes exactly:
tests/distributed/test_ddp_resume.py.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from omegaconf import OmegaConf

from imbssl.engine.checkpoint import list_checkpoints

# slow: multi-process / subprocess training (`pytest -m slow`; CI runs them)
pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
ITERS = 8
FLUSH_STEPS = [3, 4, 6, 8]  # log every 3, evaluate every 4, the last step
OVERRIDES = [f"trainer.iterations={ITERS}", "trainer.batch_size=8", "trainer.log_interval=3",
             "trainer.eval_interval=4", "trainer.checkpoint_interval=8",
             "trainer.progress=false", "trainer.tensorboard=false", "trainer.report=false",
             "device=cpu", "model.norm=group", "algorithm=fixmatch", "algorithm.threshold=0.2",
             "dataset.n1=30", "dataset.m1=60", "pseudo=none"]

# argv: rank, rendezvous file, config, where to write the all-reduce calls, signal (0: none)
WORKER = textwrap.dedent("""
    import json
    import os
    import signal
    import sys

    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from imbssl.engine.distributed import init_group, shutdown

    rank, init, cfg_path, calls_path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    signal_at = int(sys.argv[5])
    torch.set_num_threads(1)
    init_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    from imbssl.engine.trainer import Preempted, Trainer

    trainer = Trainer(OmegaConf.load(cfg_path))
    calls = []  # (step count at the call, the Trainer method it came from)
    # the files that hold the Trainer's methods (the engine is split by concern)
    TRAINER_PARTS = tuple(f"/imbssl/engine/{name}.py" for name in
                          ("trainer", "stops", "periodic", "state", "scalars", "phases"))
    all_reduce = dist.all_reduce

    def counted(*args, **kwargs):
        frame = sys._getframe(1)
        while frame is not None and not frame.f_code.co_filename.endswith(TRAINER_PARTS):
            frame = frame.f_back
        calls.append((trainer.step_count, frame.f_code.co_name if frame else "?"))
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counted
    step_once = trainer.train_step

    def step_and_signal() -> None:
        step_once()
        if rank == 1 and trainer.step_count == signal_at:  # this process only
            os.kill(os.getpid(), signal.SIGUSR1)

    trainer.train_step = step_and_signal
    code = 0
    try:
        trainer.run()
    except Preempted as exc:
        print(exc)
        code = 75
    with open(calls_path, "w") as out:
        json.dump(calls, out)
    shutdown()
    sys.exit(code)
""")


def compose_cfg(run_dir, *extra):
    from hydra.core.global_hydra import GlobalHydra

    from imbssl.cli import compose

    GlobalHydra.instance().clear()
    return compose([*OVERRIDES, f"run_dir={run_dir}", *extra])


def two_processes(tmp_path, name: str, cfg, signal_at: int = 0) -> list[list]:
    """Run ``cfg`` in two processes; return each one's exit code and all-reduce calls."""
    cfg_path = tmp_path / f"{name}.yaml"
    cfg_path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    init = tmp_path / f"rendezvous_{name}"
    calls = [tmp_path / f"{name}_calls{r}.json" for r in range(2)]
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(init), str(cfg_path),
                                 str(calls[r]), str(signal_at)],
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for r in range(2)]
    out = []
    for r, w in enumerate(workers):
        log, _ = w.communicate(timeout=900)
        assert w.returncode in (0, 75), log[-4000:]
        out.append([w.returncode, [tuple(c) for c in json.loads(calls[r].read_text())], log])
    return out


def test_one_process_run_does_no_collective(tiny_cfg, monkeypatch):
    import torch.distributed as dist

    from imbssl.engine.trainer import Trainer

    def refuse(*_args, **_kwargs):
        raise AssertionError("a collective in a one-process run")

    for name in ("all_reduce", "all_gather", "broadcast", "barrier", "all_gather_into_tensor",
                 "broadcast_object_list"):
        monkeypatch.setattr(dist, name, refuse)
    trainer = Trainer(tiny_cfg("trainer.log_interval=1", "trainer.report=false"))
    assert trainer.run()["status"] == "finished" and trainer.step_count == 4


def test_signal_on_one_process_stops_both_at_the_next_flush_step(tmp_path):
    from imbssl.engine.trainer import Trainer

    run = tmp_path / "signalled"
    runs = two_processes(tmp_path, "signalled", compose_cfg(run), signal_at=5)
    for rank, (code, calls, log) in enumerate(runs):
        assert code == 75, log[-3000:]
        stopped_by = "SIGUSR1" if rank == 1 else "a preemption signal"
        assert f"{stopped_by} received: stopped after step 6" in log, log[-3000:]
        # each step's one all-reduce is the gradient's (train_step); the stop flag is agreed
        # at flush steps only, signalled or not (step 5 has none); nothing else between them
        assert sorted(s for s, fn in calls if fn == "train_step") == list(range(6))
        assert [s for s, fn in calls if fn == "_preemption_requested"] == [3, 4, 6]
        # once before training, process 0's run-folder lock is agreed on (``prepare``)
        assert [(s, fn) for s, fn in calls if s not in FLUSH_STEPS and fn != "train_step"
                and (s, fn) != (0, "prepare")] == []
    assert runs[0][1] == runs[1][1]  # the same collectives in the same order
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["step"] == 6
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [6]
    assert torch.load(run / "checkpoints" / "ckpt_00000006.pt",
                      weights_only=True)["world_size"] == 2

    resumed = Trainer(compose_cfg(run, "resume=true"))  # one process continues it
    assert resumed.run()["status"] == "finished" and resumed._resumed_at == 6
    assert resumed.step_count == ITERS
