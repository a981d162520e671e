"""Multi-process resume: a two-process run (gloo, CPU) killed with SIGKILL after its step-4
checkpoint and resumed with two processes ends with the same weights, EMA, optimizer and DASO
state as the uninterrupted two-process run (exactly), and resumed with one process, the same
to float rounding (the all-reduced gradient is summed in another order).

The killed run's workers hold after step 6 (its log row written, the step-8 checkpoint not)
until both are killed, so the kill lands at a known point; resume drops the rows logged
after step 4.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from omegaconf import OmegaConf

from imbssl.engine.checkpoint import state_differences as differences

# slow: multi-process / subprocess training (`pytest -m slow`; CI runs them)
pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
ITERS = 8
OVERRIDES = [f"trainer.iterations={ITERS}", "trainer.batch_size=8", "trainer.log_interval=2",
             "trainer.eval_interval=4", "trainer.checkpoint_interval=4",
             "trainer.keep_checkpoints=3", "trainer.progress=false",
             "trainer.tensorboard=false", "trainer.report=false", "device=cpu",
             "model.norm=group", "algorithm=fixmatch", "algorithm.threshold=0.2",
             "dataset.n1=30", "dataset.m1=60", "pseudo=daso", "pseudo.warmup_iters=2",
             "pseudo.dist_window=3", "pseudo.queue_size=4"]

WORKER = textwrap.dedent("""
    import pathlib
    import sys
    import time

    import torch
    from omegaconf import OmegaConf

    from imbssl.engine.distributed import init_group, shutdown

    rank, init, cfg_path, hold_at = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(1)
    init_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    from imbssl.engine.trainer import Trainer

    trainer = Trainer(OmegaConf.load(cfg_path))
    asked = trainer._preemption_requested  # the loop asks it after each step's periodic work

    def hold_after_periodic_work() -> bool:  # wait to be killed after step hold_at
        if trainer.step_count == hold_at:
            pathlib.Path(f"{cfg_path}.held{rank}").touch()
            time.sleep(3600)
        return asked()

    trainer._preemption_requested = hold_after_periodic_work
    trainer.run()
    shutdown()
""")


def compose_cfg(run_dir, *extra):
    from hydra.core.global_hydra import GlobalHydra

    from imbssl.cli import compose

    GlobalHydra.instance().clear()
    return compose([*OVERRIDES, f"run_dir={run_dir}", *extra])


def start_two_processes(tmp_path, name: str, cfg, hold_at: int = 0) -> list[subprocess.Popen]:
    cfg_path = tmp_path / f"{name}.yaml"
    cfg_path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    init = tmp_path / f"rendezvous_{name}"
    return [subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(init), str(cfg_path),
                              str(hold_at)], env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for r in range(2)]


def finish(workers: list[subprocess.Popen]) -> None:
    for w in workers:
        out, _ = w.communicate(timeout=900)
        assert w.returncode == 0, out[-4000:]


def two_processes(tmp_path, name: str, cfg) -> None:
    finish(start_two_processes(tmp_path, name, cfg))


def kill_when_held(tmp_path, name: str, workers: list[subprocess.Popen]) -> None:
    """SIGKILL both workers once both hold (they never exit on their own then)."""
    held = [tmp_path / f"{name}.yaml.held{r}" for r in range(2)]
    deadline = time.monotonic() + 900
    while not all(h.exists() for h in held) and time.monotonic() < deadline:
        if any(w.poll() is not None for w in workers):
            break
        time.sleep(0.05)
    for w in workers:
        w.send_signal(signal.SIGKILL)
    outs = [w.communicate(timeout=60)[0] for w in workers]
    assert all(h.exists() for h in held), "\n".join(o[-3000:] for o in outs)
    assert [w.returncode for w in workers] == [-signal.SIGKILL] * 2


def final_state(run):
    return torch.load(run / "checkpoints" / f"ckpt_{ITERS:08d}.pt", weights_only=True)


def test_two_process_run_killed_resumes_with_two_and_with_one_process(tmp_path):
    from imbssl.engine.trainer import Trainer

    ref, stopped = tmp_path / "ref", tmp_path / "stopped"
    reference = start_two_processes(tmp_path, "ref", compose_cfg(ref))
    killed = start_two_processes(tmp_path, "killed", compose_cfg(stopped), hold_at=6)
    kill_when_held(tmp_path, "killed", killed)
    finish(reference)
    expected = final_state(ref)
    assert expected["world_size"] == 2

    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["ckpt_00000004.pt"]
    assert '"step": 6' in (stopped / "metrics.jsonl").read_text()  # logged after the checkpoint
    as_one = tmp_path / "as_one"
    shutil.copytree(stopped, as_one)

    two_processes(tmp_path, "resume2", compose_cfg(stopped, "resume=true"))
    resumed2 = final_state(stopped)
    assert differences(expected, resumed2) == []
    assert (ref / "metrics.jsonl").read_bytes() == (stopped / "metrics.jsonl").read_bytes()

    resumed1 = Trainer(compose_cfg(as_one, "resume=true"))
    assert resumed1.run()["status"] == "finished" and resumed1._resumed_at == 4
    got = final_state(as_one)
    assert got["world_size"] == 1 and got["step"] == ITERS
    for part in ("model", "ema", "algorithm"):
        for key, value in expected[part].items():
            torch.testing.assert_close(got[part][key], value, rtol=1e-4, atol=1e-5,
                                       msg=f"{part}/{key}")
    assert differences(got["labeled_stream"], expected["labeled_stream"]) == []
