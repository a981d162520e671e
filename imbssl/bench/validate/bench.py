"""Check 2, ``bench``: throughput of the bench rows in each precision."""
from __future__ import annotations

import contextlib
import json
import os
import sys

from imbssl.bench.validate.common import BENCH_RESERVE_S, Context, passed, skipped


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
