"""The side-by-side matrix of issue 31, run one job at a time, resumably.

    python analysis/official_daso_queue.py --official /path/to/daso-checkout     # run it
    python analysis/official_daso_queue.py --list                                # states

Uniform CIFAR-10-LT (gamma_l 100, gamma_u 1, N1 1500, M1 3000) at the mini protocol, FixMatch
and FixMatch + DASO, seeds 0, 1, 2, each trained by the official DASO code
(analysis/official_daso_run.py) and by imbssl (``imbssl train`` with
``dataset.split_protocol=official_daso``, so both see the same images). Order: the four runs
of seed 0 (FixMatch by both codes, then FixMatch + DASO by both), then seed 1, then seed 2,
so that each finished pair compares one method on one seed.

One training process at a time by default (``--parallel 2``: a method's official and imbssl
run of one seed together), each on one thread (OMP_NUM_THREADS=1; the official runner also
calls torch.set_num_threads(1)), so that the seconds per iteration of the two codes compare. A
finished run (summary.json status "finished") is skipped; an interrupted one resumes from its
checkpoint (imbssl ``resume=true``; the official runner resumes by itself). A lock file in the
runs folder refuses a second queue. A failed job is logged and retried after the others, at
most ``--attempts`` times per invocation.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "analysis/results/official_side_by_side_runs"
IMBSSL_ROWS = {"fixmatch": "mini/cifar10_lt_g100_n1500_uniform_fixmatch",
               "fixmatch_daso": "mini/cifar10_lt_g100_n1500_uniform_fixmatch_daso"}


@dataclass(frozen=True)
class Job:
    code: str  # official | imbssl
    method: str  # fixmatch | fixmatch_daso
    seed: int

    @property
    def name(self) -> str:
        return f"{self.code}-{self.method}-seed{self.seed}"


def matrix() -> list[Job]:
    return [Job(code, method, seed) for seed in (0, 1, 2)
            for method in ("fixmatch", "fixmatch_daso") for code in ("imbssl", "official")]


def run_state(run_dir: Path) -> str:
    """missing | finished | resumable | broken."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    if summary is not None and summary.get("status") == "finished":
        return "finished"
    if not run_dir.exists():
        return "missing"
    if any((run_dir / "checkpoints").glob("*.pt*")):
        return "resumable"
    return "broken"


def _relative(path: Path) -> str:
    """``path`` relative to the repository when inside it (no machine paths in run records)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def command(job: Job, run_dir: Path, official: Path | None) -> list[str]:
    state = run_state(run_dir)
    run_dir = Path(_relative(run_dir))
    if job.code == "imbssl":
        cmd = [sys.executable, "-m", "imbssl", "train", f"experiment={IMBSSL_ROWS[job.method]}",
               f"seed={job.seed}", f"run_dir={run_dir}", "dataset.split_protocol=official_daso",
               "trainer.progress=false", "trainer.report=false"]
        return cmd + (["resume=true"] if state == "resumable" else
                      ["overwrite=true"] if state == "broken" else [])
    if official is None:
        raise SystemExit("error: --official PATH (a checkout of ytaek-oh/daso) is needed "
                         "for the official runs")
    return [sys.executable, str(ROOT / "analysis/official_daso_run.py"), "--official",
            str(official), "--method", job.method, "--seed", str(job.seed),
            "--run-dir", str(run_dir)]


def record_timing(path: Path, t0: float, usage, rc: int) -> None:
    """One line per attempt: wall seconds and the process's CPU seconds (user + system), so
    that the two codes' cost per iteration compares as CPU time on a shared machine."""
    row = {"start": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t0)),
           "wall_s": round(time.time() - t0, 2), "user_s": round(usage.ru_utime, 2),
           "sys_s": round(usage.ru_stime, 2), "exit": rc}
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def start_job(job: Job, runs: Path, official: Path | None) -> tuple[subprocess.Popen, float]:
    run_dir = runs / job.name
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT))
    log = runs / f"{job.name}.log"
    print(f"[{time.strftime('%H:%M:%S')}] {job.name}: {run_state(run_dir)} -> training",
          flush=True)
    with open(log, "a") as fh:
        proc = subprocess.Popen(command(job, run_dir, official), cwd=ROOT, env=env, stdout=fh,
                                stderr=subprocess.STDOUT)
    return proc, time.time()


def finish_job(job: Job, runs: Path, t0: float, status: int, usage) -> int:
    rc = os.waitstatus_to_exitcode(status)
    record_timing(runs / f"{job.name}.timing.jsonl", t0, usage, rc)
    print(f"[{time.strftime('%H:%M:%S')}] {job.name}: exit {rc} after "
          f"{(time.time() - t0) / 60:.1f} min (log {runs / f'{job.name}.log'})", flush=True)
    return rc


def run_jobs(jobs: list[Job], runs: Path, official: Path | None, parallel: int,
             attempts: int) -> None:
    """Keep up to ``parallel`` jobs training, in matrix order; with 2, the official and the
    imbssl run of one method and seed train at the same time, each on one thread, so their
    seconds per iteration compare under the same load."""
    tries = {j: 0 for j in jobs}
    running: dict[int, tuple[Job, float, subprocess.Popen]] = {}  # kept: a dropped
    # Popen object would be reaped by the next Popen's cleanup, and wait4 would miss it
    while True:
        busy = {job for job, _, _ in running.values()}
        todo = [j for j in jobs if j not in busy and run_state(runs / j.name) != "finished"
                and tries[j] < attempts]
        while todo and len(running) < parallel:
            job = todo.pop(0)
            tries[job] += 1
            proc, t0 = start_job(job, runs, official)
            running[proc.pid] = (job, t0, proc)
        if not running:
            return
        pid, status, usage = os.wait4(-1, 0)
        if pid in running:
            job, t0, proc = running.pop(pid)
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
            finish_job(job, runs, t0, status, usage)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", type=Path, default=None, help="checkout of ytaek-oh/daso")
    p.add_argument("--runs", type=Path, default=RUNS)
    p.add_argument("--list", action="store_true")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="only the jobs whose name contains NAME (repeatable)")
    p.add_argument("--attempts", type=int, default=2)
    p.add_argument("--parallel", type=int, default=1,
                   help="jobs training at once, each on one thread (2: a method's official "
                        "and imbssl run of one seed side by side)")
    args = p.parse_args(argv)
    jobs = [j for j in matrix() if not args.only or any(o in j.name for o in args.only)]
    if args.list:
        for j in jobs:
            print(f"{run_state(args.runs / j.name):10s} {j.name}")
        return 0
    args.runs.mkdir(parents=True, exist_ok=True)
    lock = open(args.runs / "queue.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print("error: another queue holds the lock of this runs folder", file=sys.stderr)
        return 2
    run_jobs(jobs, args.runs, args.official, args.parallel, args.attempts)
    left = [j.name for j in jobs if run_state(args.runs / j.name) != "finished"]
    print(f"done; unfinished: {', '.join(left) or 'none'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
