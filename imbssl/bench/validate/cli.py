"""``python -m imbssl.bench.validate {run,prep}``."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from imbssl.bench.validate.common import (
    BENCH_ROWS,
    CARRY_LIMIT_MIB,
    DEVICE_DIR,
    DRY,
    GPU,
    PRECISIONS,
    REPO,
    SHARED,
    SMOKE_ROWS,
    TRAIN_ROW,
    Context,
)
from imbssl.bench.validate.output import markdown
from imbssl.bench.validate.prep import prep
from imbssl.bench.validate.run import run_all


def _package_doc() -> str:
    import imbssl.bench.validate as package

    return package.__doc__


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m imbssl.bench.validate",
                                description=_package_doc().splitlines()[0])
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
