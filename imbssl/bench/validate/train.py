"""Check 3, ``train``: a short training run in a subprocess and its accuracy curve."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from imbssl.bench.validate.common import FINISH_RESERVE_S, REPO, Context, failed, passed, skipped
from imbssl.diagnostics.logfile import read_jsonl


@dataclass
class TrainingRun:
    proc: subprocess.Popen
    run_dir: Path
    log: Path
    started: float
    deadline: float
    overrides: list[str]


def start_training(ctx: Context) -> TrainingRun | dict:
    """The train row in a subprocess, until its deadline (SIGINT) or its last iteration."""
    seconds = min(ctx.train_s, ctx.left() - FINISH_RESERVE_S)
    if seconds < 30 and not ctx.dry:
        return skipped(f"time budget: {ctx.left():.0f} s left")
    run_dir, log = ctx.work / "train", ctx.work / "train.log"
    ov = [f"experiment={ctx.train_row}", *ctx.extra, *ctx.shrink(), "trainer.progress=false",
          "trainer.report=false", "trainer.tensorboard=false", f"run_dir={run_dir}",
          "overwrite=true"]
    if ctx.dry:  # 4 iterations, an evaluation every 2, DASO on from step 1
        ov += ["trainer.iterations=4", "trainer.eval_interval=2", "trainer.log_interval=1",
               "trainer.checkpoint_interval=2", "pseudo.warmup_iters=1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with open(log, "w") as f:  # SIGINT back to its default: a background shell ignores it
        proc = subprocess.Popen([sys.executable, "-m", "imbssl", "train", *ov], cwd=REPO,
                                stdout=f, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    now = time.monotonic()
    return TrainingRun(proc, run_dir, log, now, now + seconds, ov)


def accuracy_curve(run_dir: Path) -> dict:
    """Test / validation accuracy per evaluation and the train losses, from metrics.jsonl."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    evals: dict[int, dict] = {}
    for r in rows:
        if r.get("split") in ("test", "valid"):
            e = evals.setdefault(int(r["step"]), {"step": int(r["step"])})
            e[f"{r['split']}_top1"] = r.get("top1")
            e[f"{r['split']}_balanced_acc"] = r.get("balanced_acc")
    train = [{k: v for k, v in r.items() if k == "step" or k.startswith(("loss/", "mask"))}
             for r in rows if r.get("split") == "train"]
    return {"evaluations": [evals[s] for s in sorted(evals)], "train": train}


def finish_training(run: TrainingRun) -> dict:
    """Wait for the deadline (or the end), stop the run, read its curve."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        run.proc.wait(timeout=max(0.0, run.deadline - time.monotonic()))
    stopped = run.proc.poll() is None
    if stopped:
        run.proc.send_signal(signal.SIGINT)  # the trainer writes summary status "stopped"
        for escalate in (run.proc.terminate, run.proc.kill):
            try:
                run.proc.wait(timeout=20)
                break
            except subprocess.TimeoutExpired:
                escalate()
        run.proc.wait()
    wall = time.monotonic() - run.started
    curve = accuracy_curve(run.run_dir)
    summary = {}
    with contextlib.suppress(OSError, json.JSONDecodeError):
        summary = json.loads((run.run_dir / "summary.json").read_text())
    steps = max([int(summary.get("step", 0))] + [t["step"] for t in curve["train"]])
    details = {"overrides": run.overrides, "wall_s": wall, "stopped_at_deadline": stopped,
               "returncode": run.proc.returncode, "steps": steps,
               "its_per_s_wall": steps / wall if wall > 0 else None,
               "summary_status": summary.get("status"), "curve": curve,
               "log_tail": run.log.read_text()[-3000:] if run.log.is_file() else ""}
    if not stopped and run.proc.returncode != 0:
        return failed(f"imbssl train exited with {run.proc.returncode} (see log_tail)",
                      **details)
    if not curve["evaluations"]:
        return failed("no evaluation was logged", **details)
    return passed(**details)
