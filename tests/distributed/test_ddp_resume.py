"""Multi-process resume: a two-process run (gloo, CPU) stopped after a checkpoint and resumed
with two processes ends with the same weights, EMA, optimizer and DASO state as the
uninterrupted two-process run (exactly), and resumed with one process, the same to float
rounding (the all-reduced gradient is summed in another order).

"Stopped after a checkpoint" is the run folder as a kill after the step-4 checkpoint leaves
it: the uninterrupted run's folder without the later checkpoint (resume drops the log rows
logged after step 4).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import torch
from omegaconf import OmegaConf

from imbssl.engine.checkpoint import state_differences as differences

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
    import sys

    import torch
    from omegaconf import OmegaConf

    from imbssl.engine.distributed import init_group, shutdown

    rank, init, cfg_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    init_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    from imbssl.engine.trainer import Trainer

    Trainer(OmegaConf.load(cfg_path)).run()
    shutdown()
""")


def compose_cfg(run_dir, *extra):
    from hydra.core.global_hydra import GlobalHydra

    from imbssl.cli import compose

    GlobalHydra.instance().clear()
    return compose([*OVERRIDES, f"run_dir={run_dir}", *extra])


def two_processes(tmp_path, name: str, cfg) -> None:
    cfg_path = tmp_path / f"{name}.yaml"
    cfg_path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    init = tmp_path / f"rendezvous_{name}"
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), str(init), str(cfg_path)],
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for r in range(2)]
    for w in workers:
        out, _ = w.communicate(timeout=900)
        assert w.returncode == 0, out[-4000:]


def final_state(run):
    return torch.load(run / "checkpoints" / f"ckpt_{ITERS:08d}.pt", weights_only=True)


def test_two_process_run_resumes_with_two_and_with_one_process(tmp_path):
    from imbssl.engine.trainer import Trainer

    ref = tmp_path / "ref"
    two_processes(tmp_path, "ref", compose_cfg(ref))
    expected = final_state(ref)
    assert expected["world_size"] == 2

    stopped = tmp_path / "stopped"
    shutil.copytree(ref, stopped)
    (stopped / "checkpoints" / f"ckpt_{ITERS:08d}.pt").unlink()
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["ckpt_00000004.pt"]
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
