"""The whole run: every check in order within the budget, and the environment."""
from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback
from collections import Counter

import torch

from imbssl.bench.validate.aug import check_aug
from imbssl.bench.validate.bench import run_bench
from imbssl.bench.validate.common import (
    DEVICE_DIR,
    REPO,
    Context,
    error_text,
    failed,
    passed,
    skipped,
)
from imbssl.bench.validate.output import write_results
from imbssl.bench.validate.smoke import run_smoke
from imbssl.bench.validate.train import TrainingRun, finish_training, start_training


def environment(ctx: Context) -> dict:
    from imbssl.engine.run_dir import git_commit

    env = {"torch": torch.__version__, "python": sys.version.split()[0],
           "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
           "device": "cpu" if ctx.dry or not torch.cuda.is_available()
           else torch.cuda.get_device_name(0), **git_commit()}
    if torch.cuda.is_available():
        env["cudnn"] = torch.backends.cudnn.version()
    prepared = REPO / DEVICE_DIR / "source.json"  # the device copy has no .git
    if env["git_commit"] == "unknown" and prepared.is_file():
        env["commit_at_prep"] = json.loads(prepared.read_text())
    return env


def run_all(ctx: Context) -> dict:
    """Every item in order, the results file rewritten after each; returns the results."""
    results = {"tool": "imbssl.bench.validate", "mode": "dry-run" if ctx.dry else "gpu",
               "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "budget_s": ctx.budget_s, "command": sys.argv, "environment": environment(ctx),
               "settings": {"steps": ctx.steps, "sync_steps": ctx.sync_steps,
                            "bench_rows": ctx.bench_rows, "train_row": ctx.train_row,
                            "smoke_rows": ctx.smoke_rows, "precisions": ctx.precisions,
                            "extra_overrides": ctx.extra, "train_s": ctx.train_s},
               "items": {}}
    items = results["items"]

    def record(name: str, fn) -> None:
        if name not in ctx.only:
            items[name] = skipped("not in --only")
        else:
            print(f"validate: {name} ...", file=sys.stderr, flush=True)
            try:
                items[name] = fn()
            except Exception as exc:  # noqa: BLE001 - record it, go on with the next item
                items[name] = failed(error_text(exc), traceback=traceback.format_exc()[-4000:])
        write_results(ctx, results)

    record("aug", lambda: check_aug(ctx))
    record("bench", lambda: run_bench(ctx))
    training = start_training(ctx) if "train" in ctx.only else skipped("not in --only")
    record("smoke", lambda: run_smoke(ctx))
    record("sync", lambda: summarize_sync(items.get("smoke", {})))
    record("train", lambda: finish_training(training) if isinstance(training, TrainingRun)
           else training)
    items["nccl_syncbn"] = skipped("NCCL all-reduce and SyncBatchNorm need 2 GPUs or more; "
                                   "this machine has one (tests/distributed covers gloo)")
    results["seconds"] = time.monotonic() - ctx.started
    results["failed"] = sorted(k for k, v in items.items() if v["status"] == "failed")
    results["skipped"] = skipped_list(ctx, items)
    write_results(ctx, results)
    return results


def summarize_sync(smoke: dict) -> dict:
    """The sync checks of the smoke runs in one item."""
    cases = [c for c in smoke.get("cases", []) if "sync" in c]
    if not cases:
        return skipped("no smoke run reached its sync check")
    states = Counter(c["sync"]["status"] for c in cases)
    if states.get("passed", 0) == 0 and states.get("failed", 0) == 0:
        return skipped(cases[0]["sync"]["reason"], checked=0)
    sites: Counter = Counter()
    for c in cases:
        sites.update(c["sync"].get("sync_sites", {}))
    bad = [f"{c['case']} compile={c['compile']}" for c in cases
           if c["sync"]["status"] == "failed"]
    details = {"checked": len(cases), "sync_sites": dict(sites), "failed_cases": bad}
    return failed(f"host syncs in {len(bad)} case(s)", **details) if bad else passed(**details)


def skipped_list(ctx: Context, items: dict) -> list[str]:
    """Every check that did not run, with its reason."""
    out = [f"{k}: {v['reason']}" for k, v in items.items() if v["status"] == "skipped"]
    smoke = items.get("smoke", {})
    out += [f"smoke {c}: time budget" for c in smoke.get("not_run_time_budget", [])]
    out += [f"smoke {k}: {v}" for k, v in smoke.get("skipped", {}).items()]
    if ctx.dry:
        out += ["bench: MFU (no peak FLOP/s on a CPU)",
                "smoke: bf16 / channels_last / fused SGD / CUDA-resident data expectations "
                "(CPU run)"]
    return out
