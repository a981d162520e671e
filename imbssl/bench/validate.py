"""GPU validation in one command: every CUDA path, the speed and a short accuracy curve.

    bash analysis/gpu_validate.sh --prep      # here: wheels + CIFAR-10 into .device/ (ignored)
    bash analysis/gpu_validate.sh             # on the GPU machine (BENCHMARKS.md: the run call)
    bash analysis/gpu_validate.sh --dry-run   # CPU: tiny model, 2 steps (tests/bench/)

``python -m imbssl.bench.validate run`` checks, in this order, and rewrites
``gpu_validate.json`` and ``gpu_validate.md`` in ``--out`` after each item:

1. ``aug``: the CUDA augmentation equals the CPU one. A CPU generator draws every random
   choice of a weak and a strong view (flip, crop, 2 RandAugment ops with level, sign and
   p = 0.5, Cutout) exactly as ``Augmenter.strong_u8`` draws them, and ``replay_strong``
   applies them with the augmentation's own ops on the CPU and on CUDA. The CPU replay must
   equal ``Augmenter.strong_u8`` bit for bit (so the replay is the implementation); the CUDA
   result must equal the CPU one bit for bit for the weak view and the LUT ops, and differ in
   at most ``AUG_TOLERANCE`` of the strong views' pixels (nearest-neighbour sampling of
   rotate / shear at pixel boundaries where the two devices round ``affine_grid``
   differently). The draws themselves differ by design: each device has its own generator.
2. ``bench``: ``imbssl bench --experiments`` for the bench rows (default WRN-28-2 FixMatch and
   FixMatch+DASO, DASO's batch: 64 labeled + 128 unlabeled x 2 views) in each of
   ``--precisions`` (fp32 and bf16), compiled like ``trainer=daso_protocol``: it/s, MFU and
   the 250k-iteration time; the DataLoader + PIL pipeline beside it at bf16.
3. ``train``: the train row (FixMatch+DASO, CIFAR-10-LT) for ``--train-s`` seconds in a
   subprocess (``imbssl train experiment=ROW``, stopped with SIGINT), its accuracy curve
   read from ``metrics.jsonl``. It runs while item 4 runs (the GPU is shared: its it/s is
   not a speed figure); it gets the time the budget leaves, at most ``--train-s``.
4. ``smoke``: ``--steps`` (30) steps of every algorithm, alone and with DASO (the smoke
   rows, and the supervised baseline), bf16, channels_last, fused SGD, data on the device,
   ``torch.compile`` off, then on: finite losses, a complete run folder, and the paths the
   trainer took. After each run, ``sync``: ``--sync-steps`` more steady-state steps under
   ``torch.cuda.set_sync_debug_mode("warn")`` (every host sync, with its line) and as many
   under ``"error"``; the step passes when neither finds a sync.
5. ``nccl_syncbn``: NCCL all-reduce and SyncBatchNorm need two GPUs or more; one is lent, so
   it is listed as skipped.

``--dry-run`` runs the same code on the CPU (digits-LT, the small CNN, 2 steps); the CUDA-only
checks (CUDA augmentation, compile on, sync, bf16/channels_last/fused expectations, MFU) are
skipped and listed as skipped. ``--budget-s`` bounds the whole command (the device tool's
call is 10 minutes at most); an item the budget cannot fit is skipped, not cut short, except
the training run, which is shortened. Exit code 0 when no item failed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SETTING = "cifar10_lt_g100_n1500"  # DASO Table 1: CIFAR-10-LT, gamma 100, N1 1500, M1 3000
BENCH_ROWS = (f"{SETTING}_fixmatch", f"{SETTING}_fixmatch_daso")
TRAIN_ROW = f"{SETTING}_fixmatch_daso"
SMOKE_ROWS = tuple(f"{SETTING}_{algo}{daso}" for algo in ("fixmatch", "mixmatch", "remixmatch",
                                                         "simmatch") for daso in ("", "_daso"))
SUPERVISED = ("supervised", ["dataset=cifar10_lt", "model=wrn28_2", "algorithm=supervised",
                             "pseudo=none", "trainer=daso_protocol"])
# issue 21: the GPU script reports fp32 and bf16 (imbssl/engine/trainer.py: auto|bf16|fp16|fp32)
PRECISIONS = ("fp32", "bf16")
AUG_TOLERANCE = 1e-3  # strong views: at most this fraction of pixels may differ CPU vs CUDA
AUG_IMAGES = 512
# what the device tool carries (tracked files + .device/) and its limit
CARRY_LIMIT_MIB = 64
DEVICE_DIR = ".device"
WHEELS = ("hydra_core", "omegaconf", "antlr4")
SHARED = Path("/work/shared")
# the CPU dry run: digits-LT, the small CNN, a batch of 8 (overrides appended to every case)
DRY_RUN_OVERRIDES = ["dataset=digits_lt", "dataset.n1=30", "dataset.m1=90",
                     "dataset.gamma_l=10", "dataset.gamma_u=10", "model=small_cnn",
                     "trainer.batch_size=8", "trainer.compile=false", "device=cpu"]
GPU = {"steps": 30, "sync_steps": 3, "bench_iters": 50, "bench_warmup": 20, "train_s": 300,
       "budget_s": 420}
DRY = {"steps": 2, "sync_steps": 1, "bench_iters": 2, "bench_warmup": 1, "train_s": 120,
       "budget_s": 900}
SMOKE_CASE_S = {"gpu": 25.0, "dry": 0.0}  # start a smoke case only with this much time left
BENCH_RESERVE_S = 200.0  # start the bench only with this much budget left (GPU)
FINISH_RESERVE_S = 15.0  # kept for writing the results


# ----------------------------------------------------------------------------- results

def passed(**details) -> dict:
    return {"status": "passed", **details}


def failed(error: str, **details) -> dict:
    return {"status": "failed", "error": error, **details}


def skipped(reason: str, **details) -> dict:
    return {"status": "skipped", "reason": reason, **details}


def error_text(exc: BaseException) -> str:
    """The exception in one line: type, first line of the message."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:500]


def innermost_frame(tb_or_stack, package: str = "imbssl") -> str | None:
    """'path:line in function' of the innermost frame inside ``package`` (else the last)."""
    frames = list(tb_or_stack)
    ours = [f for f in frames if f"/{package}/" in f.filename] or frames
    if not ours:
        return None
    f = ours[-1]
    name = f.filename.split(f"/{package}/", 1)[-1] if f"/{package}/" in f.filename else f.filename
    return f"{package}/{name}:{f.lineno} in {f.name}"


@dataclass
class Context:
    """Settings of one validation run (GPU or CPU dry run)."""

    dry: bool
    out: Path
    work: Path
    data_root: str
    extra: list[str]
    steps: int
    sync_steps: int
    bench_iters: int
    bench_warmup: int
    train_s: float
    budget_s: float
    bench_rows: list[str]
    train_row: str
    smoke_rows: list[str]
    precisions: list[str]
    compile_modes: list[bool]
    only: set[str]
    started: float = field(default_factory=time.monotonic)

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    def left(self) -> float:
        """Seconds of the budget left."""
        return self.budget_s - (time.monotonic() - self.started)

    def shrink(self) -> list[str]:
        """Overrides appended to every case: the dry run's tiny setting, or the data root."""
        return list(DRY_RUN_OVERRIDES) if self.dry else [f"dataset.root={self.data_root}",
                                                         "device=cuda"]


# ----------------------------------------------------------------------------- 1. aug

def draw_strong_params(aug, n: int, height: int, width: int, gen: torch.Generator) -> dict:
    """Every random choice of ``aug.strong_u8`` for n images, drawn from ``gen`` in the same
    order and with the same helpers (imbssl/data/augment.py), on gen's device."""
    from imbssl.data import augment as A

    dev = gen.device
    pad = aug.pad(height)
    p = {"flip": A._coin(n, gen, dev) & aug.flip,
         "oy": A._randint(0, 2 * pad + 1, n, gen, dev),
         "ox": A._randint(0, 2 * pad + 1, n, gen, dev), "slots": []}
    for _ in range(aug.randaug_n):
        op = A._randint(0, len(A.RANDAUG_OPS), n, gen, dev)
        level = A._randint(1, A.LEVELS, n, gen, dev)
        sign = torch.where(A._coin(n, gen, dev), -1.0, 1.0)
        op = torch.where(A._coin(n, gen, dev), op, torch.full_like(op, A.OP_INDEX["identity"]))
        p["slots"].append((op, A.fixmatch_magnitudes(op, level, sign, height, width)))
    size = int(aug.cutout * height)
    if size > 0:
        cy = torch.rand(n, generator=gen, device=dev) * height
        cx = torch.rand(n, generator=gen, device=dev) * width
        p["top"] = (cy - size / 2.0).clamp_min(0).floor().long()
        p["left"] = (cx - size / 2.0).clamp_min(0).floor().long()
    return p


def params_to(p: dict, device) -> dict:
    out = {k: v.to(device) for k, v in p.items() if isinstance(v, torch.Tensor)}
    out["slots"] = [(op.to(device), mag.to(device)) for op, mag in p["slots"]]
    return out


def replay_weak(aug, x: torch.Tensor, p: dict) -> torch.Tensor:
    """The weak view (uint8) of x with the drawn flip and crop."""
    from imbssl.data.augment import flip_crop

    return flip_crop(x, p["flip"], p["oy"], p["ox"], aug.pad(x.shape[2]))


def replay_strong(aug, x: torch.Tensor, p: dict) -> torch.Tensor:
    """The strong view (uint8) of x with the drawn choices, on x's device."""
    from imbssl.data.augment import apply_ops, cutout

    xf = replay_weak(aug, x, p).float()
    for op, magnitude in p["slots"]:
        xf = apply_ops(xf, op, magnitude)
    if "top" in p:
        xf = cutout(xf, p["top"], p["left"], int(aug.cutout * x.shape[2]))
    return xf.to(torch.uint8)


def _aug_images(ctx: Context) -> tuple[torch.Tensor, str]:
    """Test images of the validated dataset as uint8 (N, C, H, W), and where they came from."""
    from imbssl.data import load_source

    name, root = ("digits", "datasets") if ctx.dry else ("cifar10", ctx.data_root)
    src = load_source(name, root)
    x = torch.from_numpy(src.test_images[:AUG_IMAGES]).permute(0, 3, 1, 2).contiguous()
    return x, f"{name} test images ({len(x)})"


def check_aug(ctx: Context) -> dict:
    from imbssl.data import NORMALIZATION, Augmenter
    from imbssl.data.augment import RANDAUG_OPS

    x, source = _aug_images(ctx)
    aug = Augmenter(*NORMALIZATION["digits" if ctx.dry else "cifar10"], flip=not ctx.dry)
    n, h, w = x.shape[0], x.shape[2], x.shape[3]
    p = draw_strong_params(aug, n, h, w, torch.Generator().manual_seed(0))
    cpu = replay_strong(aug, x, p)
    reference = aug.strong_u8(x, torch.Generator().manual_seed(0))
    if not torch.equal(cpu, reference):
        return failed("the CPU replay differs from Augmenter.strong_u8 for the same seed; "
                      "draw_strong_params no longer follows imbssl/data/augment.py",
                      images=source)
    details = {"images": source, "cpu_replay_equals_strong_u8": True}
    if not torch.cuda.is_available():
        return skipped("no CUDA device: only the CPU replay was checked", **details)
    pc = params_to(p, "cuda")
    x_cuda = x.cuda()
    same_seed = [aug.strong_u8(x_cuda, torch.Generator(device="cuda").manual_seed(0))
                 for _ in range(2)]
    weak_equal = torch.equal(replay_weak(aug, x.cuda(), pc).cpu(), replay_weak(aug, x, p))
    cuda = replay_strong(aug, x.cuda(), pc).cpu()
    diff = cuda.int() - cpu.int()
    bad_images = diff.ne(0).flatten(1).any(1).nonzero().flatten().tolist()
    ops_of_bad = Counter(RANDAUG_OPS[int(op[i])] for op, _ in p["slots"] for i in bad_images
                         if RANDAUG_OPS[int(op[i])] != "identity")
    norm_cpu, norm_cuda = aug.normalize(cpu), aug.normalize(cpu.cuda()).cpu()
    details.update({
        "cuda_generator_repeatable": bool(torch.equal(*same_seed)),
        "weak_bitwise_equal": weak_equal, "strong_bitwise_equal": bool(diff.eq(0).all()),
        "strong_pixels_differing": int(diff.ne(0).sum()),
        "strong_fraction_differing": float(diff.ne(0).float().mean()),
        "strong_max_abs_diff": int(diff.abs().max()), "images_differing": len(bad_images),
        "ops_in_differing_images": dict(ops_of_bad), "tolerance_fraction": AUG_TOLERANCE,
        "normalize_max_abs_diff": float((norm_cpu - norm_cuda).abs().max())})
    if (not weak_equal or not details["cuda_generator_repeatable"]
            or details["strong_fraction_differing"] > AUG_TOLERANCE):
        return failed("CUDA augmentation differs from the CPU beyond the tolerance", **details)
    return passed(**details)


# ----------------------------------------------------------------------------- 2. bench

def run_bench(ctx: Context) -> dict:
    """``imbssl bench --experiments`` for the bench rows, once per precision."""
    from imbssl.bench.throughput import format_table
    from imbssl.bench.throughput import main as bench_main

    if not ctx.dry and ctx.left() < BENCH_RESERVE_S:
        return skipped(f"time budget: {ctx.left():.0f} s left, the bench needs "
                       f"{BENCH_RESERVE_S:.0f} s")
    by_precision, tables = {}, {}
    for precision in ctx.precisions:
        path = ctx.work / f"bench_{precision}.json"
        argv = ["--experiments", ",".join(ctx.bench_rows), "--iters", str(ctx.bench_iters),
                "--warmup", str(ctx.bench_warmup),
                "--workers", str(1 if ctx.dry else min(8, os.cpu_count() or 1)),
                "--json", str(path)]
        argv += [] if ctx.dry else ["--compile"]
        argv += [] if precision == "bf16" else ["--no-conventional"]
        for o in [*ctx.extra, *ctx.shrink(), f"trainer.precision={precision}"]:
            argv += ["--set", o]
        with contextlib.redirect_stdout(sys.stderr):
            bench_main(argv)
        report = json.loads(path.read_text())
        by_precision[precision] = report
        tables[precision] = format_table(report["results"])
    return passed(reports=by_precision, tables=tables,
                  note=None if ctx.dry else "MFU against the bf16 dense peak for every "
                  "precision; compiled as trainer=daso_protocol")


# ----------------------------------------------------------------------------- 3. train

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


def read_jsonl(path: Path) -> list[dict]:
    """The complete rows of a JSON-lines file (a line cut short by a stop is left out)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


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


# ----------------------------------------------------------------------------- 4. smoke

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


# ----------------------------------------------------------------------------- the run

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


# ----------------------------------------------------------------------------- output

def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def write_results(ctx: Context, results: dict) -> None:
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / "gpu_validate.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (ctx.out / "gpu_validate.md").write_text(markdown(results))


def commit_line(env: dict) -> str:
    """The commit that ran: this tree's, else the one recorded when .device/ was prepared."""
    source = env if env.get("git_commit", "unknown") != "unknown" else env.get(
        "commit_at_prep", {})
    text = source.get("git_commit", "unknown")[:12] + (" + uncommitted changes" if source.get(
        "git_dirty") else "")
    return text + (" (at --prep)" if source is not env else "")


def markdown(results: dict) -> str:
    env, items = results["environment"], results["items"]
    lines = [f"# GPU validation ({results['mode']})", "",
             f"{results['started']}, device {env['device']}, torch {env['torch']} (CUDA "
             f"{env.get('cuda')}), commit {commit_line(env)}"
             + f"; {results.get('seconds', 0):.0f} s of a {results['budget_s']:.0f} s budget.",
             "", "| item | status | detail |", "|---|---|---|"]
    for name, item in items.items():
        detail = item.get("error") or item.get("reason") or ""
        lines.append(f"| {name} | {item['status']} | {str(detail).replace('|', '/')} |")
    bench = items.get("bench", {})
    for precision, table in bench.get("tables", {}).items():
        lines += ["", f"## bench, {precision}", "", table]
    if bench.get("note"):
        lines += ["", bench["note"]]
    smoke = items.get("smoke", {})
    if smoke.get("cases"):
        lines += ["", "## smoke runs", "", "| case | compile | status | s | train rows | "
                  "precision | channels_last | fused SGD | data | sync | problem |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in smoke["cases"]:
            p = c.get("paths", {})
            sync = c.get("sync", {}).get("status", "-")
            lines.append(f"| {c['case']} | {'on' if c['compile'] else 'off'} | {c['status']} | "
                         f"{c.get('run_s', 0):.1f} | {c.get('train_rows', '-')} | "
                         f"{p.get('precision', '-')} | {p.get('channels_last', '-')} | "
                         f"{p.get('fused_sgd', '-')} | {p.get('data_device', '-')} | {sync} | "
                         f"{str(c.get('error', '')).replace('|', '/')} |")
    sync = items.get("sync", {})
    if sync.get("sync_sites"):
        lines += ["", "## host syncs found", ""] + [f"- {k}: {v}" for k, v in
                                                    sync["sync_sites"].items()]
    train = items.get("train", {})
    if "curve" in train:
        lines += ["", "## training run", "",
                  f"`imbssl train {' '.join(train['overrides'])}`: {train['steps']} iterations "
                  f"in {train['wall_s']:.0f} s (startup and compilation included; the device was "
                  "shared with the smoke runs), "
                  f"stopped at the deadline: {train['stopped_at_deadline']}.", "",
                  "| step | test top-1 | test balanced acc | valid top-1 |", "|---|---|---|---|"]
        for e in train["curve"]["evaluations"]:
            lines.append(f"| {e['step']} | {_pct(e.get('test_top1'))} | "
                         f"{_pct(e.get('test_balanced_acc'))} | {_pct(e.get('valid_top1'))} |")
    aug = items.get("aug", {})
    if "strong_fraction_differing" in aug:
        lines += ["", "## augmentation, CUDA vs CPU", "",
                  f"weak bitwise equal: {aug['weak_bitwise_equal']}; strong: "
                  f"{aug['strong_pixels_differing']} pixels differ "
                  f"({aug['strong_fraction_differing']:.2e} of all, tolerance "
                  f"{aug['tolerance_fraction']:.0e}), max |diff| {aug['strong_max_abs_diff']}, "
                  f"in {aug['images_differing']} images (their ops: "
                  f"{aug['ops_in_differing_images']}); normalize max |diff| "
                  f"{aug['normalize_max_abs_diff']:.2e}."]
    if results.get("skipped"):
        lines += ["", "## skipped", ""] + [f"- {s}" for s in results["skipped"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- prep

def tree_bytes(repo: Path) -> int:
    """Bytes of the tracked and untracked-not-ignored files (what the device tool sends)."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others",
                          "--exclude-standard"], capture_output=True, check=True).stdout
    paths = [repo / p for p in out.decode().split("\0") if p]
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def git_commit_of(repo: Path) -> dict:
    """HEAD of ``repo`` and whether tracked files differ from it."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                             check=False)
        return out.stdout.strip() if out.returncode == 0 else ""

    return {"git_commit": git("rev-parse", "HEAD") or "unknown",
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def prep(shared: Path, repo: Path, limit_mib: float = CARRY_LIMIT_MIB) -> dict:
    """Copy the Hydra wheels and the CIFAR-10 JPEG npz (+ materialize.py) into .device/."""
    from imbssl.errors import UserError

    dest = repo / DEVICE_DIR
    wheels = sorted(p for p in (shared / "device-wheels").glob("*.whl")
                    if p.name.startswith(WHEELS))
    data = sorted((shared / "data").glob("cifar10_*_jpeg.npz"))
    tool = shared / "data" / "materialize.py"
    if len(wheels) != len(WHEELS) or len(data) != 2 or not tool.is_file():
        raise UserError(f"{shared} lacks device-wheels/{{{','.join(WHEELS)}}}*.whl or "
                        "data/cifar10_{train,test}_jpeg.npz + materialize.py")
    for sub, files in (("wheels", wheels), ("data", [*data, tool])):
        (dest / sub).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(f, dest / sub / f.name)
    (dest / "source.json").write_text(json.dumps(git_commit_of(repo)) + "\n")
    carried = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()
                  and not p.is_relative_to(dest / "site") and not p.is_relative_to(
                      dest / "datasets"))
    total = tree_bytes(repo) + carried
    if total > limit_mib * 2**20:
        raise UserError(f"the working tree + {DEVICE_DIR}/ is {total / 2**20:.1f} MiB, over "
                        f"the device tool's {limit_mib} MiB; remove untracked files")
    return {"dir": str(dest), "carried_mib": carried / 2**20, "total_mib": total / 2**20}


# ----------------------------------------------------------------------------- CLI

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m imbssl.bench.validate",
                                description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("prep", help="copy the wheels and CIFAR-10 into .device/ (here)")
    pr.add_argument("--shared", type=Path, default=SHARED)
    r = sub.add_parser("run", help="validate (on the GPU machine, or --dry-run on a CPU)")
    r.add_argument("--dry-run", action="store_true", help="CPU: tiny model, 2 steps")
    r.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or
                                                    "analysis/results/gpu"))
    r.add_argument("--work", type=Path, default=None,
                   help="run folders and logs (default: OUT/../gpu_validate_work, or a "
                        "temporary folder)")
    r.add_argument("--data-root", default=None,
                   help=f"folder holding cifar-10-batches-py (default: {DEVICE_DIR}/datasets "
                        "when it is there, else datasets)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every case, e.g. --set recipe=daso_official")
    r.add_argument("--bench-rows", default=",".join(BENCH_ROWS))
    r.add_argument("--train-row", default=TRAIN_ROW)
    r.add_argument("--smoke-rows", default=",".join(SMOKE_ROWS))
    r.add_argument("--precisions", default=",".join(PRECISIONS),
                   help="trainer.precision values of the bench (default: %(default)s)")
    r.add_argument("--compile", default="off,on", help="smoke runs: compile off, on or both")
    r.add_argument("--only", default="aug,bench,smoke,sync,train",
                   help="items to run (a rerun of what failed), default: %(default)s")
    for key in ("steps", "sync_steps", "bench_iters", "bench_warmup", "train_s", "budget_s"):
        r.add_argument(f"--{key.replace('_', '-')}", type=float if key.endswith("_s") else int,
                       default=None, help=f"GPU default {GPU[key]}, dry run {DRY[key]}")
    return p


def _context(args) -> Context:
    preset = DRY if args.dry_run else GPU
    value = {k: getattr(args, k) if getattr(args, k) is not None else v
             for k, v in preset.items()}
    carried = REPO / DEVICE_DIR / "datasets"
    root = args.data_root or (carried if (carried / "cifar-10-batches-py").is_dir()
                              else REPO / "datasets")
    work = args.work or (Path(os.environ["TMPDIR"] if "TMPDIR" in os.environ else "/tmp")
                         / f"imbssl-validate-{os.getpid()}")
    modes = [m.strip() for m in args.compile.split(",") if m.strip()]
    from imbssl.errors import UserError

    if not modes or set(modes) - {"on", "off"}:
        raise UserError(f"--compile must be off, on or off,on; got {args.compile!r}")
    if args.dry_run:
        modes = [m for m in modes if m == "off"]
    return Context(dry=args.dry_run, out=args.out, work=work, data_root=str(root),
                   extra=list(args.set), steps=value["steps"],
                   sync_steps=value["sync_steps"], bench_iters=value["bench_iters"],
                   bench_warmup=value["bench_warmup"], train_s=float(value["train_s"]),
                   budget_s=float(value["budget_s"]),
                   bench_rows=[s for s in args.bench_rows.split(",") if s],
                   train_row=args.train_row,
                   smoke_rows=[s for s in args.smoke_rows.split(",") if s],
                   precisions=[s for s in args.precisions.split(",") if s],
                   compile_modes=[m == "on" for m in modes],
                   only={s.strip() for s in args.only.split(",") if s.strip()})


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from imbssl.errors import UserError

    try:
        if args.command == "prep":
            info = prep(args.shared, REPO)
            print(f"prep: {info['dir']} holds {info['carried_mib']:.1f} MiB; with the working "
                  f"tree {info['total_mib']:.1f} of {CARRY_LIMIT_MIB} MiB travel")
            return 0
        ctx = _context(args)
    except UserError as exc:
        print(f"validate: error: {exc}", file=sys.stderr)
        return 2
    ctx.work.mkdir(parents=True, exist_ok=True)
    results = run_all(ctx)
    print(markdown(results))
    print(f"validate: wrote {ctx.out / 'gpu_validate.json'} and gpu_validate.md; "
          f"failed: {results['failed'] or 'none'}", file=sys.stderr)
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
