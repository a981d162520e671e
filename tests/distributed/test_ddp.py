"""Two processes (gloo, CPU) train exactly what one process trains with the same global
batch: the same per-step losses, evaluations, DASO state and final weights (to float
rounding), for FixMatch and FixMatch+DASO. The model uses GroupNorm (``model.norm=group``):
its statistics do not depend on how the batch is split, and SyncBatchNorm does not run on
the CPU.

``test_two_processes_match_one`` starts two worker processes joined through a file
(``init_method=file://``) and runs both configurations in them; ``test_torchrun_cli`` runs
the real command line under ``torchrun``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

# slow: multi-process / subprocess training (`pytest -m slow`; CI runs them)
pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
ITERS = 8
COMMON = [f"trainer.iterations={ITERS}", "trainer.batch_size=8", "trainer.log_interval=1",
          "trainer.eval_interval=4", "trainer.checkpoint_interval=4", "trainer.progress=false",
          "trainer.tensorboard=false", "trainer.report=false", "device=cpu",
          "model.norm=group", "algorithm=fixmatch", "algorithm.threshold=0.2",
          "dataset.n1=30", "dataset.m1=60"]
CONFIGS = {
    # distribution alignment over a 3-batch window (its batch mean is all-reduced)
    "fixmatch": ["pseudo=none", "algorithm.dist_align=labeled", "algorithm.dist_align_window=3"],
    # DASO active from step 2; m_hat over 3-step windows; small queues that wrap
    "fixmatch_daso": ["pseudo=daso", "pseudo.warmup_iters=2", "pseudo.dist_window=3",
                      "pseudo.queue_size=4"],
}


# CTAugment: each process probes its share; the bin-weight updates are all-gathered
CONFIGS["fixmatch_cta"] = ["pseudo=none", "algorithm.strong_augment=ctaugment"]
# the labeled memory bank is cross-process state (gathered before every write)
CONFIGS["simmatch"] = ["algorithm=simmatch", "pseudo=none", "algorithm.dist_align_window=3"]

WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path

    import torch
    from omegaconf import OmegaConf

    from imbssl.engine.distributed import init_group, shutdown

    rank, world, init, cfg_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]

    torch.set_num_threads(1)
    init_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    from imbssl.engine.trainer import Trainer

    for path in sorted(Path(cfg_dir).glob("*.yaml")):
        Trainer(OmegaConf.load(path)).run()
    shutdown()
""")


def compose_cfg(name: str, run_dir: Path):
    from hydra.core.global_hydra import GlobalHydra

    from imbssl.cli import compose

    GlobalHydra.instance().clear()
    return compose([*COMMON, *CONFIGS[name], f"run_dir={run_dir}"])


def rows(run: Path, split: str) -> dict[int, dict]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["split"] == split:
            out[row["step"]] = row
    return out


def assert_same_run(single: Path, multi: Path) -> None:
    """Losses per step, evaluations, final weights and refiner state agree."""
    lines_single = (single / "metrics.jsonl").read_text().splitlines()
    lines_multi = (multi / "metrics.jsonl").read_text().splitlines()
    assert len(lines_single) == len(lines_multi)  # one writer: no duplicated rows
    train_s, train_m = rows(single, "train"), rows(multi, "train")
    assert sorted(train_s) == sorted(train_m) == list(range(1, ITERS + 1))
    for step, row in train_s.items():
        assert set(row) == set(train_m[step])
        for key, value in row.items():
            if key != "split":
                assert train_m[step][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (step, key)
    if "fixmatch" in single.name:  # the unlabeled loss is in play
        assert any(r["mask/ratio"] > 0 for r in train_s.values())
    for step, row in rows(single, "test").items():
        assert rows(multi, "test")[step]["top1"] == pytest.approx(row["top1"], abs=0.005)
    for step, row in rows(single, "pseudo").items():  # tracker counts summed over processes
        other = rows(multi, "pseudo")[step]
        assert other["pseudo/final/all/count"] == row["pseudo/final/all/count"]
    final = f"checkpoints/ckpt_{ITERS:08d}.pt"
    a = torch.load(single / final, weights_only=True)
    b = torch.load(multi / final, weights_only=True)
    assert b["world_size"] == 2 and a["world_size"] == 1
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    for key, value in a["algorithm"].items():  # DASO queues, pointers, m_hat, window
        torch.testing.assert_close(b["algorithm"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert a["labeled_stream"]["position"] == b["labeled_stream"]["position"]


def test_two_processes_match_one(tmp_path):
    from imbssl.engine.trainer import Trainer

    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    for name in CONFIGS:
        cfg = compose_cfg(name, tmp_path / f"{name}_ddp")
        (cfg_dir / f"{name}.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    init = tmp_path / "rendezvous"
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), "2", str(init),
                                 str(cfg_dir)], env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for name in CONFIGS:  # the one-process runs, meanwhile
        Trainer(compose_cfg(name, tmp_path / f"{name}_single")).run()
    for w in workers:
        out, _ = w.communicate(timeout=300)
        assert w.returncode == 0, out[-4000:]
    for name in CONFIGS:
        assert_same_run(tmp_path / f"{name}_single", tmp_path / f"{name}_ddp")


def test_torchrun_cli(tmp_path):
    """``torchrun --nproc_per_node=2 -m imbssl train``: process 0 alone writes the run folder
    (Hydra's files included), and the run equals a one-process run."""
    from imbssl.engine.trainer import Trainer

    name = "fixmatch_daso"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "imbssl", "train", *COMMON, *CONFIGS[name], f"run_dir={tmp_path / 'ddp'}"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    Trainer(compose_cfg(name, tmp_path / "single")).run()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    assert out.count("final test balanced accuracy") == 1  # printed by process 0 only
    assert (tmp_path / "ddp" / ".hydra" / "config.yaml").is_file()
    meta = json.loads((tmp_path / "ddp" / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert_same_run(tmp_path / "single", tmp_path / "ddp")


SHUTDOWN_WORKER = textwrap.dedent("""
    import os
    import time

    import torch

    from imbssl.engine import distributed as ddp

    def threads():
        return len(os.listdir("/proc/self/task"))

    before = threads()
    assert ddp.init_from_env("cpu")
    import torch._dynamo  # noqa: F401  (a lazy import that used to pin the default group)

    x = torch.ones(3)
    ddp.all_gather_cat(x)
    ddp.all_reduce_sum(x)
    ddp.shutdown()
    deadline = time.monotonic() + 5.0  # a thread that was joined may take a moment to vanish
    while threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    print("threads", before, threads())
""")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_shutdown_joins_the_gloo_threads(tmp_path):
    """After ``shutdown`` no gloo worker thread is left: one left alive at interpreter exit
    can abort the process (SIGABRT) while it drops its last collective."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**ENV, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, "-c", SHUTDOWN_WORKER],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out[-3000:]
        before, after = (int(v) for v in out.split("threads")[-1].split())
        assert after == before, out[-3000:]
