"""``imbssl bench``: training throughput of the device-resident pipeline, and of a conventional
DataLoader + PIL pipeline feeding the same model and training step.

For each algorithm spec (``fixmatch``, ``fixmatch+daso``, ...) and labeled batch size, or
each experiment row by name (``--experiments cifar10_lt_g100_n1500_fixmatch_daso``: the row's
dataset, model, algorithm, refiner and batch), it builds the ``Trainer`` from the composed config, warms up, times ``trainer.train_step()``
in up to 5 chunks (synchronizing CUDA before reading the clock) and reports:

* iterations/s (the median of the chunk rates; the table adds the slowest-fastest chunk in
  brackets) and images/s, images = labeled + unlabeled x views (what the step consumes);
* peak memory of the case, from before the trainer is built (so it includes the dataset):
  CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak growth of the process RSS,
  sampled every 10 ms from /proc/self/statm (``MemoryMeter`` says which in the output);
* minutes for 250k iterations (the DASO protocol) at the measured rate;
* model FLOP utilisation (MFU). ``FlopCounterMode`` counts the matmul/conv FLOPs of one
  forward of the model per image (F). The step's FLOPs are estimated as
  ``3 F x (images the step trains on)`` (forward + backward ~ 3 forwards) ``+ F x (images
  that only go through no-grad forwards: the EMA model's labeled batch for DASO's queues and
  SimMatch's bank)``; the images the step trains on count every forward with gradient
  (ReMixMatch: weak + strong, the mixed batch, the rotated batch). The JSON also has the
  FLOPs counted by running one whole step under ``FlopCounterMode`` (``step_flops_counted``,
  which includes the small heads and DASO's prototype products); MFU uses the counted value
  when available. Peak FLOP/s: ``--peak-tflops``, else a default from the device name (H100
  SXM / H200 bf16 dense 989 TFLOP/s, H100 PCIe 756, A100 312); none on CPU, so MFU is n/a.

DASO is benchmarked in its steady state: ``pseudo.warmup_iters=0`` so blending and the
alignment loss run from the first step (a real run starts them after 5000 iterations).
The measuring itself is in :mod:`imbssl.bench.measure`, the DataLoader + PIL pipeline in
:mod:`imbssl.bench.conventional`.

    imbssl bench --dataset cifar10_lt --model wrn28_2 --algorithms fixmatch,fixmatch+daso \\
        --batch-size 64 --uratio 2 --iters 50 --warmup 5 --workers 8 --json bench.json
    imbssl bench --experiments cifar10_lt_g100_n1500_fixmatch_daso --set trainer.precision=fp32
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from imbssl.bench.measure import (
    ESTIMATE_ITERS,
    MemoryMeter,
    counted_step_flops,
    default_peak_tflops,
    device_name,
    forward_flops_per_image,
    images_per_step,
    maxrss_mb,
    time_steps,
)

QUICK = {"iters": 3, "warmup": 1}
DEFAULTS = {"iters": 30, "warmup": 5}


@dataclass
class Spec:
    """One benchmarked case: an algorithm (``fixmatch`` or ``fixmatch+daso``) on the
    ``--dataset`` / ``--model`` options, or an experiment row by name (``experiment`` set)."""

    text: str
    algorithm: str
    pseudo: str
    experiment: str | None = None


def parse_spec(text: str) -> Spec:
    from imbssl.errors import UserError

    parts = [p.strip() for p in text.split("+")]
    if not parts[0] or len(parts) > 2:
        raise UserError(f"--algorithms entry {text!r} must be ALGORITHM or ALGORITHM+daso")
    pseudo = parts[1] if len(parts) == 2 else "none"
    if pseudo not in ("none", "daso"):
        raise UserError(f"--algorithms entry {text!r}: the refiner must be daso (or none)")
    return Spec(text, parts[0], pseudo)


def experiment_spec(row: str) -> Spec:
    """A case that runs experiment row ``row`` (configs/experiment/<row>.yaml)."""
    from imbssl.engine.config import CONFIG_DIR
    from imbssl.errors import UserError

    if not (CONFIG_DIR / "experiment" / f"{row}.yaml").is_file():
        raise UserError(f"--experiments entry {row!r} is not an experiment row; see "
                        "configs/experiment/ (python configs/experiment/_generate.py --list)")
    return Spec(row, "", "", experiment=row)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="imbssl bench", description="Training-throughput benchmark: device-resident "
        "pipeline vs. a DataLoader + PIL pipeline, same model and training step.")
    p.add_argument("--algorithms", default="fixmatch,fixmatch+daso",
                   help="comma-separated ALGORITHM[+daso] (default: %(default)s)")
    p.add_argument("--experiments", default=None,
                   help="comma-separated experiment rows to bench instead of --algorithms "
                        "(each row's dataset, model, algorithm, refiner and batch size)")
    p.add_argument("--batch-size", default=None,
                   help="labeled batch size(s), comma-separated (default: 64; with "
                        "--experiments: the row's)")
    p.add_argument("--uratio", type=int, default=None,
                   help="unlabeled batches per labeled one (mu); default: the algorithm's")
    p.add_argument("--model", default="wrn28_2", help="model config (default: %(default)s)")
    p.add_argument("--dataset", default="cifar10_lt",
                   help="dataset config, e.g. cifar10_lt or digits_lt (default: %(default)s)")
    p.add_argument("--iters", type=int, default=None,
                   help=f"timed iterations (default {DEFAULTS['iters']}; --quick "
                        f"{QUICK['iters']})")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"untimed iterations first (default {DEFAULTS['warmup']}; --quick "
                        f"{QUICK['warmup']})")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader worker processes per loader of the conventional pipeline "
                        "(default: min(8, CPUs) = %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model "
                   "(trainer.compile=true, as trainer=daso_protocol does)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak FLOP/s of the device in TFLOP/s for MFU (default: by device name; "
                        "none on CPU)")
    p.add_argument("--no-conventional", action="store_true",
                   help="skip the DataLoader + PIL pipeline")
    p.add_argument("--quick", action="store_true",
                   help="a few iterations only (smoke test of the benchmark itself)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to PATH")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override (repeatable), e.g. --set trainer.precision=fp32")
    return p


# ----------------------------------------------------------------------------- one case

def overrides(args, spec: Spec, batch_size: int | None, run_dir: str) -> list[str]:
    if spec.experiment is not None:
        ov = [f"experiment={spec.experiment}"]
    else:
        ov = [f"dataset={args.dataset}", f"algorithm={spec.algorithm}",
              f"pseudo={spec.pseudo}", f"model={args.model}", "trainer=default"]
    if batch_size is not None:
        ov.append(f"trainer.batch_size={batch_size}")
    ov += [f"trainer.iterations={ESTIMATE_ITERS}", "trainer.progress=false",
           "trainer.tensorboard=false", "trainer.report=false",
           f"trainer.compile={'true' if args.compile else 'false'}", f"device={args.device}",
           f"run_dir={run_dir}"]
    if args.uratio is not None:
        ov.append(f"algorithm.uratio={args.uratio}")
    return ov + list(args.set)


def compose_case(args, spec: Spec, batch_size: int | None, run_dir: str):
    """The case's config; DASO in its steady state (``pseudo.warmup_iters=0``: blending and
    the alignment loss on from the first step)."""
    from imbssl.engine.config import compose

    ov = overrides(args, spec, batch_size, run_dir)
    cfg = compose(ov)
    if str(cfg.pseudo.get("name", "none")) == "daso":
        cfg = compose(ov + ["pseudo.warmup_iters=0"])
    return cfg


def _rates(timing: dict, images: dict, peak_mb: float, step_flops: float | None,
           peak_tflops: float | None) -> dict:
    its = timing["its_per_s"]
    out = {"its_per_s": its, "images_per_s": its * images["total"], "ms_per_it": 1e3 / its,
           "peak_mem_mb": peak_mb, "minutes_250k": ESTIMATE_ITERS / its / 60.0,
           "its_per_s_mean": timing["its_per_s_mean"], "its_per_s_min": timing["its_per_s_min"],
           "its_per_s_max": timing["its_per_s_max"], "timed_iters": timing["iters"],
           "seconds": timing["seconds"], "mfu": None,
           "achieved_tflops": step_flops * its / 1e12 if step_flops else None}
    if step_flops and peak_tflops:
        out["mfu"] = step_flops * its / (peak_tflops * 1e12)
    return out


def _release(trainer, device: torch.device) -> None:
    close = getattr(trainer, "close", None)
    if close is not None:
        close()
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(args, spec: Spec, batch_size: int | None, warmup: int, iters: int,
             peak_tflops_arg: float | None) -> dict:
    from imbssl.engine.trainer import Trainer, resolve_device

    result: dict = {"algorithm": spec.text}
    with tempfile.TemporaryDirectory(prefix="imbssl-bench-") as tmp:
        cfg = compose_case(args, spec, batch_size, str(Path(tmp) / "ours"))
        result["batch_size"] = int(cfg.trainer.batch_size)
        if spec.experiment is not None:
            result.update(experiment=spec.experiment, dataset=str(cfg.dataset.name),
                          model=str(cfg.model.name))
        device = resolve_device(str(cfg.device))
        meter = MemoryMeter(device)
        meter.begin()
        trainer = Trainer(cfg)
        peak_tflops = peak_tflops_arg if peak_tflops_arg is not None \
            else default_peak_tflops(device)
        images = images_per_step(trainer)
        fwd = forward_flops_per_image(trainer)
        approx = fwd * (3 * images["trained"] + images["no_grad"])
        counted = counted_step_flops(trainer)
        step_flops = counted or approx
        timing = time_steps(trainer, warmup, iters)
        result.update({
            "uratio": images["uratio"], "images_per_step": images,
            "device": str(device), "device_name": device_name(device),
            "precision": str(trainer.precision).replace("torch.", ""),
            "compile": bool(args.compile), "peak_tflops": peak_tflops,
            "flops": {"forward_per_image": fwd, "step_flops_approx": approx,
                      "step_flops_counted": counted, "step_flops_used": step_flops},
            "ours": _rates(timing, images, meter.end(), step_flops, peak_tflops),
            "ru_maxrss_mb": maxrss_mb(),
            "memory_method": meter.method,
        })
        _release(trainer, device)

        if not args.no_conventional:
            from imbssl.bench.conventional import ConventionalTrainer

            cfg = compose_case(args, spec, batch_size, str(Path(tmp) / "conventional"))
            meter.begin()
            trainer = ConventionalTrainer(cfg, args.workers, warmup + iters + 2)
            timing = time_steps(trainer, warmup, iters)
            conv = _rates(timing, images, meter.end(), step_flops, peak_tflops)
            conv["workers_per_loader"] = args.workers
            result["conventional"] = conv
            result["speedup"] = result["ours"]["its_per_s"] / conv["its_per_s"]
            _release(trainer, device)
    return result


# ----------------------------------------------------------------------------- output

def _fmt_mem(mb: float) -> str:
    return f"{mb / 1024:.2f} GiB" if mb >= 1024 else f"{mb:.0f} MiB"


def _fmt_mfu(mfu: float | None) -> str:
    return "n/a" if mfu is None else f"{100 * mfu:.1f}%"


TABLE_HEADER = ("| algorithm | B | mu | pipeline | it/s [min-max] | img/s | ms/it | peak mem | 250k its "
                "| MFU | vs conventional |")


def format_table(results: list[dict]) -> str:
    lines = [TABLE_HEADER, "|" + "---|" * 11]
    for r in results:
        rows = [("ours (device)", r["ours"], f"{r['speedup']:.2f}x" if "speedup" in r else "")]
        if "conventional" in r:
            c = r["conventional"]
            rows.append((f"DataLoader+PIL ({c['workers_per_loader']} workers/loader)", c,
                         "1.00x"))
        for name, m, ratio in rows:
            hours = m["minutes_250k"] / 60.0
            est = f"{m['minutes_250k']:.0f} min" if hours < 2 else f"{hours:.1f} h"
            lines.append(f"| {r['algorithm']} | {r['batch_size']} | {r['uratio']} | {name} | "
                         f"{m['its_per_s']:.2f} [{m['its_per_s_min']:.2f}-{m['its_per_s_max']:.2f}] | "
                         f"{m['images_per_s']:.0f} | "
                         f"{m['ms_per_it']:.1f} | {_fmt_mem(m['peak_mem_mb'])} | {est} | "
                         f"{_fmt_mfu(m['mfu'])} | {ratio} |")
    return "\n".join(lines)


def format_notes(report: dict) -> str:
    r0 = report["results"][0]
    gflops = r0["flops"]["forward_per_image"] / 1e9
    peak = r0["peak_tflops"]
    lines = [
        f"device: {r0['device_name']} ({r0['device']}, {r0['precision']}, "
        f"compile={r0['compile']}); torch {report['torch']}",
        f"dataset={report['settings']['dataset']} model={report['settings']['model']}; "
        f"{report['settings']['warmup']} warm-up + {report['settings']['iters']} timed "
        "iterations per pipeline",
        f"images/s = labeled + unlabeled x views per step; peak mem: {r0['memory_method']}",
        f"forward FLOPs per image: {gflops:.3f} GFLOP; MFU peak: "
        + (f"{peak:g} TFLOP/s" if peak else "none given (--peak-tflops), so n/a"),
    ]
    return "\n".join(lines)


def _preload() -> None:
    """Import what the first case would otherwise import lazily (torch._dynamo through the
    optimizer, scikit-learn for digits), so that case's memory figure is not inflated."""
    import importlib

    for name in ("torch._dynamo", "torch.utils.flop_counter", "sklearn.datasets",
                 "imbssl.engine.trainer", "imbssl.bench.conventional"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def _batch_sizes(text: str | None, rows: bool) -> list[int | None]:
    """--batch-size as integers; None (the row's own) for experiment rows when not given."""
    from imbssl.errors import UserError

    if text is None:
        return [None] if rows else [64]
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--batch-size must be integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    from imbssl.errors import UserError

    preset = QUICK if args.quick else DEFAULTS
    iters = args.iters if args.iters is not None else preset["iters"]
    warmup = args.warmup if args.warmup is not None else preset["warmup"]
    if iters < 1 or warmup < 0:
        raise UserError(f"--iters must be >= 1 and --warmup >= 0, got {iters} and {warmup}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if args.experiments is not None:
        specs = [experiment_spec(s.strip()) for s in args.experiments.split(",") if s.strip()]
    else:
        specs = [parse_spec(s) for s in args.algorithms.split(",") if s.strip()]
    sizes = _batch_sizes(args.batch_size, args.experiments is not None)
    if not specs or not sizes or min(s or 1 for s in sizes) < 1:
        raise UserError("give at least one algorithm (or experiment row) and batch sizes >= 1")

    _preload()
    results = []
    for spec in specs:
        for bs in sizes:
            size = "of the row" if bs is None else str(bs)
            print(f"bench: {spec.text} batch {size} ...", file=sys.stderr, flush=True)
            results.append(run_case(args, spec, bs, warmup, iters, args.peak_tflops))
    report = {
        "command": "imbssl bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "estimate_iters": ESTIMATE_ITERS,
        "settings": {"dataset": args.dataset, "model": args.model,
                     "experiments": args.experiments, "iters": iters,
                     "warmup": warmup, "workers": args.workers, "device": args.device,
                     "compile": bool(args.compile), "uratio": args.uratio,
                     "overrides": list(args.set)},
        "results": results,
    }
    print(format_table(results))
    print(format_notes(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"json: {args.json}")
    return 0
