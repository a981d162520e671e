"""Check 4, ``smoke`` (+ ``sync``): a few steps of every algorithm, the paths the trainer
took and the host syncs of a steady-state step."""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

from imbssl.bench.validate.common import (
    FINISH_RESERVE_S,
    SMOKE_CASE_S,
    SUPERVISED,
    Context,
    error_text,
    failed,
    innermost_frame,
    passed,
    skipped,
)
from imbssl.bench.validate.train import read_jsonl


def smoke_cases(ctx: Context) -> list[tuple[str, list[str], bool]]:
    """(name, overrides, compile) of every smoke run: compile off for all, then on."""
    cases = [(row, [f"experiment={row}"]) for row in ctx.smoke_rows] + [SUPERVISED]
    return [(name, ov, c) for c in ctx.compile_modes for name, ov in cases]


def smoke_overrides(ctx: Context, base: list[str], compile_: bool, run_dir: Path,
                    report: bool) -> list[str]:
    s = ctx.steps
    return [*base, *ctx.extra, *ctx.shrink(), f"trainer.iterations={s}",
            f"trainer.log_interval={max(1, s // 3)}", f"trainer.eval_interval={s}",
            f"trainer.checkpoint_interval={s}", f"trainer.compile={str(compile_).lower()}",
            f"trainer.precision={'auto' if ctx.dry else 'bf16'}", "trainer.progress=false",
            "trainer.tensorboard=true", f"trainer.report={str(report).lower()}",
            f"run_dir={run_dir}", "overwrite=true"]


def with_daso_schedule(ov: list[str], cfg, steps: int) -> list[str]:
    """DASO on from a third of the smoke run, m_hat refreshed every few steps."""
    if str(cfg.pseudo.get("name", "none")) != "daso":
        return ov
    return ov + [f"pseudo.warmup_iters={max(1, steps // 3)}",
                 f"pseudo.dist_window={max(1, steps // 6)}"]


def trainer_paths(trainer) -> dict:
    """What the trainer actually runs on: precision, memory format, optimizer, data."""
    convs = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d)]
    # a weight with one input channel is channels_last-contiguous either way
    conv = next((m for m in convs if m.in_channels > 1), None)
    return {"device": trainer.device.type,
            "precision": str(trainer.precision).replace("torch.", ""),
            "channels_last": bool(conv is not None and conv.weight.is_contiguous(
                memory_format=torch.channels_last)),
            "fused_sgd": bool(trainer.optimizer.defaults.get("fused")),
            "compiled": trainer.forward_model is not trainer.model,
            "data_device": trainer.data.unlabeled.images.device.type}


def path_problems(paths: dict, compile_: bool, dry: bool) -> list[str]:
    want = {"compiled": compile_}
    if not dry:
        want.update(device="cuda", precision="bfloat16", channels_last=True, fused_sgd=True,
                    data_device="cuda")
    return [f"{k}={paths[k]!r}, expected {v!r}" for k, v in want.items() if paths[k] != v]


def run_folder_problems(run_dir: Path, steps: int, report: bool) -> list[str]:
    """What a finished run folder lacks (empty: complete)."""
    from imbssl.engine.run_dir import RUN_FILES

    problems = [f"{n} missing or empty" for n in RUN_FILES
                if not (run_dir / n).is_file() or (run_dir / n).stat().st_size == 0]
    if not (run_dir / "checkpoints" / f"ckpt_{steps:08d}.pt").is_file():
        problems.append(f"checkpoints/ckpt_{steps:08d}.pt missing")
    if not any((run_dir / "tensorboard").glob("events.*")):
        problems.append("tensorboard/ holds no events file")
    if report and not all((run_dir / f"report.{e}").is_file() for e in ("html", "md")):
        problems.append("report.html / report.md missing")
    with contextlib.suppress(OSError, json.JSONDecodeError):
        summary = json.loads((run_dir / "summary.json").read_text())
        if summary.get("status") != "finished" or summary.get("step") != steps:
            problems.append(f"summary.json: status {summary.get('status')!r} at step "
                            f"{summary.get('step')}, expected 'finished' at {steps}")
    rows = read_jsonl(run_dir / "metrics.jsonl")
    if not any(r.get("split") == "test" and r.get("step") == steps for r in rows):
        problems.append(f"metrics.jsonl has no test evaluation at step {steps}")
    return problems


def loss_problems(run_dir: Path) -> tuple[int, list[str]]:
    """Train rows in metrics.jsonl, and every loss value that is missing or not finite."""
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("split") == "train"]
    bad = [f"{k}={v} at step {r['step']}" for r in rows for k, v in r.items()
           if k.startswith("loss/") and not (isinstance(v, int | float) and math.isfinite(v))]
    if not rows:
        bad.append("no train row logged")
    return len(rows), bad


def sync_site(stack, fallback: str) -> str:
    """The innermost imbssl line of a stack, and the innermost other line if it is deeper."""
    frames = [f for f in stack if not f.filename.endswith("warnings.py")]
    ours = innermost_frame(frames) or fallback
    last = frames[-1] if frames else None
    if last is None or "/imbssl/" in last.filename:
        return ours
    return f"{ours} (via {Path(last.filename).name}:{last.lineno} in {last.name})"


def check_sync(trainer, steps: int) -> dict:
    """Host syncs in steady-state steps: ``steps`` under sync debug mode "warn" (every sync
    and the line that made it), then ``steps`` under "error" (the first one raises)."""
    if trainer.device.type != "cuda":
        return skipped("CPU: torch.cuda.set_sync_debug_mode needs CUDA")
    sites: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            sites[sync_site(traceback.extract_stack()[:-1], f"{filename}:{lineno}")] += 1

    torch.cuda.synchronize(trainer.device)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                trainer.train_step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    error = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            trainer.train_step()
    except RuntimeError as exc:
        error = f"{error_text(exc)} at {sync_site(traceback.extract_tb(exc.__traceback__), '?')}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize(trainer.device)  # our own sync (the debug mode would flag it)
    details = {"steps_warn": steps, "steps_error": steps, "sync_sites": dict(sites)}
    if sites or error:
        return failed(error or f"{sum(sites.values())} host syncs", **details)
    return passed(**details)


def dynamo_counts() -> Counter:
    """Graphs compiled and graph breaks so far in this process (torch._dynamo's counters)."""
    from torch._dynamo.utils import counters

    return Counter({"graphs": counters["stats"]["unique_graphs"],
                    "graph_breaks": sum(counters["graph_break"].values())})


def run_smoke_case(ctx: Context, name: str, base: list[str], compile_: bool,
                   report: bool) -> dict:
    from imbssl.engine.config import compose
    from imbssl.engine.trainer import Trainer

    if compile_:  # every case compiles afresh, as its own process would (no cache limit hit)
        torch._dynamo.reset()
    before = dynamo_counts()

    run_dir = ctx.work / "smoke" / f"{name}-compile_{'on' if compile_ else 'off'}"
    result = {"case": name, "compile": compile_, "run_dir": str(run_dir.relative_to(ctx.work))}
    start = time.perf_counter()
    trainer = None
    try:
        ov = smoke_overrides(ctx, base, compile_, run_dir, report)
        ov = with_daso_schedule(ov, compose(ov), ctx.steps)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir.parent / f"{run_dir.name}.log", "w") as log, \
                contextlib.redirect_stdout(log):
            trainer = Trainer(compose(ov))
            trainer.prepare()
            trainer.run()
        result["run_s"] = time.perf_counter() - start
        result["paths"] = paths = trainer_paths(trainer)
        if compile_:
            result["dynamo"] = dict(dynamo_counts() - before) or {"graphs": 0}
        train_rows, losses = loss_problems(run_dir)
        problems = (path_problems(paths, compile_, ctx.dry) + losses
                    + run_folder_problems(run_dir, ctx.steps, report))
        result.update(train_rows=train_rows, problems=problems)
        result["sync"] = sync = check_sync(trainer, ctx.sync_steps)
        if problems:
            return {**failed("; ".join(problems[:3])), **result}
        if sync["status"] == "failed":
            return {**failed(f"host sync: {sync['error']}"), **result}
        return {**passed(), **result}
    except Exception as exc:  # noqa: BLE001 - one failing case must not stop the others
        return {**failed(error_text(exc)), **result, "run_s": time.perf_counter() - start,
                "traceback": traceback.format_exc()[-4000:]}
    finally:
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_smoke(ctx: Context) -> dict:
    """Every smoke case the budget leaves time for (compile off first, then on)."""
    cases, results, not_run = smoke_cases(ctx), [], []
    need = SMOKE_CASE_S["dry" if ctx.dry else "gpu"]
    for i, (name, base, compile_) in enumerate(cases):
        if ctx.left() - FINISH_RESERVE_S < need:
            not_run.append(f"{name} compile={'on' if compile_ else 'off'}")
            continue
        print(f"validate: smoke {name} compile={compile_}", file=sys.stderr, flush=True)
        results.append(run_smoke_case(ctx, name, base, compile_, report=i == 0))
    not_run_reason = ({"compile on": "dry run: torch.compile is validated on CUDA"}
                      if ctx.dry else {})
    counts = Counter(r["status"] for r in results)
    details = {"cases": results, "not_run_time_budget": not_run,
               "skipped": not_run_reason, "counts": dict(counts)}
    if counts.get("failed"):
        return failed(f"{counts['failed']} of {len(results)} smoke runs failed", **details)
    if not results:
        return skipped("time budget: no smoke case could start", **details)
    return passed(**details)
